"""A self-contained HTML page (no network): the graph one block at a time, sites, pairs, groups, diff.

Tables are written here; the graph of the selected block is drawn in the browser as SVG from the
embedded layout. When drawing succeeds the page sets ``<body data-rendered="ok">``; a script error sets
``data-rendered="error"`` and shows the message (the headless-browser test reads both).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from qcompiler.inspect.collect import Inspection, pair_json

_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#fafbfc}
header{padding:12px 20px;background:#1d2330;color:#fff}header h1{font-size:18px;margin:0}
header .sub{opacity:.75}main{padding:12px 20px}section{margin:18px 0}
h2{font-size:15px;border-bottom:1px solid #d6dae0;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #e1e4e8;padding:2px 6px;text-align:left}
th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.legend span{display:inline-block;margin-right:14px}.sw{display:inline-block;width:14px;height:10px;
border:2px solid #888;vertical-align:middle;margin-right:4px}
#graph{border:1px solid #d6dae0;background:#fff;overflow:auto;max-height:75vh}
#controls{margin:6px 0}#controls button,#controls select{font-size:13px;margin-right:6px}
svg text{font-size:11px;pointer-events:none;font-family:system-ui,sans-serif}
.node rect{fill:#eef1f5;stroke:#8a94a6;stroke-width:1}
.node.site-float rect{fill:#dbe8ff;stroke:#2f6fde}.node.site-quant rect,.node.quant-op rect{fill:#ffe2c2;stroke:#d9730d}
.node.added rect{stroke-dasharray:5 3;stroke:#d12f2f;stroke-width:2.5}
.node.changed rect{stroke:#c99a00;stroke-width:2.5}
.node.pair-vo rect{stroke:#7b2fd6;stroke-width:3}.node.pair-mlp rect{stroke:#138a52;stroke-width:3}
.edge{fill:none;stroke:#aab2bf;stroke-width:1.2}#errors{color:#b00020;white-space:pre-wrap}
"""

_JS = """
window.onerror = function (msg, src, line) {
  document.getElementById('errors').textContent += 'error: ' + msg + ' (line ' + line + ')\\n';
  document.body.dataset.rendered = 'error';
};
(function () {
  var data = JSON.parse(document.getElementById('graph-data').textContent);
  var NS = 'http://www.w3.org/2000/svg';
  var select = document.getElementById('block');
  data.blocks.forEach(function (b, i) {
    var o = document.createElement('option'); o.value = i; o.textContent = b.name + ' (' + b.nodes.length + ' nodes)';
    select.appendChild(o);
  });
  function el(tag, attrs, parent) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function draw(i) {
    var b = data.blocks[i], box = document.getElementById('graph');
    box.innerHTML = '';
    var svg = el('svg', {width: b.width, height: b.height, viewBox: '0 0 ' + b.width + ' ' + b.height}, box);
    var at = {};
    b.nodes.forEach(function (n) { at[n.name] = n; });
    b.edges.forEach(function (e) {
      var a = at[e.from], c = at[e.to];
      if (!a || !c) return;
      var x1 = a.x + a.w / 2, y1 = a.y + a.h, x2 = c.x + c.w / 2, y2 = c.y, my = (y1 + y2) / 2;
      var p = el('path', {d: 'M' + x1 + ',' + y1 + ' C' + x1 + ',' + my + ' ' + x2 + ',' + my + ' ' + x2 + ',' + y2,
                          'class': 'edge'}, svg);
      el('title', {}, p).textContent = e.tensor;
    });
    b.nodes.forEach(function (n) {
      var g = el('g', {'class': 'node ' + n.classes.join(' '), 'data-name': n.name}, svg);
      el('rect', {x: n.x, y: n.y, width: n.w, height: n.h, rx: 5}, g);
      el('text', {x: n.x + 6, y: n.y + n.h / 2 + 4}, g).textContent = n.label;
      el('title', {}, g).textContent = n.tip;
    });
    select.value = i;
    document.getElementById('count').textContent = (i + 1) + ' / ' + data.blocks.length;
  }
  document.getElementById('prev').onclick = function () { draw(Math.max(0, +select.value - 1)); };
  document.getElementById('next').onclick = function () { draw(Math.min(data.blocks.length - 1, +select.value + 1)); };
  select.onchange = function () { draw(+select.value); };
  var first = -1;
  data.blocks.forEach(function (b, i) { if (first < 0 && b.name !== 'input') first = i; });
  if (data.blocks.length) draw(Math.max(first, 0));
  if (document.body.dataset.rendered !== 'error') document.body.dataset.rendered = 'ok';
})();
"""


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = "".join(f"<td{' class=num' if i in numeric else ''}>{html.escape('' if v is None else str(v))}</td>"
                        for i, v in enumerate(r))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def _sites_table(ins: Inspection) -> str:
    rows = []
    for s in ins.sites:
        q = (f"{s['bits']}-bit, block {s['block_size'] or 'channel'}, {'sym' if s['symmetric'] else 'asym'}"
             if s["state"] == "quantized" else "float")
        rows.append([s["id"], s["op"], f"{s['k']}x{s['n']}", q, s.get("method") or "", _fmt(s.get("rel_error")),
                     "; ".join(s["pairs"]), s.get("group") or ""])
    return _table(["site", "op", "K x N", "quantization", "method", "rel. error", "pairs", "group"], rows, {5})


