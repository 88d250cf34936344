"""The terminal view of an inspection: sites, pairs, groups and rejection reasons as plain tables."""

from __future__ import annotations

import os

from qcompiler.inspect.collect import Inspection


def _columns(rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def headline(ins: Inspection) -> str:
    a = ins.analysis
    return (f"{ins.model}: {len(a.sites)} float sites, {len(a.quantized)} quantized, "
            f"{len(a.pairs_of('attn_vo'))} attn_vo + {len(a.pairs_of('mlp_up_down'))} mlp_up_down pairs, "
            f"{len(a.groups)} sibling groups")


def render_page_written(ins: Inspection, path: str | os.PathLike) -> str:
    """What ``inspect --html`` prints instead of the tables: the counts and where the page is."""
    return f"{headline(ins)}, {len(ins.analysis.rejected)} rejected\npage written: {path}"


def render_text(ins: Inspection) -> str:
    a = ins.analysis
    lines = [headline(ins), "", "sites:"]
    rows = [["id", "op", "K x N", "quantization", "rel.err", "pairs"]]
    for s in ins.sites:
        q = (f"{s['storage']} {s['bits']}b b{s['block_size'] or 'ch'} {'sym' if s['symmetric'] else 'asym'}"
             + (f" ({s['method']})" if s.get("method") else "")) if s["state"] == "quantized" else "float"
        err = f"{s['rel_error']:.4f}" if s.get("rel_error") is not None else ""
        rows.append([s["id"], s["op"], f"{s['k']}x{s['n']}", q, err, "; ".join(p.split(" of ")[0] for p in s["pairs"])])
    lines += ["  " + r for r in _columns(rows)]
    lines += ["", "pairs:"]
    rows = [["kind", "producer", "cols", "consumer", "structure"]]
    for p in a.pairs:
        detail = (f"{p.num_heads}x{p.head_dim} heads, {p.num_kv_heads} KV, map {list(p.kv_map)}" if p.kind == "attn_vo"
                  else f"{'gated' if p.gate else 'non-gated'} {p.activation}; exact: {', '.join(p.exact)}")
        rows.append([p.kind, p.producer, f"{p.producer_cols[0]}:{p.producer_cols[1]}", p.consumer, detail])
    lines += ["  " + r for r in _columns(rows)]
    lines += ["", "sibling groups:"] + [f"  {g.id}" for g in a.groups]
    if a.rejected or a.pair_rejections:
        lines += ["", "rejected:"]
        lines += [f"  {r.id or r.node} ({r.op_type}): {r.reason}" for r in a.rejected]
        lines += [f"  {r.kind} {r.producer} -> {r.consumer}: {r.reason}" for r in a.pair_rejections]
    if ins.diff:
        d = ins.diff
        lines += ["", f"diff: {len(d['nodes_added'])} nodes added, {len(d['nodes_removed'])} removed, "
                      f"{len(d['nodes_changed'])} changed; initializers {d['bytes_before'] / 1e6:.1f} MB -> "
                      f"{d['bytes_after'] / 1e6:.1f} MB"]
    return "\n".join(lines)
