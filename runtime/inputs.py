"""Sample inputs for a model from its input signature (token ids, masks, positions, floats), and the empty
KV cache (``past_key_values.*``, past length 0) that a cache graph takes for a whole-sequence run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from qcompiler.kv_layout import CacheLayout, is_past, layout_from_graph
from qcompiler.metadata import model_properties

_NP = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.FLOAT: np.float32,
       onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.BOOL: np.bool_}
# ONNX Runtime's type names (``NodeArg.type``)
_ORT_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def empty_past(name: str, dims: Sequence, dtype, batch: int, layout: CacheLayout | None = None) -> np.ndarray:
    """The empty past ``[batch, kv_heads, 0, head_dim]`` for the cache input ``name`` whose declared shape is
    ``dims`` (ints, or names/None where dynamic); heads and head size come from the shape, else ``layout``."""
    def fixed(i: int, fallback: int | None) -> int:
        d = dims[i] if len(dims) > i else None
        if isinstance(d, (int, np.integer)) and d > 0:
            return int(d)
        if fallback is None:
            raise ValueError(f"cache input {name!r} has shape {list(dims)}: its axis {i} is not fixed and the "
                             "model records no cache layout")
        return fallback
    if len(dims) != 4:
        raise ValueError(f"cache input {name!r} has shape {list(dims)}, not [batch, heads, length, head_dim]")
    heads = fixed(1, layout.kv_heads if layout else None)
    size = fixed(3, layout.head_dim if layout else None)
    return np.zeros((batch, heads, 0, size), dtype=dtype)


def _dims(inp: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in inp.type.tensor_type.shape.dim]


def past_feeds(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    """An empty past for every ``past_key_values.*`` input of ``model`` (none for a graph without a cache)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if is_past(i.name) and i.name not in inits]
    if not inputs:
        return {}
    layout = CacheLayout.from_properties(model_properties(model)) or layout_from_graph(model)
    return {i.name: empty_past(i.name, _dims(i), _NP.get(i.type.tensor_type.elem_type, np.float32), batch, layout)
            for i in inputs}


def session_past_feeds(sess, batch: int) -> dict[str, np.ndarray]:
    """``past_feeds`` for an ``onnxruntime.InferenceSession``."""
    inputs = [i for i in sess.get_inputs() if is_past(i.name)]
    if not inputs:
        return {}
    layout = CacheLayout.from_properties(dict(sess.get_modelmeta().custom_metadata_map))
    return {i.name: empty_past(i.name, list(i.shape or []), _ORT_NP.get(i.type, np.float32), batch, layout)
            for i in inputs}


def vocab_size(model: onnx.ModelProto, input_name: str) -> int | None:
    """Rows of the embedding table that a Gather indexes with ``input_name`` (through Casts)."""
    inits = {t.name: t for t in model.graph.initializer}
    names = {input_name}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.input[0] in names:
            names.add(node.output[0])
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in names and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    return None


def sample_inputs(model: onnx.ModelProto, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every graph input: random token ids, masks with right padding on one row; a cache graph's
    ``past_key_values.*`` are empty (past length 0, so its mask covers the ``seq`` new tokens)."""
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    past = past_feeds(model, batch)
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        if inp.name in past:
            feeds[inp.name] = past[inp.name]
            continue
        tt = inp.type.tensor_type
        dtype = _NP.get(tt.elem_type)
        if dtype is None:
            raise ValueError(f"input {inp.name!r} has an unsupported element type {tt.elem_type}")
        dims, dynamic = [], 0
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(batch if dynamic == 0 else seq)
                dynamic += 1
        name = inp.name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = np.ones(dims, dtype=bool)
        elif "mask" in name:
            m = np.ones(dims, dtype=dtype)
            if m.ndim == 2 and m.shape[0] > 1 and m.shape[1] > 4:
                m[-1, -3:] = 0
            feeds[inp.name] = m
        elif "token_type" in name:
            feeds[inp.name] = np.zeros(dims, dtype=dtype)
        elif "position" in name:
            feeds[inp.name] = np.broadcast_to(np.arange(dims[-1], dtype=dtype), dims).copy()
        else:
            hi = min(vocab_size(model, inp.name) or 100, 1000)
            feeds[inp.name] = rng.integers(0, hi, size=dims).astype(dtype)
    return feeds
