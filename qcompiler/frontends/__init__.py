"""Frontends: a model spec in (an .onnx file, an HF folder, the bundled name, an nn.Module), one ONNX
ModelProto out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qcompiler.errors import ConfigError, ModelLoadError
from qcompiler.frontends.base import LoadedModel
from qcompiler.frontends.bundled import BUNDLED, bundled_path
from qcompiler.frontends.onnx_file import load_onnx_model

DEFAULT_MODEL = "minilm"

__all__ = ["LoadedModel", "load_model", "DEFAULT_MODEL"]


def load_model(spec: Any = None, *, example_inputs: dict | None = None,
               cache_dir: str | os.PathLike | None = None, stream: bool | None = False) -> LoadedModel:
    """Load ``spec``: None or a bundled name, a path to ``.onnx``, an HF folder, or an ``nn.Module``
    (then ``example_inputs`` is a dict of input name -> tensor).

    ``stream``: an ``.onnx`` input's external data is left in its files (True), loaded (False), or left
    there when it exceeds ``STREAM_AUTO_BYTES`` (None). Other inputs are always in memory; True refuses them.
    """
    spec = DEFAULT_MODEL if spec is None else spec
    if stream and not (isinstance(spec, (str, os.PathLike)) and Path(spec).is_file()):
        raise ConfigError(f"a streaming compile reads an .onnx file with external data, not {spec!r}; "
                          f"export it first (a Hugging Face folder is exported in memory)")
    if not isinstance(spec, (str, os.PathLike)):
        from qcompiler.frontends.module import load_module

        return load_module(spec, example_inputs)
    text = str(spec)
    if text in BUNDLED and not Path(text).exists():
        from qcompiler.frontends.hf import load_hf_folder

        return load_hf_folder(bundled_path(text, cache_dir), cache_dir=cache_dir, name=text)
    path = Path(text)
    if not path.exists():
        raise ModelLoadError(f"model not found: {text} (give an .onnx file, a Hugging Face folder or "
                             f"one of: {', '.join(BUNDLED)})")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"not a Hugging Face checkpoint folder (no config.json): {path}")
        from qcompiler.frontends.hf import load_hf_folder

        return load_hf_folder(path, cache_dir=cache_dir)
    return load_onnx_model(path, stream)
