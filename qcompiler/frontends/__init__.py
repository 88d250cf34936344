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
               cache_dir: str | os.PathLike | None = None, stream: bool | None = False,
               kv_cache: bool = True) -> LoadedModel:
    """Load ``spec``: None or a bundled name, a path to ``.onnx``, an HF folder, an onnxruntime-genai folder (its
    decoder ``.onnx``, named by its ``genai_config.json``), or an ``nn.Module``
    (then ``example_inputs`` is a dict of input name -> tensor).

    ``stream``: the weights are left in files (True), loaded (False), or left there when they exceed
    ``STREAM_AUTO_BYTES`` as fp32 (None). An ``.onnx`` input keeps its external data files; a Hugging Face
    folder with safetensors weights is exported without loading them (``hf_stream``). An ``nn.Module`` is
    in memory already: True refuses it.

    ``kv_cache``: a causal LM from a Hugging Face folder is exported with a KV cache (inputs ``input_ids``,
    ``attention_mask``, ``past_key_values.N.key/value``; outputs ``logits``, ``present.N.key/value``: see
    ``frontends.kv_cache``), or without one (False: ``input_ids``, ``attention_mask`` -> ``logits``). Encoders,
    ``.onnx`` files and modules are unaffected.
    """
    spec = DEFAULT_MODEL if spec is None else spec
    if not isinstance(spec, (str, os.PathLike)):
        if stream:
            raise ConfigError("a streaming compile reads files (an .onnx with external data or a Hugging Face "
                              "folder), not an nn.Module already in memory")
        from qcompiler.frontends.module import load_module

        return load_module(spec, example_inputs)
    text = str(spec)
    if text in BUNDLED and not Path(text).exists():
        return _load_folder(Path(bundled_path(text, cache_dir)), cache_dir, stream, name=text, kv_cache=kv_cache)
    path = Path(text)
    if not path.exists():
        raise ModelLoadError(f"model not found: {text} (give an .onnx file, a Hugging Face folder or "
                             f"one of: {', '.join(BUNDLED)})")
    if path.is_dir():
        from qcompiler.frontends.genai import GENAI_CONFIG, decoder_file

        decoder = decoder_file(path)  # an onnxruntime-genai folder (the model builder's)
        if decoder is not None:
            return load_onnx_model(decoder, stream)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"not a Hugging Face checkpoint folder (no config.json) nor an onnxruntime-genai "
                                 f"folder (no {GENAI_CONFIG}): {path}")
        return _load_folder(path, cache_dir, stream, kv_cache=kv_cache)
    return load_onnx_model(path, stream)


def _load_folder(folder: Path, cache_dir, stream: bool | None, name: str | None = None,
                 kv_cache: bool = True) -> LoadedModel:
    """A Hugging Face folder: exported in memory, or with its weights left on disk (``stream``)."""
    stored = None  # the safetensors headers, read once
    if stream is None and any(folder.glob("*.safetensors")):
        from qcompiler.config import STREAM_AUTO_BYTES
        from qcompiler.frontends.safetensors_index import checkpoint_tensors, float_bytes_fp32

        stored = checkpoint_tensors(folder)
        stream = float_bytes_fp32(stored) > STREAM_AUTO_BYTES
    if stream:
        from qcompiler.frontends.hf_stream import load_hf_streamed

        return load_hf_streamed(folder, cache_dir=cache_dir, name=name, stored=stored, kv_cache=kv_cache)
    from qcompiler.frontends.hf import load_hf_folder

    return load_hf_folder(folder, cache_dir=cache_dir, name=name, kv_cache=kv_cache)
