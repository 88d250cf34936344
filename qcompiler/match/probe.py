"""Measure what structure cannot read from constants, by running a probe copy of the model.

Structure says *which* MatMul is V and which is O; the head size, the query-head -> KV-head map and the
column ranges of run-time-computed slices (fused weights in legacy exports) are then read off numbers,
whatever reshapes, transposes, repeats (GQA/MQA) or slices the exporter produced:

- in a copy of the graph, a probed site's output is replaced by a constant that holds, in every token,
  the channel's index (in base ``B`` digits, one run per digit, so that fp16 rounding cannot confuse
  neighbours); O outputs are multiplied by zero, so the probes do not disturb the rest of the network;
- layout ops and slices move those indices unchanged, and attention rows sum to one, so a watched
  tensor downstream holds, at each position, the index of the column that feeds it.

The original graph is not touched.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.errors import first_line
from qcompiler.external import is_external, read_values
from qcompiler.graphio import redirect_consumers
from qcompiler.match.pairs import (
    ATTN_VO,
    AttentionCandidate,
    CoupledPair,
    PairRejection,
    pair_id,
    site_value_tensor,
)
from qcompiler.match.sites import LinearSite
from qcompiler.match.view import GraphView

log = logging.getLogger(__name__)

# Relative precision of an attention-weighted average of one value, per float type: the digit base
# keeps the worst case below a quarter of a unit.
_BASE = {"float32": 1 << 12, "float64": 1 << 12, "float16": 32, "bfloat16": 8}


class ProbeError(RuntimeError):
    pass


def _probe_graph(view: GraphView, sources: list[LinearSite], silence: list[LinearSite],
                 watch: list[str], digit: int, base: int) -> gs.Graph:
    graph = view.graph.copy()
    tensors = graph.tensors()
    for i, site in enumerate(sources):
        v = tensors[site_value_tensor(view, site).name]
        dtype = np.dtype(site.dtype)
        code = ((np.arange(site.n) // base**digit) % base).astype(dtype)
        zero = gs.Constant(f"__probe_zero_{i}", np.zeros((), dtype))
        probe = gs.Variable(f"__probe_v_{i}", dtype=v.dtype)
        scaled = gs.Variable(f"__probe_vz_{i}", dtype=v.dtype)
        redirect_consumers(v, probe)
        graph.nodes.append(gs.Node("Mul", name=f"__probe_mul_{i}", inputs=[v, zero], outputs=[scaled]))
        graph.nodes.append(gs.Node("Add", name=f"__probe_add_{i}",
                                   inputs=[scaled, gs.Constant(f"__probe_code_{i}", code)], outputs=[probe]))
    for i, site in enumerate(silence):
        o_out = tensors[site.output]
        zero = gs.Constant(f"__probe_ozero_{i}", np.zeros((), np.dtype(site.dtype)))
        silenced = gs.Variable(f"__probe_o_{i}", dtype=o_out.dtype)
        redirect_consumers(o_out, silenced)
        graph.nodes.append(gs.Node("Mul", name=f"__probe_omul_{i}", inputs=[o_out, zero], outputs=[silenced]))
        if o_out in graph.outputs:
            graph.outputs[graph.outputs.index(o_out)] = silenced
    dtype = np.dtype(sources[0].dtype) if sources else np.dtype(np.float32)
    for name in watch:
        t = tensors[name]
        if t not in graph.outputs:
            t.dtype = t.dtype or dtype
            graph.outputs.append(t)
    graph.toposort()
    return graph


def probe(view: GraphView, opsets, sources: list[LinearSite], silence: list[LinearSite],
          watch: list[str]) -> dict[str, np.ndarray | None]:
    """Watched tensor -> the column index of ``sources`` it holds at every position (int64), or None
    where it does not hold whole indices (the values were mixed). Raises ProbeError if the model fails."""
    watch = list(dict.fromkeys(watch))
    base = min(_BASE.get(s.dtype, 8) for s in sources)
    digits = max(1, math.ceil(math.log(max(s.n for s in sources), base)))
    decoded: dict[str, np.ndarray | None] = {}
    for digit in range(digits):
        try:
            out = _run(_probe_graph(view, sources, silence, watch, digit, base), opsets)
        except Exception as e:
            raise ProbeError(first_line(e, 200)) from e
        for name in watch:
            value = np.asarray(out[name], dtype=np.float64)
            whole = np.rint(value)
            if name in decoded and decoded[name] is None:
                continue
            if not np.all(np.abs(value - whole) < 0.25):
                decoded[name] = None
                continue
            decoded[name] = decoded.get(name, 0) + whole.astype(np.int64) * base**digit
    return decoded


def _run(graph: gs.Graph, original_opsets) -> dict[str, np.ndarray]:
    from qcompiler.graphio import export_graph
    from qcompiler.runtime.inputs import sample_inputs
    from qcompiler.runtime.session import SessionOptions
    from qcompiler.runtime.validate import run

    _stand_in_external(graph)
    model = export_graph(graph)
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


def _interpret(c: AttentionCandidate, cols: np.ndarray, head_dim: int) -> CoupledPair | str:
    k_o, n_v = c.consumer.k, c.producer.n
    if head_dim <= 0 or k_o % head_dim:
        return f"O's input width {k_o} is not a multiple of the head size {head_dim}"
    lo, hi = int(cols.min()), int(cols.max()) + 1
    used = np.unique(cols)
    if len(used) != hi - lo or (hi - lo) % head_dim or hi > n_v:
        return f"O reads V columns {lo}..{hi - 1} with gaps or out of range (V has {n_v})"
    kv_map = []
    for j in range(k_o // head_dim):
        block = cols[j * head_dim:(j + 1) * head_dim] - lo
        h = int(block[0]) // head_dim
        if block[0] % head_dim or not np.array_equal(block, h * head_dim + np.arange(head_dim)):
            return f"query head {j} does not read one whole V head in order"
        kv_map.append(h)
    n_kv = (hi - lo) // head_dim
    return CoupledPair(pair_id(c.producer.id, c.consumer.id, ATTN_VO), ATTN_VO, c.producer.id, c.consumer.id,
                       (lo, hi), ("per_kv_head_matrix", "diagonal", "permutation"), head_dim=head_dim,
                       num_heads=len(kv_map), num_kv_heads=n_kv, kv_map=tuple(kv_map), probs=c.probs)


def measure_heads(view: GraphView, candidates: list[AttentionCandidate], opsets
                  ) -> tuple[list[CoupledPair], list[PairRejection]]:
    """Head size and KV map of every candidate, from probe runs of a copy of the graph."""
    if not candidates:
        return [], []
    watch = [t for c in candidates for t in (c.consumer.input, c.value_operand)]
    try:
        decoded = probe(view, opsets, [c.producer for c in candidates], [c.consumer for c in candidates], watch)
    except ProbeError as e:
        return [], [PairRejection(ATTN_VO, c.producer.id, c.consumer.id, f"head probe did not run: {e}")
                    for c in candidates]
    pairs, rejected = [], []
    for c in candidates:
        cols, operand = decoded[c.consumer.input], decoded[c.value_operand]
        result: CoupledPair | str
        if cols is None or operand is None:
            result = "O's input is not a copy of V's channels (mixing between channels)"
        else:
            rows = cols.reshape(-1, c.consumer.k)
            if not np.all(rows == rows[:1]):
                result = "O's input differs between tokens (mixing between channels)"
            else:
                result = _interpret(c, rows[0], int(operand.shape[-1]))
        if isinstance(result, str):
            rejected.append(PairRejection(ATTN_VO, c.producer.id, c.consumer.id, result))
        else:
            pairs.append(result)
    return pairs, rejected
