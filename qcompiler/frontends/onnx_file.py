"""An existing .onnx file (with external data, read or left in its files)."""

from __future__ import annotations

from pathlib import Path

from qcompiler.config import STREAM_AUTO_BYTES
from qcompiler.frontends.base import LoadedModel
from qcompiler.frontends.genai import builder_properties
from qcompiler.graphio import external_data_bytes, load_external_data, load_onnx
from qcompiler.metadata import MODEL_KIND, TOKENIZER, model_properties, set_model_properties


def load_onnx_model(path: Path, stream: bool | None = False) -> LoadedModel:
    """``stream`` true (or None and more than ``STREAM_AUTO_BYTES`` of external data): external tensors
    keep their file references (``LoadedModel.data_dir``); otherwise they are read into memory."""
    model = load_onnx(path, load_data=False)
    if stream is None:
        stream = external_data_bytes(model) > STREAM_AUTO_BYTES
    if not stream:
        load_external_data(model, path)
    builder = {} if MODEL_KIND in model_properties(model) else builder_properties(model, path)
    if builder:  # not ours: a graph of onnxruntime-genai's model builder (cache layout, tokenizer, end ids)
        set_model_properties(model, builder)
    props = model_properties(model)
    tok = props.get(TOKENIZER)
    return LoadedModel(model=model, source=str(path), kind=props.get(MODEL_KIND, "onnx"),
                       tokenizer_dir=tok if tok and Path(tok).is_dir() else None, onnx_path=str(path),
                       data_dir=str(Path(path).resolve().parent) if stream else None)
