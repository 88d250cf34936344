"""Measure each V·O candidate's head layout by running a probe copy of the model once.

Structure says *which* MatMul is V and which is O; the head size and the query-head -> KV-head map
are then read off the numbers, which works whatever reshapes, transposes, repeats (GQA/MQA) or
slices (fused QKV) the exporter produced:

- in a copy of the graph, every candidate V's output is replaced by a constant that holds, in every
  token, the channel's index (written in base ``B`` digits, one probe run per digit, so that fp16
  rounding cannot confuse neighbours); every O's output is multiplied by zero, so the probes do not
  disturb the rest of the network;
- attention rows sum to one, so O's input then holds, at row ``r``, the index of the V column that
  feeds it. The head size is the last axis of the attention MatMul's V operand.

The original graph is not touched.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.match.pairs import (
    ATTN_VO,
    AttentionCandidate,
    CoupledPair,
    PairRejection,
    pair_id,
    site_value_tensor,
)
from qcompiler.match.view import GraphView

log = logging.getLogger(__name__)

# Relative precision of an attention-weighted average of one value, per float type: the digit base
# keeps the worst case below a quarter of a unit.
_BASE = {"float32": 1 << 12, "float64": 1 << 12, "float16": 32, "bfloat16": 8}


def _redirect(old: gs.Tensor, new: gs.Tensor) -> None:
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def _probe_graph(view: GraphView, candidates: list[AttentionCandidate], digit: int, base: int) -> gs.Graph:
    graph = view.graph.copy()
    tensors = graph.tensors()
    watched = []
    for i, c in enumerate(candidates):
        v = tensors[site_value_tensor(view, c.producer).name]
        dtype = np.dtype(c.producer.dtype)
        index = np.arange(c.producer.n)
        code = ((index // base**digit) % base).astype(dtype)
        zero = gs.Constant(f"__probe_zero_{i}", np.zeros((), dtype))
        probe = gs.Variable(f"__probe_v_{i}", dtype=v.dtype)
        scaled = gs.Variable(f"__probe_vz_{i}", dtype=v.dtype)
        _redirect(v, probe)
        graph.nodes.append(gs.Node("Mul", name=f"__probe_mul_{i}", inputs=[v, zero], outputs=[scaled]))
        graph.nodes.append(gs.Node("Add", name=f"__probe_add_{i}",
                                   inputs=[scaled, gs.Constant(f"__probe_code_{i}", code)], outputs=[probe]))
        o_out = tensors[c.consumer.output]
        silenced = gs.Variable(f"__probe_o_{i}", dtype=o_out.dtype)
        _redirect(o_out, silenced)
        graph.nodes.append(gs.Node("Mul", name=f"__probe_omul_{i}", inputs=[o_out, zero], outputs=[silenced]))
        if o_out in graph.outputs:
            graph.outputs[graph.outputs.index(o_out)] = silenced
        watched += [(tensors[c.consumer.input], dtype), (tensors[c.value_operand], dtype)]
    for t, dtype in watched:
        if t not in graph.outputs:
            t.dtype = t.dtype or dtype
            graph.outputs.append(t)
    graph.toposort()
    return graph


def _run(graph: gs.Graph, original_opsets) -> dict[str, np.ndarray]:
    from qcompiler.graphio import export_graph
    from qcompiler.runtime.inputs import sample_inputs
    from qcompiler.runtime.session import SessionOptions
    from qcompiler.runtime.validate import run

    model = export_graph(graph)
    del model.opset_import[:]
    model.opset_import.extend(original_opsets)
    feeds = sample_inputs(model, batch=1, seq=4)
    return run(model, feeds, SessionOptions(device="cpu", optimize=False))


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
                       num_heads=len(kv_map), num_kv_heads=n_kv, kv_map=tuple(kv_map))


def measure_heads(view: GraphView, candidates: list[AttentionCandidate], opsets
                  ) -> tuple[list[CoupledPair], list[PairRejection]]:
    """Head size and KV map of every candidate, from probe runs of a copy of the graph."""
    if not candidates:
        return [], []
    dtypes = {c.producer.dtype for c in candidates}
    base = min(_BASE.get(d, 8) for d in dtypes)
    digits = max(1, math.ceil(math.log(max(c.producer.n for c in candidates), base)))
    cols = [np.zeros(c.consumer.k, dtype=np.int64) for c in candidates]
    head_dims: list[int] = [0] * len(candidates)
    bad: dict[int, str] = {}
    for digit in range(digits):
        try:
            out = _run(_probe_graph(view, candidates, digit, base), opsets)
        except Exception as e:  # the whole model failed to run: every candidate is unconfirmed
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            return [], [PairRejection(ATTN_VO, c.producer.id, c.consumer.id, f"head probe did not run: {first}")
                        for c in candidates]
        for i, c in enumerate(candidates):
            o_in = np.asarray(out[c.consumer.input], dtype=np.float64).reshape(-1, c.consumer.k)
            head_dims[i] = int(out[c.value_operand].shape[-1])
            values = np.rint(o_in)
            if not np.all(np.abs(o_in - values) < 0.25) or not np.all(values == values[:1]):
                bad.setdefault(i, "O's input is not a per-token copy of V's channels (mixing between channels)")
                continue
            cols[i] += values[0].astype(np.int64) * base**digit
    pairs, rejected = [], []
    for i, c in enumerate(candidates):
        result = bad.get(i) or _interpret(c, cols[i], head_dims[i])
        if isinstance(result, str):
            rejected.append(PairRejection(ATTN_VO, c.producer.id, c.consumer.id, result))
        else:
            pairs.append(result)
    return pairs, rejected
