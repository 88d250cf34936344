"""Collect what ``inspect`` shows: sites (float or quantized, with the compile's per-site errors), pairs,
sibling groups, rejections with their reasons, the graph per block, and optionally a diff."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from qcompiler.analyze import analyze
from qcompiler.inspect.diff import graph_diff
from qcompiler.inspect.layout import assign_blocks, layout_block
from qcompiler.metadata import SITES, model_properties, module_paths
from qcompiler.sites import Analysis, CoupledPair

log = logging.getLogger(__name__)


def pair_json(p: CoupledPair) -> dict[str, Any]:
    out = {"id": p.id, "kind": p.kind, "producer": p.producer, "consumer": p.consumer,
           "producer_cols": list(p.producer_cols), "exact": list(p.exact)}
    if p.kind == "attn_vo":
        out.update(heads=p.num_heads, kv_heads=p.num_kv_heads, head_dim=p.head_dim, kv_map=list(p.kv_map))
    else:
        out.update(gated=p.gate is not None, gate=p.gate, gate_cols=list(p.gate_cols) if p.gate_cols else None,
                   activation=p.activation)
    return out


@dataclass
class Inspection:
    model: str
    properties: dict[str, str]
    analysis: Analysis
    sites: list[dict[str, Any]]
    blocks: list[dict[str, Any]] = field(default_factory=list)
    diff: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        a = self.analysis
        return {
            "model": self.model,
            "properties": {k: v for k, v in self.properties.items() if k != SITES},
            "sites": self.sites,
            "pairs": [pair_json(p) for p in a.pairs],
            "groups": [asdict(g) for g in a.groups],
            "rejected": [asdict(r) for r in a.rejected],
            "pair_rejections": [asdict(r) for r in a.pair_rejections],
            **({"diff": self.diff} if self.diff is not None else {}),
        }


def _site_rows(analysis: Analysis, props: dict[str, str]) -> list[dict[str, Any]]:
    compiled = {}
    try:
        compiled = {s["id"]: s for s in json.loads(props.get(SITES, "[]"))}
    except json.JSONDecodeError:
        log.warning("ignoring unreadable %s metadata", SITES)
    by_node = {s.get("node"): s for s in compiled.values()}
    method = props.get("qcompiler.method")
    roles: dict[str, list[str]] = {}
    for p in analysis.pairs:
        roles.setdefault(p.producer, []).append(f"{'V' if p.kind == 'attn_vo' else 'up'} of {p.id}")
        roles.setdefault(p.consumer, []).append(f"{'O' if p.kind == 'attn_vo' else 'down'} of {p.id}")
        if p.gate:
            roles.setdefault(p.gate, []).append(f"gate of {p.id}")
    groups = {m: g.id for g in analysis.groups for m in g.members}
    rows = []
    for s in analysis.sites:
        rows.append({"id": s.id, "node": s.node, "op": s.op_type, "k": s.k, "n": s.n, "role": s.role,
                     "state": "float", "dtype": s.dtype, "pairs": roles.get(s.id, []), "group": groups.get(s.id)})
    for q in analysis.quantized:
        s = q.site
        info = compiled.get(s.id) or next((v for k, v in by_node.items() if k and s.node.startswith(k)), {})
        rows.append({"id": s.id, "node": s.node, "op": s.op_type, "k": s.k, "n": s.n, "role": s.role,
                     "state": "quantized", "storage": q.storage, "bits": info.get("bits", q.bits),
                     "block_size": q.block_size, "symmetric": q.symmetric, "method": method,
                     "rel_error": info.get("rel_error"), "proxy_error": info.get("proxy_error"),
                     "storage_bits": info.get("storage_bits"), "pairs": roles.get(s.id, []), "group": groups.get(s.id)})
    return rows


def _label_initializers(diff: dict[str, Any], original: onnx.ModelProto) -> None:
    """Name the site behind each initializer row (its weight, or the tensors the compiler derived from it)."""
    from qcompiler.graphio import import_graph
    from qcompiler.match.sites import find_linear_sites

    sites = find_linear_sites(import_graph(original), None, module_paths(original)).sites
    owners = sorted(((s.weight, s.id) for s in sites), key=lambda x: -len(x[0]))
    for row in diff["initializers"]:
        row["site"] = next((sid for w, sid in owners if row["name"] == w or row["name"].startswith(w + "_")), None)


def inspect_model(model: onnx.ModelProto, name: str = "", against: onnx.ModelProto | None = None,
                  with_graph: bool = False) -> Inspection:
    props = model_properties(model)
    analysis = analyze(model)
    rows = _site_rows(analysis, props)
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    rows.sort(key=lambda r: order.get(r["node"], 0))
    diff = graph_diff(against, model) if against is not None else None
    if diff is not None:
        _label_initializers(diff, against)
    blocks = []
    if with_graph:
        blocks = [layout_block(model, b, nodes, analysis, rows, diff)
                  for b, nodes in assign_blocks(model, module_paths(model)).items()]
    return Inspection(name, props, analysis, rows, blocks, diff)
