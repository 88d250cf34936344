"""CafeQ's learners on random weights with outliers: they cut the proxy error, never end worse than
RTN, and the kept transforms are what they claim (orthogonal for Cayley, exact fake quantization)."""

import numpy as np
import pytest
import torch

from qcompiler.algorithms.cafeq import (
    Grid,
    LearnConfig,
    channel_order,
    hadamard,
    initial_blocks,
    learn_block_transform,
    learn_updown_scale,
    learn_vo,
    weighted_row_error,
)
from qcompiler.algorithms.fakequant import fake_quant
from qcompiler.algorithms.grid import quantize

GRID = Grid(3, 32, False)


def _outlier_weight(rng, k, n):
    w = rng.standard_normal((k, n))
    w[rng.integers(0, k, 6), rng.integers(0, n, 6)] *= 12  # a few outliers: what transforms fix
    return w


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quant_forward_is_the_ort_grid(bits, sym):
    w = np.random.default_rng(0).standard_normal((100, 12)).astype(np.float32)
    ref = quantize(w, bits, 32, sym).dequantize()
    got = fake_quant(torch.from_numpy(w), bits, 32, sym, ste=False).numpy()
    assert np.mean(np.abs(got - ref) > 1e-6) < 1e-3  # ties may round differently; nothing else


def test_fake_quant_passes_gradients_straight_through():
    w = torch.randn(64, 8, requires_grad=True)
    fake_quant(w, 3, 32, False, ste=True).sum().backward()
    assert w.grad is not None and torch.count_nonzero(w.grad) > 0


@pytest.mark.parametrize("loss,optimizer", [("ste", "adam"), ("ste", "cayley"), ("lse", "adam")])
def test_block_transform_cuts_the_proxy_error(loss, optimizer):
    rng = np.random.default_rng(1)
    ws = [_outlier_weight(rng, 64, 48), _outlier_weight(rng, 64, 16)]
    cfg = LearnConfig(loss=loss, optimizer=optimizer, steps=150, lr=0.02 if optimizer == "adam" else 0.05)
    res = learn_block_transform(ws, GRID, 16, cfg)
    assert res.value.shape == (4, 16, 16)
    assert res.error <= res.identity_error
    if loss == "ste":
        assert res.error < 0.93 * res.identity_error, (res.error, res.identity_error)
    if optimizer == "cayley":
        assert np.allclose(res.value @ res.value.transpose(0, 2, 1), np.eye(16), atol=1e-4)
    # the reported error is the true one: recompute it with the ORT-exact grid
    t = res.value
    w = np.concatenate(ws, axis=1)
    tw = np.einsum("kij,kjn->kin", t, w.reshape(4, 16, -1)).reshape(64, -1)
    eff = np.einsum("kij,kjn->kin", np.linalg.inv(t), quantize(tw, 3, 32, False).dequantize().reshape(4, 16, -1))
    assert np.sum((eff.reshape(64, -1) - w) ** 2) == pytest.approx(res.error, rel=1e-3)


def test_learning_never_ends_worse_than_rtn():
    w = np.random.default_rng(2).standard_normal((32, 8))
    res = learn_block_transform([w], Grid(8, 32, False), 8, LearnConfig(steps=3, lr=1.0))  # a bad lr
    assert res.error <= res.identity_error


def test_vo_transform_cuts_the_factor_errors_under_gqa():
    rng = np.random.default_rng(3)
    a, b = _outlier_weight(rng, 64, 2 * 8), _outlier_weight(rng, 4 * 8, 48)
    res = learn_vo(a, b, (0, 0, 1, 1), 8, GRID, GRID, LearnConfig(steps=200))
    assert res.value.shape == (2, 8, 8)
    assert res.error < 0.97 * res.identity_error, (res.error, res.identity_error)


def test_updown_scale_and_channel_order():
    rng = np.random.default_rng(4)
    up, down = rng.standard_normal((32, 64)), rng.standard_normal((64, 24)) * np.exp(rng.normal(0, 1, (64, 1)))
    res = learn_updown_scale(up, down, GRID, LearnConfig(steps=80))
    assert np.all(res.value > 0) and res.error < res.identity_error
    # outlier rows spread over every quant group of down: sorting puts them in one group
    down = rng.standard_normal((64, 24))
    down[::16] *= 20
    perm = channel_order(down)
    assert sorted(perm) == list(range(64))
    assert weighted_row_error(up[:, perm], down[perm], GRID) < weighted_row_error(up, down, GRID)


def test_initial_blocks():
    rng = np.random.default_rng(5)
    h = hadamard(8)
    assert np.allclose(h @ h.T, np.eye(8))
    for init in ("identity", "orthogonal", "hadamard"):
        t = initial_blocks(3, 8, init, rng)
        assert t.shape == (3, 8, 8) and np.allclose(t @ t.transpose(0, 2, 1), np.eye(8))
    with pytest.raises(ValueError):
        hadamard(6)
