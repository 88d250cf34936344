"""Sample inputs for a model from its input signature (token ids, masks, positions, floats)."""

from __future__ import annotations

import numpy as np
import onnx

_NP = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.FLOAT: np.float32,
       onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.BOOL: np.bool_}


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
    """Inputs for every graph input: random token ids, masks with right padding on one row."""
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in init_names:
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
