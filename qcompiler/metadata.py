"""The one module that reads exporter metadata: stable module paths for nodes.

The torch dynamo exporter records, on every node, ``pkg.torch.onnx.name_scopes``: the module
hierarchy down to the aten op, e.g. ``['', 'inner', 'inner.model.layers.0.self_attn.q_proj', 'linear']``.
The module path of a node is the entry before the op's name, with the frontend's wrapper prefix
(recorded in the model's ``qcompiler.scope_prefix`` property) removed. onnx-graphsurgeon drops node
metadata, so the paths are read from the ModelProto, keyed by node name.
"""

from __future__ import annotations

import ast
import json

import onnx

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
SCOPE_PREFIX = "qcompiler.scope_prefix"
TOKENIZER = "qcompiler.tokenizer"
SITES = "qcompiler.sites"  # JSON: per-site quantization of a compiled model (bits, block, errors)
MODEL_KIND = "qcompiler.model_kind"
# JSON, on a causal LM exported with a KV cache: {"layers", "kv_heads", "head_dim", "past", "present",
# "positions"} (see qcompiler.frontends.kv_cache.CacheLayout); absent on a graph without a cache
KV_CACHE = "qcompiler.kv_cache"
EOS_TOKEN_IDS = "qcompiler.eos_token_ids"  # JSON list of the token ids that end a generation
# JSON list of the KV-cache outputs (present.N.value) whose values are in a transformed basis (V M_h): such a
# cache is exact for this model, which writes and reads it, and not interchangeable with another model's cache
KV_CACHE_TRANSFORMED = "qcompiler.kv_cache_transformed"


def model_properties(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def transformed_caches(model: onnx.ModelProto) -> frozenset[str]:
    """The KV-cache outputs a compile left in a transformed basis (``KV_CACHE_TRANSFORMED``): they differ from
    the original model's by design, so validation compares every other output."""
    text = model_properties(model).get(KV_CACHE_TRANSFORMED)
    return frozenset(json.loads(text)) if text else frozenset()


def set_model_properties(model: onnx.ModelProto, props: dict[str, str]) -> None:
    current = model_properties(model)
    current.update({k: v for k, v in props.items() if v is not None})
    del model.metadata_props[:]
    for k, v in current.items():
        model.metadata_props.add(key=k, value=v)


def _path_of(raw: str, prefix: str) -> str | None:
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or len(scopes) < 2:
        return None
    path = str(scopes[-2])
    if prefix and path.startswith(prefix):
        path = path[len(prefix):]
    return path or None


def _path_from_name(name: str) -> str | None:
    """The legacy exporter's (and optimum's) scoped node names: ``/model/layers.0/self_attn/v_proj/MatMul``."""
    if not name.startswith("/") or name.count("/") < 2:
        return None
    return ".".join(p for p in name.split("/")[1:-1] if p) or None


def module_paths(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> module path, for every node of the main graph that carries one (exporter metadata,
    else a scoped node name)."""
    prefix = model_properties(model).get(SCOPE_PREFIX, "")
    out: dict[str, str] = {}
    for node in model.graph.node:
        scoped = _path_from_name(node.name)
        if scoped:
            out[node.name] = scoped
        for p in node.metadata_props:
            if p.key == NAME_SCOPES:
                path = _path_of(p.value, prefix)
                if path:
                    out[node.name] = path
                break
    return out


def carry_node_metadata(original: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Give ``model``'s nodes the module scopes of the original nodes they are or replace.

    onnx-graphsurgeon drops node metadata. A node keeps its name through the passes, and a node a pass
    inserts for a site is named ``<original node>_<suffix>``: both get the original node's metadata
    (so module paths survive compilation and ``inspect`` can name the sites of a compiled model).
    """
    props = {n.name: [p for p in n.metadata_props if p.key == NAME_SCOPES] for n in original.graph.node}
    props = {k: v for k, v in props.items() if v}
    if not props:
        return
    for node in model.graph.node:
        if node.metadata_props:
            continue
        name = node.name
        while name:
            if name in props:
                node.metadata_props.extend(props[name])
                break
            cut = name.rfind("_")
            name = name[:cut] if cut > 0 else ""
