"""Measure what structure cannot read from constants, by running a probe copy of the model.

The matcher (:mod:`qcompiler.match`, which never runs a model) says *which* MatMul is V and which is
O, and which slices of a fused weight it cannot read; it hands over a :class:`~qcompiler.sites.ProbeRequest`.
The head size, the query-head -> KV-head map and the column ranges of run-time-computed slices are then
read off numbers, whatever reshapes, transposes, repeats (GQA/MQA) or slices the exporter produced:

- in a copy of the graph, a probed site's output is replaced by a constant that holds, in every token,
  the channel's index (in base ``B`` digits, one run per digit, so that fp16 rounding cannot confuse
  neighbours); O outputs are multiplied by zero, so the probes do not disturb the rest of the network;
- layout ops and slices move those indices unchanged, and attention rows sum to one, so a watched
  tensor downstream holds, at each position, the index of the column that feeds it.

The original graph is not touched. The result goes back to the matcher as data
(:class:`~qcompiler.sites.ProbeResult`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.errors import first_line
from qcompiler.external import is_external, read_values
from qcompiler.graphio import export_graph, redirect_consumers
from qcompiler.runtime.inputs import sample_inputs
from qcompiler.runtime.session import SessionOptions
from qcompiler.runtime.validate import run
from qcompiler.sites import ProbeRequest, ProbeResult

# Relative precision of an attention-weighted average of one value, per float type: the digit base
# keeps the worst case below a quarter of a unit.
_BASE = {"float32": 1 << 12, "float64": 1 << 12, "float16": 32, "bfloat16": 8}


def _probe_graph(graph: gs.Graph, request: ProbeRequest, digit: int, base: int) -> gs.Graph:
    graph = graph.copy()
    tensors = graph.tensors()
    for i, (site, value) in enumerate(zip(request.sources, request.values, strict=True)):
        v = tensors[value]
        dtype = np.dtype(site.dtype)
        code = ((np.arange(site.n) // base**digit) % base).astype(dtype)
        zero = gs.Constant(f"__probe_zero_{i}", np.zeros((), dtype))
        probe = gs.Variable(f"__probe_v_{i}", dtype=v.dtype)
        scaled = gs.Variable(f"__probe_vz_{i}", dtype=v.dtype)
        redirect_consumers(v, probe)
        graph.nodes.append(gs.Node("Mul", name=f"__probe_mul_{i}", inputs=[v, zero], outputs=[scaled]))
        graph.nodes.append(gs.Node("Add", name=f"__probe_add_{i}",
                                   inputs=[scaled, gs.Constant(f"__probe_code_{i}", code)], outputs=[probe]))
    for i, site in enumerate(request.silence):
        o_out = tensors[site.output]
        zero = gs.Constant(f"__probe_ozero_{i}", np.zeros((), np.dtype(site.dtype)))
        silenced = gs.Variable(f"__probe_o_{i}", dtype=o_out.dtype)
        redirect_consumers(o_out, silenced)
        graph.nodes.append(gs.Node("Mul", name=f"__probe_omul_{i}", inputs=[o_out, zero], outputs=[silenced]))
        if o_out in graph.outputs:
            graph.outputs[graph.outputs.index(o_out)] = silenced
    dtype = np.dtype(request.sources[0].dtype) if request.sources else np.dtype(np.float32)
    for name in dict.fromkeys(request.watch):
        t = tensors[name]
        if t not in graph.outputs:
            t.dtype = t.dtype or dtype
            graph.outputs.append(t)
    graph.toposort()
    return graph


def probe(graph: gs.Graph, opsets, request: ProbeRequest) -> ProbeResult:
    """Run ``request`` on copies of ``graph`` (``opsets``: the model's opset imports); a model that fails
    to run gives a result with ``error`` set, never an exception."""
    watch = list(dict.fromkeys(request.watch))
    base = min(_BASE.get(s.dtype, 8) for s in request.sources)
    digits = max(1, math.ceil(math.log(max(s.n for s in request.sources), base)))
    decoded: dict[str, np.ndarray | None] = {}
    for digit in range(digits):
        try:
            out = _run(_probe_graph(graph, request, digit, base), opsets)
        except Exception as e:  # noqa: BLE001 - any failure of the probe model is reported, not raised
            return ProbeResult({}, first_line(e, 200))
        for name in watch:
            value = np.asarray(out[name], dtype=np.float64)
            whole = np.rint(value)
            if name in decoded and decoded[name] is None:
                continue
            if not np.all(np.abs(value - whole) < 0.25):
                decoded[name] = None
                continue
            decoded[name] = decoded.get(name, 0) + whole.astype(np.int64) * base**digit
    return ProbeResult(decoded)


def probe_all(graph: gs.Graph, opsets, requests: Mapping[str, ProbeRequest]) -> dict[str, ProbeResult]:
    """Every request the matcher made (``Matching.requests``), by name, in order."""
    return {name: probe(graph, opsets, request) for name, request in requests.items()}


def _run(graph: gs.Graph, original_opsets) -> dict[str, np.ndarray]:
    _stand_in_external(graph)
    model: onnx.ModelProto = export_graph(graph)
    del model.opset_import[:]
    model.opset_import.extend(original_opsets)
    feeds = sample_inputs(model, batch=1, seq=4)
    return run(model, feeds, SessionOptions(device="cpu", optimize=False))


def _stand_in_external(graph: gs.Graph) -> None:
    """Weights left in their files (streaming compile) are not read for a probe: a MatMul/Gemm weight
    becomes zeros, computed from one input column (``x[..., :1] @ 0[1, N]``), which only makes attention
    uniform and leaves channel indices flowing as they do with the real weights; other external constants
    (embedding tables, norms) are read."""
    for node in list(graph.nodes):
        w = node.inputs[1] if node.op in ("MatMul", "Gemm") and len(node.inputs) > 1 else None
        if w is None or not is_external(w) or len(w.shape) != 2 or node.attrs.get("transA", 0):
            continue
        trans_b = bool(node.attrs.get("transB", 0)) if node.op == "Gemm" else False
        n = w.shape[0] if trans_b else w.shape[1]
        x = node.inputs[0]
        first = gs.Variable(f"{node.name}__probe_x1", dtype=x.dtype)
        graph.nodes.append(gs.Node("Slice", name=f"{node.name}__probe_slice", inputs=[
            x, gs.Constant(f"{node.name}__probe_s0", np.array([0], np.int64)),
            gs.Constant(f"{node.name}__probe_s1", np.array([1], np.int64)),
            gs.Constant(f"{node.name}__probe_ax", np.array([-1], np.int64))], outputs=[first]))
        node.inputs[0] = first
        node.inputs[1] = gs.Constant(f"{node.name}__probe_w0", np.zeros((n, 1) if trans_b else (1, n), w.dtype))
    for t in graph.tensors().values():
        if is_external(t):
            t.values = read_values(t)
    graph.toposort()
