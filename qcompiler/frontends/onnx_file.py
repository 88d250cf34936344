"""An existing .onnx file (with external data, read or left in its files)."""

from __future__ import annotations

from pathlib import Path

import onnx

from qcompiler.config import STREAM_AUTO_BYTES
from qcompiler.errors import ModelLoadError
from qcompiler.frontends.base import LoadedModel
from qcompiler.frontends.genai import builder_properties, decoder_file
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


def runnable_model(spec: str | Path) -> str | onnx.ModelProto:
    """What a session runs for ``qcompiler generate`` / ``eval``: an ``.onnx`` path, or an onnxruntime-genai
    folder's decoder. A graph that records nothing of its own (the model builder's) comes back in memory
    with what its folder says added (cache layout, end-of-sequence ids, tokenizer): ONNX Runtime reads a
    model's metadata from the model."""
    path = model_file(spec)
    head = load_onnx(path, load_data=False)
    if MODEL_KIND in model_properties(head) or not builder_properties(head, path):
        return str(path)
    return load_onnx_model(path).model


def model_file(spec: str | Path) -> Path:
    """The ``.onnx`` file ``spec`` names: itself, or an onnxruntime-genai folder's decoder."""
    path = Path(spec)
    if path.is_dir():
        decoder = decoder_file(path)
        if decoder is None:
            raise ModelLoadError(f"not a model: {path} is a folder without a genai_config.json; give the .onnx file")
        return decoder
    if not path.is_file():
        raise ModelLoadError(f"model not found: {path}")
    return path
