"""What structure cannot read from constants: the probe runs the matcher asks for, and how it reads them.

The matcher never runs a model. For an attention V·O candidate it needs the head size and the
query-head -> KV-head map; for a slice of a fused weight whose bounds are computed at run time, the
column range. It asks for them as :class:`~qcompiler.sites.ProbeRequest` s; ``qcompiler.runtime.probe``
runs them on a copy of the graph and hands back :class:`~qcompiler.sites.ProbeResult` s, read here.
"""

from __future__ import annotations

import logging

import numpy as np

from qcompiler.match.pairs import AttentionCandidate, pair_id, site_value_tensor
from qcompiler.match.view import GraphView
from qcompiler.sites import ATTN_VO, CoupledPair, LinearSite, PairRejection, ProbeRequest, ProbeResult

log = logging.getLogger(__name__)


def heads_request(view: GraphView, candidates: list[AttentionCandidate]) -> ProbeRequest:
    """V's channels replaced by their indices, O silenced; O's input and the attention's V operand watched."""
    sources = tuple(c.producer for c in candidates)
    return ProbeRequest(sources, tuple(site_value_tensor(view, s).name for s in sources),
                        tuple(c.consumer for c in candidates),
                        tuple(t for c in candidates for t in (c.consumer.input, c.value_operand)))


def slices_request(view: GraphView, pending: list[tuple[LinearSite, str]]) -> ProbeRequest:
    """The fused sites' channels replaced by their indices; the slices of unknown bounds watched."""
    sources = tuple({s.id: s for s, _ in pending}.values())
    return ProbeRequest(sources, tuple(site_value_tensor(view, s).name for s in sources), (),
                        tuple(t for _, t in pending))


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
                       num_heads=len(kv_map), num_kv_heads=n_kv, kv_map=tuple(kv_map), probs=c.probs, cache=c.cache)


def read_heads(candidates: list[AttentionCandidate], result: ProbeResult
               ) -> tuple[list[CoupledPair], list[PairRejection]]:
    """Head size and KV map of every candidate, from the result of its ``heads_request``."""
    if result.error:
        return [], [PairRejection(ATTN_VO, c.producer.id, c.consumer.id, f"head probe did not run: {result.error}")
                    for c in candidates]
    decoded = result.decoded
    pairs, rejected = [], []
    for c in candidates:
        cols, operand = decoded[c.consumer.input], decoded[c.value_operand]
        found: CoupledPair | str
        if cols is None or operand is None:
            found = "O's input is not a copy of V's channels (mixing between channels)"
        else:
            rows = cols.reshape(-1, c.consumer.k)
            if not np.all(rows == rows[:1]):
                found = "O's input differs between tokens (mixing between channels)"
            else:
                found = _interpret(c, rows[0], int(operand.shape[-1]))
        if isinstance(found, str):
            rejected.append(PairRejection(ATTN_VO, c.producer.id, c.consumer.id, found))
        else:
            pairs.append(found)
    return pairs, rejected


def read_slices(pending: list[tuple[LinearSite, str]], result: ProbeResult) -> dict[str, tuple[int, int]]:
    """Column ranges of slices computed at run time (legacy exports of fused gate_up weights), from the
    result of their ``slices_request``."""
    if result.error:
        log.warning("slice probe did not run: %s", result.error)
        return {}
    known = {}
    for _, name in pending:
        cols = result.decoded.get(name)
        if cols is None:
            continue
        row = cols.reshape(-1, cols.shape[-1])[0]
        if np.array_equal(row, np.arange(row[0], row[0] + len(row))):
            known[name] = (int(row[0]), int(row[0]) + len(row))
    return known
