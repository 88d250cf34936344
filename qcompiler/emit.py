"""From the rewritten graph to the ModelProto we write: opsets, IR version, provenance metadata."""

from __future__ import annotations

import json

import onnx
import onnx_graphsurgeon as gs

from qcompiler import __version__
from qcompiler.graphio import export_graph
from qcompiler.metadata import carry_node_metadata, set_model_properties

# ONNX Runtime 1.2x-1.31 loads IR versions up to 10..13; onnx may default to newer ones.
MAX_IR_VERSION = 10
INT4_TYPES = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def _uses_int4(model: onnx.ModelProto) -> bool:
    return any(t.data_type in INT4_TYPES for t in model.graph.initializer)


def _set_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for op in model.opset_import:
        if op.domain == domain:
            op.version = max(op.version, version)
            return
    model.opset_import.add(domain=domain, version=version)


def emit_model(graph: gs.Graph, original: onnx.ModelProto, properties: dict[str, str]) -> onnx.ModelProto:
    """Export ``graph`` and make it loadable by plain onnxruntime.

    Opset: ``com.microsoft`` 1 when contrib ops are present; the default domain is raised to 21 when
    blocked (u)int4 DequantizeLinear is present (opsets 19-21 only widened types of the ops that
    changed, so raising the number keeps the graph's meaning). IR version 10 (int4 needs 10; ONNX
    Runtime 1.31 rejects newer ones than it knows).
    """
    model = export_graph(graph)
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    domains = {n.domain for n in model.graph.node}
    if "com.microsoft" in domains:
        _set_opset(model, "com.microsoft", 1)
    if any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if current < 19:
            model = onnx.version_converter.convert_version(model, 21)
        _set_opset(model, "", 21)
    model.ir_version = MAX_IR_VERSION if _uses_int4(model) else min(max(original.ir_version, 7), MAX_IR_VERSION)
    model.producer_name = "qcompiler"
    model.producer_version = __version__
    model.graph.name = original.graph.name or "qcompiler"
    carry_node_metadata(original, model)
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    set_model_properties(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in properties.items()})
    return model
