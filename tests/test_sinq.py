"""SINQ (algorithms/sinq.py, --method sinq): balanced tiles, better rounding than RTN on unbalanced
weights. Its folds' exactness with float weights, and no online op on llama: test_cafeq_method (every tiny
family) and test_kv_pairs (through the KV cache)."""

import numpy as np
import pytest

from qcompiler.algorithms.grid import quantize
from qcompiler.algorithms.sinq import imbalance, sinkhorn_scales, sinkhorn_tiles
from qcompiler.config import CompileConfig, QuantConfig
from qcompiler.pipeline import compile_model


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


def test_sinq_weights_beat_rtn_on_a_tiny_llama(pair_checkpoints, cache_dir):
    base = dict(quant=QuantConfig(3, 32, True), validate=False)
    sinq = compile_model(str(pair_checkpoints["llama"]), None, CompileConfig(method="sinq", **base),
                         cache_dir=cache_dir).plan
    # the weights the model now rounds, against RTN of the original weights (each relative to its own)
    assert np.mean([p.stats.rel_error for p in sinq.sites]) < np.mean([p.stats.rtn_rel_error for p in sinq.sites])
