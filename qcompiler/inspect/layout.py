"""Split a graph into transformer blocks and lay each block out as layers (pure geometry, no drawing).

Blocks come from module paths (``model.layers.3``, ``encoder.layer.3``, ``transformer.h.3``); nodes
without one follow the block of the node before them in graph order, or go to ``input``/``output``.
Each block is laid out top to bottom: a node's layer is its longest path from the block's inputs;
within a layer, nodes are ordered by the mean position of their producers (two sweeps).
"""

from __future__ import annotations

import re
from collections import OrderedDict, defaultdict
from typing import Any

import onnx

_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers?|h|blocks?|block)\.\d+)(?:\.|$)")
NODE_W, NODE_H, GAP_X, GAP_Y = 150, 30, 24, 34
_HIDDEN = {"Constant"}


def block_of(path: str | None) -> str | None:
    if not path:
        return None
    m = _LAYER.match(path)
    return m.group(1) if m else None


def assign_blocks(model: onnx.ModelProto, paths: dict[str, str]) -> OrderedDict[str, list[str]]:
    nodes = [n for n in model.graph.node if n.op_type not in _HIDDEN]
    named = [block_of(paths.get(n.name)) for n in nodes]
    last_block = max((i for i, b in enumerate(named) if b), default=-1)
    blocks: OrderedDict[str, list[str]] = OrderedDict()
    current = "input"
    for i, (node, b) in enumerate(zip(nodes, named, strict=True)):
        if b:
            current = b
        elif i > last_block and last_block >= 0:
            current = "output"
        blocks.setdefault(current, []).append(node.name)
    return blocks


def layout_block(model: onnx.ModelProto, block: str, names: list[str], analysis, rows: list[dict],
                 diff: dict | None) -> dict[str, Any]:
    keep = set(names)
    nodes = [n for n in model.graph.node if n.name in keep]
    producer = {o: n.name for n in nodes for o in n.output}
    preds: dict[str, list[str]] = defaultdict(list)
    edges = []
    for n in nodes:
        for t in n.input:
            if t in producer and producer[t] != n.name:
                preds[n.name].append(producer[t])
                edges.append({"from": producer[t], "to": n.name, "tensor": t})
    level: dict[str, int] = {}
    for n in nodes:  # graph order is topological
        level[n.name] = 1 + max((level[p] for p in preds[n.name] if p in level), default=-1)
    layers: dict[int, list[str]] = defaultdict(list)
    for n in nodes:
        layers[level[n.name]].append(n.name)
    pos: dict[str, float] = {}
    for _ in range(2):
        for lv in sorted(layers):
            row = layers[lv]
            bary = {m: (sum(pos.get(p, 0) for p in preds[m]) / len(preds[m]) if preds[m] else pos.get(m, i))
                    for i, m in enumerate(row)}
            row.sort(key=lambda m: bary[m])
            for i, m in enumerate(row):
                pos[m] = i
    site_rows = {r["node"]: r for r in rows}
    added = {d["name"] for d in (diff or {}).get("nodes_added", [])}
    changed = {d["name"] for d in (diff or {}).get("nodes_changed", [])}
    width = max((len(r) for r in layers.values()), default=1)
    out_nodes = []
    for n in nodes:
        row = site_rows.get(n.name)
        classes = []
        if row:
            classes.append("site-quant" if row["state"] == "quantized" else "site-float")
            if any(p.startswith(("V ", "O ")) for p in row["pairs"]):
                classes.append("pair-vo")
            if any(p.startswith(("up ", "down ", "gate ")) for p in row["pairs"]):
                classes.append("pair-mlp")
        if n.op_type in ("MatMulNBits", "DequantizeLinear"):
            classes.append("quant-op")
        if n.name in added:
            classes.append("added")
        if n.name in changed:
            classes.append("changed")
        layer_row = layers[level[n.name]]
        offset = (width - len(layer_row)) / 2
        label = n.op_type if not row else f"{n.op_type}: {row['id'].split('.')[-1]}"
        tip = [n.name, f"op {n.op_type}"] + ([f"site {row['id']} K={row['k']} N={row['n']}", row["state"]]
                                             + row["pairs"] if row else [])
        out_nodes.append({"name": n.name, "label": label[:26], "tip": "\n".join(tip), "classes": classes,
                          "x": (offset + pos[n.name]) * (NODE_W + GAP_X) + GAP_X, "y": level[n.name] * (NODE_H + GAP_Y)
                          + GAP_Y, "w": NODE_W, "h": NODE_H})
    return {"name": block, "nodes": out_nodes, "edges": edges,
            "width": width * (NODE_W + GAP_X) + GAP_X, "height": (len(layers) + 1) * (NODE_H + GAP_Y)}
