"""A local Hugging Face checkpoint folder (encoders and causal LMs) -> ONNX, cached by content."""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx

from qcompiler.errors import ModelLoadError, first_line
from qcompiler.frontends.base import LoadedModel
from qcompiler.frontends.cache import ExportCache, content_key
from qcompiler.graphio import load_onnx
from qcompiler.metadata import MODEL_KIND, TOKENIZER, set_model_properties

log = logging.getLogger(__name__)

# An export must reproduce torch within this relative error on a fresh shape with padding.
EXPORT_CHECK_RTOL = 1e-3


def model_kind(config: dict) -> str:
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal_lm"
    return "encoder"


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {e}") from None


def _load_torch_model(folder: Path, kind: str):
    import torch
    import transformers

    cls = transformers.AutoModelForCausalLM if kind == "causal_lm" else transformers.AutoModel
    try:
        return cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    except Exception as e:
        raise ModelLoadError(f"cannot load the checkpoint in {folder}: {first_line(e)}") from None


def _example_inputs(model, config: dict, batch: int, seq: int, pad: int, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = int(config.get("vocab_size") or 1000)
    ids = torch.randint(5, min(vocab, 1000), (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if pad:
        mask[-1, seq - pad:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    params = inspect.signature(model.forward).parameters
    if "token_type_ids" in params and int(config.get("type_vocab_size") or 0) > 0:
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.int64)
    return inputs


def _select(kind: str):
    if kind == "causal_lm":
        return lambda out: out.logits
    return lambda out: out.last_hidden_state


def _check_export(model_proto: onnx.ModelProto, module, config: dict, kind: str) -> float:
    """Run ONNX Runtime and torch on a shape unlike the export's, with padding; compare valid positions."""
    import torch

    from qcompiler.runtime.session import SessionOptions, make_session

    inputs = _example_inputs(module, config, batch=3, seq=11, pad=4, seed=1)
    extra = {"use_cache": False} if kind == "causal_lm" else {}
    with torch.no_grad():
        ref = _select(kind)(module(**inputs, **extra)).numpy()
    sess = make_session(model_proto, SessionOptions(device="cpu", optimize=False))
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    valid = inputs["attention_mask"].numpy().astype(bool)
    a, b = got[valid].astype(np.float64), ref[valid].astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def load_hf_folder(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                   name: str | None = None) -> LoadedModel:
    folder = Path(folder).resolve()
    config = _read_config(folder)
    kind = model_kind(config)
    key = content_key(folder, {"torch": version("torch"), "transformers": version("transformers"),
                               "kind": kind})
    cache = ExportCache(Path(cache_dir) / "exports" if cache_dir else None)
    hit = cache.get(key)
    if hit is not None:
        path, info = hit
        log.info("export cache hit: %s", path)
        return LoadedModel(load_onnx(path), name or str(folder), info["kind"], str(folder), str(path), cached=True)

    from qcompiler.frontends.export import export_to_onnx

    t0 = time.perf_counter()
    log.info("exporting %s (%s) with torch.onnx dynamo", folder, kind)
    module = _load_torch_model(folder, kind)
    inputs = _example_inputs(module, config, batch=2, seq=16, pad=0, seed=0)
    dyn = {n: {0: "batch", 1: "sequence"} for n in inputs}
    output = "logits" if kind == "causal_lm" else "last_hidden_state"
    model = export_to_onnx(module, inputs, [output], dyn, select=_select(kind),
                           extra_kwargs={"use_cache": False} if kind == "causal_lm" else {})
    err = _check_export(model, module, config, kind)
    if not err <= EXPORT_CHECK_RTOL:
        raise ModelLoadError(f"exported ONNX disagrees with torch (relative error {err:.2e}) on a padded batch")
    set_model_properties(model, {TOKENIZER: str(folder), MODEL_KIND: kind})
    path = cache.put(key, model, {"kind": kind, "source": str(folder), "export_check_rel_error": err})
    log.info("exported in %.1fs (check vs torch: rel error %.1e); cached at %s", time.perf_counter() - t0, err, path)
    return LoadedModel(model, name or str(folder), kind, str(folder), str(path), cached=False)
