"""Coupled pairs through the KV cache: V's values flow into ``present.N.value`` through a Concat with the past.
Folding ``M_h`` into V is exact for a cache the same compiled model writes and reads (it holds ``V M_h``):
transforms with float weights leave the logits of a prefill and of every decode step unchanged, and the
model records which caches are in the transformed basis."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qcompiler.config import CafeqConfig, CompileConfig, QuantConfig
from qcompiler.metadata import KV_CACHE_TRANSFORMED, model_properties
from qcompiler.pipeline import compile_model
from qcompiler.runtime.inputs import past_feeds
from qcompiler.runtime.session import SessionOptions, make_session

LMS = ("llama", "qwen2", "gemma2", "gemma3", "gpt2")
EXACT = SessionOptions(device="cpu", optimize=False)


def _decode(model, ids: np.ndarray, mask: np.ndarray, steps: int) -> list[np.ndarray]:
    """Logits of a prefill and ``steps`` one-token steps, each model feeding its own present as past; the next
    token is a fixed function of the step (not of the logits), so both models see the same inputs."""
    sess = make_session(model, EXACT)
    names = [i.name for i in sess.get_inputs()]
    past, new, out = past_feeds(model, len(ids)), ids, []
    for step in range(steps + 1):
        res = sess.run(None, {"input_ids": new, "attention_mask": mask, **past})
        out.append(res[0])
        past = {n: v for n, v in zip([n for n in names if n.startswith("past_key_values")], res[1:], strict=True)}
        new = np.full((len(ids), 1), 7 + step, dtype=np.int64)
        mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    return out


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


@pytest.mark.parametrize("method", ["cafeq", "rotate", "sinq"])
@pytest.mark.parametrize("family", LMS)
def test_transforms_through_the_cache_are_exact_over_prefill_and_decode(family, method, tiny_checkpoints, cache_dir):
    cfg = CompileConfig(quant=QuantConfig(4, 32, False), method=method, quantize_weights=False, max_error=1e-4,
                        jobs=1, cafeq=CafeqConfig(steps=10, online_budget=1.0))
    res = compile_model(str(tiny_checkpoints[family]), None, cfg, cache_dir=cache_dir)
    vo = [t for t in res.plan.pair_transforms if t.pair.kind == "attn_vo"]
    assert len(vo) == 2 and all(t.pair.cache for t in vo), [t.pair for t in vo]  # one per layer, through the cache
    cached = json.loads(model_properties(res.model)[KV_CACHE_TRANSFORMED])
    assert sorted(cached) == sorted(c for t in vo for c in t.pair.cache)
    assert all(c.startswith("present.") and c.endswith(".value") for c in cached)
    # validation compares every output but the transformed caches (different by design), keys included
    checked = {o.name for o in res.validation.outputs}
    assert "logits" in checked and "present.0.key" in checked and not checked & set(cached)

    from qcompiler.frontends import load_model

    original = load_model(str(tiny_checkpoints[family]), cache_dir=cache_dir).model
    ids = np.random.default_rng(0).integers(5, 400, (2, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    got, want = _decode(res.model, ids, mask, 3), _decode(original, ids, mask, 3)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        real = mask.astype(bool) if step == 0 else np.ones(len(ids), bool)
        assert _rel(g[real], w[real]) < 1e-5, (family, method, step, _rel(g[real], w[real]))


def test_a_cache_read_by_another_model_is_not_the_same(tiny_checkpoints, cache_dir):
    """The transformed basis is real: the original model reading the compiled model's cache goes wrong."""
    cfg = CompileConfig(method="rotate", quantize_weights=False, validate=False)
    res = compile_model(str(tiny_checkpoints["llama"]), None, cfg, cache_dir=cache_dir)
    from qcompiler.frontends import load_model

    original = load_model(str(tiny_checkpoints["llama"]), cache_dir=cache_dir).model
    ids, mask = np.arange(5, 11)[None], np.ones((1, 6), dtype=np.int64)
    a, b = make_session(res.model, EXACT), make_session(original, EXACT)
    past_names = [i.name for i in a.get_inputs() if i.name.startswith("past_key_values")]
    present = dict(zip(past_names, a.run(None, {"input_ids": ids, "attention_mask": mask,
                                                  **past_feeds(res.model, 1)})[1:], strict=True))
    step = {"input_ids": np.array([[9]]), "attention_mask": np.ones((1, 7), dtype=np.int64)}
    own, foreign = a.run(None, {**step, **present})[0], b.run(None, {**step, **present})[0]
    assert _rel(foreign, own) > 1e-3
