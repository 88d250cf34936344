"""The matcher's driver: everything it knows about a model, in one frozen ``Analysis`` (sites, pairs,
groups, reasons; the type lives in :mod:`qcompiler.sites`).

The matcher reads graphs and never runs them. ``match_graph`` reads what structure tells; what it cannot
read from constants (head sizes, KV maps, run-time slice bounds) it asks for as probe requests
(``Matching.requests``), and ``Matching.finish`` reads the probe's results, handed in as data, into the
``Analysis``. ``qcompiler.analyze`` runs the probe (``qcompiler.runtime.probe``) between the two.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from qcompiler.config import MatchConfig
from qcompiler.match.contrib import contrib_attention_pairs
from qcompiler.match.measure import heads_request, read_heads, read_slices, slices_request
from qcompiler.match.pairs import AttentionCandidate, find_attention_candidates, find_mlp_pairs, find_sibling_groups
from qcompiler.match.sites import find_linear_sites, find_quantized_sites
from qcompiler.match.view import GraphView
from qcompiler.metadata import module_paths
from qcompiler.sites import (
    Analysis,
    CoupledPair,
    LinearSite,
    MatchResult,
    PairRejection,
    ProbeRequest,
    ProbeResult,
    QuantizedSite,
)

log = logging.getLogger(__name__)

# the probe requests a Matching may make
HEADS = "heads"  # head size and KV map of the attention V·O candidates
SLICES = "slices"  # column ranges of fused-weight slices whose bounds are computed at run time


@dataclass(frozen=True)
class Matching:
    """What structure tells about a graph, before measurements: ``requests`` are the probe runs the
    matcher needs, ``finish`` turns their results into the ``Analysis``."""

    view: GraphView
    match: MatchResult
    quantized: tuple[QuantizedSite, ...]
    every: tuple[LinearSite, ...]  # float and quantized sites, graph order
    order: Mapping[str, int]  # node name -> position in the graph
    candidates: tuple[AttentionCandidate, ...]
    attn_rejected: tuple[PairRejection, ...]
    mlp_pairs: tuple[CoupledPair, ...]
    mlp_rejected: tuple[PairRejection, ...]
    pending: tuple[tuple[LinearSite, str], ...]  # (fused site, slice output) whose column range is unknown
    attn_pairs: tuple[CoupledPair, ...] = ()  # V·O pairs read from attributes (contrib attention ops), unprobed

    @property
    def requests(self) -> dict[str, ProbeRequest]:
        """The probe runs to make (``HEADS``, ``SLICES``), none when structure told everything."""
        requests = {}
        if self.candidates:
            requests[HEADS] = heads_request(self.view, list(self.candidates))
        if self.pending:
            requests[SLICES] = slices_request(self.view, list(self.pending))
        return requests

    def finish(self, measured: Mapping[str, ProbeResult] | None = None) -> Analysis:
        """The analysis, with the probe's results for ``requests`` (by name); a request without a result
        is left unmeasured: its candidates give no pair and no rejection."""
        measured = measured or {}
        every = list(self.every)
        attn_pairs, probe_rejected = ([], []) if HEADS not in measured else \
            read_heads(list(self.candidates), measured[HEADS])
        attn_pairs = list(self.attn_pairs) + attn_pairs
        mlp_pairs, mlp_rejected = list(self.mlp_pairs), list(self.mlp_rejected)
        if self.pending and SLICES in measured:
            known = read_slices(list(self.pending), measured[SLICES])
            if known:
                mlp_pairs, mlp_rejected, _ = find_mlp_pairs(self.view, every, known)
        pairs = sorted(attn_pairs + mlp_pairs, key=lambda p: self.order.get(_node_of(every, p.producer), 0))
        log.info("matched %d sites (%d already quantized), %d attn_vo + %d mlp_up_down pairs",
                 len(self.match.sites), len(self.quantized), len(attn_pairs), len(mlp_pairs))
        return Analysis(self.match.sites, self.quantized, self.match.rejected, tuple(pairs),
                        tuple(list(self.attn_rejected) + probe_rejected + mlp_rejected),
                        tuple(find_sibling_groups(every)))


def match_graph(graph: gs.Graph, model: onnx.ModelProto, config: MatchConfig | None = None) -> Matching:
    """Match ``graph`` (imported from ``model``, which supplies metadata); read-only, runs nothing."""
    paths = module_paths(model)
    match = find_linear_sites(graph, config, paths)
    quantized = find_quantized_sites(graph, paths)
    every = list(match.sites) + [q.site for q in quantized]
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    every.sort(key=lambda s: order.get(s.node, 0))
    view = GraphView(graph)
    reasons = {r.node: r.reason for r in match.rejected}
    candidates, attn_rejected = find_attention_candidates(view, every, reasons)
    contrib_pairs, contrib_rejected = contrib_attention_pairs(view, every, reasons)
    mlp_pairs, mlp_rejected, pending = find_mlp_pairs(view, every)
    return Matching(view, match, tuple(quantized), tuple(every), order, tuple(candidates),
                    tuple(attn_rejected + contrib_rejected), tuple(mlp_pairs), tuple(mlp_rejected), tuple(pending),
                    tuple(contrib_pairs))


def _node_of(sites: list[LinearSite], site_id: str) -> str:
    return next((s.node for s in sites if s.id == site_id), "")
