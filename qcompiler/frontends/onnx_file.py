"""An existing .onnx file (with external data)."""

from __future__ import annotations

from pathlib import Path

from qcompiler.frontends.base import LoadedModel
from qcompiler.graphio import load_onnx
from qcompiler.metadata import MODEL_KIND, TOKENIZER, model_properties


def load_onnx_model(path: Path) -> LoadedModel:
    model = load_onnx(path)
    props = model_properties(model)
    tok = props.get(TOKENIZER)
    return LoadedModel(model=model, source=str(path), kind=props.get(MODEL_KIND, "onnx"),
                       tokenizer_dir=tok if tok and Path(tok).is_dir() else None, onnx_path=str(path))
