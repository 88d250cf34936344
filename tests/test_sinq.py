"""SINQ (algorithms/sinq.py, --method sinq): balanced tiles, better rounding than RTN on unbalanced
weights, exact folds (weights left in float leave every tiny family's outputs unchanged, through the
KV cache too), and no online op where a gain precedes the weights."""

import numpy as np
import pytest

from qcompiler.algorithms.grid import quantize
from qcompiler.algorithms.sinq import imbalance, sinkhorn_scales, sinkhorn_tiles
from qcompiler.config import CompileConfig, QuantConfig
from qcompiler.frontends import load_model
from qcompiler.passes.online_transform import online_ops
from qcompiler.pipeline import compile_model
from qcompiler.runtime.inputs import sample_inputs
from tests.conftest import FAMILIES
from tests.helpers import outputs, rel


def _unbalanced(rng, k=256, n=96):
    """A weight whose input rows and output columns have spread scales (log-normal), like an LLM's."""
    return rng.standard_normal((k, n)) * rng.lognormal(0, 1.0, (k, 1)) * rng.lognormal(0, 0.5, (1, n))


def test_tiles_come_out_balanced_with_positive_scales():
    rng = np.random.default_rng(0)
    tiles = np.stack([_unbalanced(rng, 64, 48) for _ in range(3)])
    t, s = sinkhorn_tiles(tiles)
    assert t.shape == (3, 64) and s.shape == (3, 48) and (t > 0).all() and (s > 0).all()
    before, after = imbalance(tiles), imbalance(tiles / t[:, :, None] / s[:, None, :])
    assert (after < 0.5 * before).all(), (before, after)
    # a balanced tile is left alone (the start is the best iterate)
    flat = np.sign(rng.standard_normal((1, 64, 48)))
    t1, s1 = sinkhorn_tiles(flat)
    assert imbalance(flat / t1[:, :, None] / s1[:, None, :]) <= imbalance(flat) + 1e-12


def test_scales_per_quantization_group_and_a_short_last_group():
    rng = np.random.default_rng(1)
    w = _unbalanced(rng, 160, 32)  # groups of 64: 64, 64 and a last one of 32
    t = sinkhorn_scales(w, 64)
    assert t.shape == (160,) and (t > 0).all()
    assert np.allclose(t[:64], sinkhorn_scales(w[:64], 64)) and np.allclose(t[128:], sinkhorn_scales(w[128:], 64))
    assert np.allclose(sinkhorn_scales(w, None), sinkhorn_tiles(w[None])[0][0])


@pytest.mark.parametrize("bits", [3, 4])
def test_balanced_groups_round_better_than_rtn(bits):
    rng = np.random.default_rng(2)
    w = _unbalanced(rng)
    t = sinkhorn_scales(w, 64)
    rtn = quantize(w.astype(np.float32), bits, 64, True).dequantize()
    sinq = quantize((w / t[:, None]).astype(np.float32), bits, 64, True).dequantize() * t[:, None]
    assert np.linalg.norm(sinq - w) < 0.9 * np.linalg.norm(rtn - w)


@pytest.mark.parametrize("family", FAMILIES + ("phi3",))
def test_folded_scales_leave_the_model_unchanged(family, pair_checkpoints, cache_dir):
    """Weights left in float: the scales folded into gains, V and up (and online where nothing precedes)
    change nothing (decode steps through the cache: test_kv_pairs)."""
    cfg = CompileConfig(quant=QuantConfig(3, 32, False), method="sinq", quantize_weights=False, validate=False,
                        kv_cache=False)  # the cache graph's present.N.value hold V M_h by design
    res = compile_model(str(pair_checkpoints[family]), None, cfg, cache_dir=cache_dir)
    original = load_model(str(pair_checkpoints[family]), cache_dir=cache_dir, kv_cache=False).model
    feeds = sample_inputs(original, batch=2, seq=9)
    ref, got = outputs(original, feeds), outputs(res.model, feeds)
    err = max(rel(got[k], ref[k]) for k in ref)
    assert err <= 1e-4, err
    assert res.plan.online and res.plan.pair_transforms
    if family == "llama":  # every single-matrix scaling sits in the RMSNorm gain before it: no op at all
        assert {t.pair.kind for t in res.plan.pair_transforms} == {"attn_vo", "mlp_up_down"}
        assert online_ops(res.model) == 0 and all(t.blocks.shape[1:] == (1, 1) for t in res.plan.online)


def test_sinq_weights_beat_rtn_on_a_tiny_llama(pair_checkpoints, cache_dir):
    base = dict(quant=QuantConfig(3, 32, True), validate=False)
    sinq = compile_model(str(pair_checkpoints["llama"]), None, CompileConfig(method="sinq", **base),
                         cache_dir=cache_dir).plan
    # the weights the model now rounds, against RTN of the original weights (each relative to its own)
    assert np.mean([p.stats.rel_error for p in sinq.sites]) < np.mean([p.stats.rtn_rel_error for p in sinq.sites])
