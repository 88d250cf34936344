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
from qcompiler.metadata import EOS_TOKEN_IDS, KV_CACHE, MODEL_KIND, SCOPE_PREFIX, TOKENIZER, set_model_properties

log = logging.getLogger(__name__)

# An export must reproduce torch within this relative error on a fresh shape with padding.
EXPORT_CHECK_RTOL = 1e-3
KV_CACHE_FORMAT = "1"  # bump when the cache graph's contract changes (part of the export cache key)


def model_kind(config: dict) -> str:
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal_lm"
    return "encoder"


def read_config(folder: Path) -> dict:
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


def example_inputs(model, config: dict, batch: int, seq: int, pad: int, seed: int) -> dict:
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


def select(kind: str):
    if kind == "causal_lm":
        return lambda out: out.logits
    return lambda out: out.last_hidden_state


def _check_export(model_proto: onnx.ModelProto, module, config: dict, kind: str) -> float:
    """Run ONNX Runtime and torch on a shape unlike the export's, with padding; compare valid positions."""
    import torch

    from qcompiler.runtime.session import SessionOptions, make_session

    inputs = example_inputs(module, config, batch=3, seq=11, pad=4, seed=1)
    extra = {"use_cache": False} if kind == "causal_lm" else {}
    with torch.no_grad():
        ref = select(kind)(module(**inputs, **extra)).numpy()
    sess = make_session(model_proto, SessionOptions(device="cpu", optimize=False))
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    valid = inputs["attention_mask"].numpy().astype(bool)
    a, b = got[valid].astype(np.float64), ref[valid].astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def cache_key(folder: Path, kind: str, kv_cache: bool, by_stat: bool = False, **extra: str) -> str:
    """The export cache's key of ``folder``: its content, the exporter versions, the kind, and whether the
    graph has a KV cache (a causal LM with and without one are two entries)."""
    info = {"torch": version("torch"), "transformers": version("transformers"), "kind": kind, **extra}
    if kv_cache:
        info["kv_cache"] = KV_CACHE_FORMAT
    return content_key(folder, info, by_stat=by_stat)


def uses_kv_cache(kind: str, kv_cache: bool) -> bool:
    return kv_cache and kind == "causal_lm"


def load_hf_folder(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                   name: str | None = None, kv_cache: bool = True) -> LoadedModel:
    """Export ``folder`` (loaded in memory) and check it against torch; cached by content. A causal LM gets
    a KV cache (``frontends.kv_cache``'s contract) unless ``kv_cache`` is false."""
    folder = Path(folder).resolve()
    config = read_config(folder)
    kind = model_kind(config)
    with_cache = uses_kv_cache(kind, kv_cache)
    key = cache_key(folder, kind, with_cache)
    cache = ExportCache(Path(cache_dir) / "exports" if cache_dir else None)
    hit = cache.get(key)
    if hit is not None:
        path, info = hit
        log.info("export cache hit: %s", path)
        return LoadedModel(load_onnx(path), name or str(folder), info["kind"], str(folder), str(path), cached=True)

    from qcompiler.frontends.export import WRAPPER_ATTR, export_to_onnx

    t0 = time.perf_counter()
    log.info("exporting %s (%s%s) with torch.onnx dynamo", folder, kind, ", KV cache" if with_cache else "")
    module = _load_torch_model(folder, kind)
    props = {TOKENIZER: str(folder), MODEL_KIND: kind}
    if with_cache:
        from qcompiler.frontends.kv_cache import check_cache_export, eos_token_ids, export_cache_program

        vocab = int(config.get("vocab_size") or 1000)
        program, layout, wrapper = export_cache_program(module, vocab)
        model = program.model_proto
        err = check_cache_export(model, wrapper, layout, vocab)
        what = "a left-padded prefill and decode steps"
        props.update({SCOPE_PREFIX: WRAPPER_ATTR + ".", KV_CACHE: layout.to_json(),
                      EOS_TOKEN_IDS: json.dumps(eos_token_ids(folder, config))})
    else:
        inputs = example_inputs(module, config, batch=2, seq=16, pad=0, seed=0)
        dyn = {n: {0: "batch", 1: "sequence"} for n in inputs}
        output = "logits" if kind == "causal_lm" else "last_hidden_state"
        model = export_to_onnx(module, inputs, [output], dyn, select=select(kind),
                               extra_kwargs={"use_cache": False} if kind == "causal_lm" else {})
        err = _check_export(model, module, config, kind)
        what = "a padded batch"
    if not err <= EXPORT_CHECK_RTOL:
        raise ModelLoadError(f"exported ONNX disagrees with torch (relative error {err:.2e}) on {what}")
    set_model_properties(model, props)
    path = cache.put(key, model, {"kind": kind, "source": str(folder), "kv_cache": with_cache,
                                  "export_check_rel_error": err})
    log.info("exported in %.1fs (check vs torch: rel error %.1e); cached at %s", time.perf_counter() - t0, err, path)
    return LoadedModel(model, name or str(folder), kind, str(folder), str(path), cached=False)