def _pairs_table(ins: Inspection) -> str:
    rows = []
    for p in ins.analysis.pairs:
        j = pair_json(p)
        detail = (f"{j['heads']} heads x {j['head_dim']}, {j['kv_heads']} KV, map {j['kv_map']}" if p.kind == "attn_vo"
                  else f"{'gated by ' + (j['gate'] or '') if j['gated'] else 'non-gated'}, act {j['activation']}")
        rows.append([p.kind, p.producer, f"{p.producer_cols[0]}:{p.producer_cols[1]}", p.consumer, detail,
                     ", ".join(p.exact)])
    return _table(["kind", "producer", "columns", "consumer", "structure", "exact transforms"], rows)


def _diff_section(diff: dict) -> str:
    def mb(n):
        return f"{n / 1e6:.3f}"

    inits = [[r["name"], r.get("site") or "", mb(r["before"]), mb(r["after"])]
             for r in diff["initializers"] if r["before"] != r["after"]]
    return (f"<section><h2>Diff against the original</h2><p>{len(diff['nodes_added'])} nodes added, "
            f"{len(diff['nodes_removed'])} removed, {len(diff['nodes_changed'])} changed; initializers "
            f"{mb(diff['bytes_before'])} MB &rarr; {mb(diff['bytes_after'])} MB.</p>"
            "<details><summary>nodes added / removed / changed</summary>"
            + _table(["added", "op"], [[d["name"], d["op"]] for d in diff["nodes_added"]])
            + _table(["removed", "op"], [[d["name"], d["op"]] for d in diff["nodes_removed"]])
            + _table(["changed", "op before", "op after"],
                     [[d["name"], d["op_before"], d["op_after"]] for d in diff["nodes_changed"]])
            + "</details><h3>Initializer bytes (MB), before and after</h3>"
            + _table(["initializer", "site", "before", "after"], inits, {2, 3}) + "</section>")


def render_html(ins: Inspection) -> str:
    a = ins.analysis
    n_vo, n_mlp = len(a.pairs_of("attn_vo")), len(a.pairs_of("mlp_up_down"))
    shown = ("qcompiler.method", "qcompiler.quant", "qcompiler.format", "qcompiler.model_kind")
    props = {k: v for k, v in ins.properties.items() if k in shown}
    graph_data = json.dumps({"blocks": ins.blocks}).replace("</", "<\\/")
    rejections = [[r.node, r.op_type, r.id or "", r.reason] for r in a.rejected]
    pair_rej = [[r.kind, r.producer, r.consumer or "", r.reason] for r in a.pair_rejections]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qcompiler inspect: {html.escape(ins.model)}</title>
<style>{_CSS}</style></head>
<body data-rendered="no">
<header><h1>{html.escape(ins.model)}</h1><div class="sub">{len(a.sites)} float sites, {len(a.quantized)} quantized,
{n_vo} attn_vo + {n_mlp} mlp_up_down pairs, {len(a.groups)} sibling groups
{html.escape(' '.join(f'{k[10:]}={v}' for k, v in props.items()))}</div></header>
<main>
<div id="errors"></div>
<section><h2>Graph, one block at a time</h2>
<div class="legend"><span><i class="sw" style="background:#dbe8ff;border-color:#2f6fde"></i>float site</span>
<span><i class="sw" style="background:#ffe2c2;border-color:#d9730d"></i>quantized</span>
<span><i class="sw" style="border-color:#7b2fd6"></i>attn_vo pair</span>
<span><i class="sw" style="border-color:#138a52"></i>mlp_up_down pair</span>
<span><i class="sw" style="border-color:#d12f2f;border-style:dashed"></i>inserted</span>
<span><i class="sw" style="border-color:#c99a00"></i>rewritten</span></div>
<div id="controls"><button id="prev">&larr;</button><select id="block"></select><button id="next">&rarr;</button>
<span id="count"></span> (hover a node for details)</div>
<div id="graph"></div></section>
<section><h2>Sites</h2>{_sites_table(ins)}</section>
<section><h2>Coupled pairs</h2>{_pairs_table(ins)}</section>
<section><h2>Sibling groups</h2>{_table(["group", "input", "members"],
                                        [[g.id, g.input, ", ".join(g.members)] for g in a.groups])}</section>
<section><h2>Rejected candidates</h2>{_table(["node", "op", "id", "reason"], rejections)}
{_table(["pair kind", "producer", "consumer", "reason"], pair_rej) if pair_rej else ""}</section>
{_diff_section(ins.diff) if ins.diff else ""}
</main>
<script type="application/json" id="graph-data">{graph_data}</script>
<script>{_JS}</script>
</body></html>
"""


def write_html(ins: Inspection, path: str | os.PathLike) -> Path:
    """Atomic write of the page."""
    from qcompiler.graphio import write_text_atomic

    return write_text_atomic(path, render_html(ins))
