"""Graph diff between an original model and its compiled version: nodes and initializer bytes."""

from __future__ import annotations

import onnx
from onnx import helper


def _signature(node: onnx.NodeProto) -> tuple:
    attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))[:200]) for a in node.attribute))
    return node.op_type, node.domain, tuple(node.input), tuple(node.output), attrs


def tensor_bytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    n = 1
    for d in t.dims:
        n *= d
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
    if bits:
        return (n * bits + 7) // 8
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def graph_diff(original: onnx.ModelProto, compiled: onnx.ModelProto) -> dict:
    before = {n.name: n for n in original.graph.node}
    after = {n.name: n for n in compiled.graph.node}
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    changed = [n for n in after if n in before and _signature(after[n]) != _signature(before[n])]
    b_init = {t.name: tensor_bytes(t) for t in original.graph.initializer}
    a_init = {t.name: tensor_bytes(t) for t in compiled.graph.initializer}
    rows = [{"name": k, "before": b_init.get(k, 0), "after": a_init.get(k, 0)}
            for k in sorted(set(b_init) | set(a_init))]
    rows.sort(key=lambda r: -max(r["before"], r["after"]))
    return {
        "nodes_added": [{"name": n, "op": after[n].op_type} for n in added],
        "nodes_removed": [{"name": n, "op": before[n].op_type} for n in removed],
        "nodes_changed": [{"name": n, "op_before": before[n].op_type, "op_after": after[n].op_type} for n in changed],
        "initializers": rows,
        "bytes_before": sum(b_init.values()),
        "bytes_after": sum(a_init.values()),
    }
