"""Everything the matcher knows about a model, in one frozen object: sites, pairs, groups, reasons."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.config import MatchConfig
from qcompiler.match.pairs import (
    CoupledPair,
    PairRejection,
    SiblingGroup,
    find_attention_candidates,
    find_mlp_pairs,
    find_sibling_groups,
)
from qcompiler.match.probe import ProbeError, measure_heads, probe
from qcompiler.match.sites import LinearSite, QuantizedSite, Rejection, find_linear_sites, find_quantized_sites
from qcompiler.match.view import GraphView
from qcompiler.metadata import module_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analysis:
    sites: tuple[LinearSite, ...]  # float sites the compiler may quantize
    quantized: tuple[QuantizedSite, ...]  # sites already quantized (compiled models)
    rejected: tuple[Rejection, ...]
    pairs: tuple[CoupledPair, ...]
    pair_rejections: tuple[PairRejection, ...]
    groups: tuple[SiblingGroup, ...]

    def pairs_of(self, kind: str) -> list[CoupledPair]:
        return [p for p in self.pairs if p.kind == kind]

    def to_json(self) -> dict:
        return {
            "sites": [asdict(s) for s in self.sites],
            "quantized": [{**asdict(q.site), "storage": q.storage, "bits": q.bits, "block_size": q.block_size,
                           "symmetric": q.symmetric} for q in self.quantized],
            "rejected": [asdict(r) for r in self.rejected],
            "pairs": [asdict(p) for p in self.pairs],
            "pair_rejections": [asdict(r) for r in self.pair_rejections],
            "groups": [asdict(g) for g in self.groups],
        }


def analyze_graph(graph: gs.Graph, model: onnx.ModelProto, config: MatchConfig | None = None,
                  probe_heads: bool = True) -> Analysis:
    """Match ``graph`` (imported from ``model``, which supplies metadata and opsets); read-only."""
    paths = module_paths(model)
    match = find_linear_sites(graph, config, paths)
    quantized = find_quantized_sites(graph, paths)
    every = list(match.sites) + [q.site for q in quantized]
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    every.sort(key=lambda s: order.get(s.node, 0))
    view = GraphView(graph)
    candidates, attn_rejected = find_attention_candidates(view, every, {r.node: r.reason for r in match.rejected})
    if probe_heads:
        attn_pairs, probe_rejected = measure_heads(view, candidates, model.opset_import)
    else:
        attn_pairs, probe_rejected = [], []
    mlp_pairs, mlp_rejected, pending = find_mlp_pairs(view, every)
    if pending and probe_heads:
        known = _probe_slices(view, model, pending)
        if known:
            mlp_pairs, mlp_rejected, _ = find_mlp_pairs(view, every, known)
    pairs = sorted(attn_pairs + mlp_pairs, key=lambda p: order.get(_node_of(every, p.producer), 0))
    log.info("matched %d sites (%d already quantized), %d attn_vo + %d mlp_up_down pairs",
             len(match.sites), len(quantized), len(attn_pairs), len(mlp_pairs))
    return Analysis(match.sites, tuple(quantized), match.rejected, tuple(pairs),
                    tuple(attn_rejected + probe_rejected + mlp_rejected), tuple(find_sibling_groups(every)))


def _probe_slices(view: GraphView, model: onnx.ModelProto, pending: list[tuple[LinearSite, str]]
                  ) -> dict[str, tuple[int, int]]:
    """Column ranges of slices computed at run time (legacy exports of fused gate_up weights)."""
    sources = list({s.id: s for s, _ in pending}.values())
    try:
        decoded = probe(view, model.opset_import, sources, [], [t for _, t in pending])
    except ProbeError as e:
        log.warning("slice probe did not run: %s", e)
        return {}
    known = {}
    for _, name in pending:
        cols = decoded.get(name)
        if cols is None:
            continue
        row = cols.reshape(-1, cols.shape[-1])[0]
        if np.array_equal(row, np.arange(row[0], row[0] + len(row))):
            known[name] = (int(row[0]), int(row[0]) + len(row))
    return known


def _node_of(sites: list[LinearSite], site_id: str) -> str:
    return next((s.node for s in sites if s.id == site_id), "")


def analyze(model: onnx.ModelProto, config: MatchConfig | None = None, probe_heads: bool = True) -> Analysis:
    from qcompiler.graphio import import_graph

    return analyze_graph(import_graph(model), model, config, probe_heads)
