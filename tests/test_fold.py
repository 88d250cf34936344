"""The pure fold maths: folded pairs compute the same function (float64, emulated attention and MLPs)."""

import numpy as np
import pytest

from qcompiler.algorithms.fold import fold_attn_vo, fold_mlp, product_error
from qcompiler.algorithms.transforms import random_invertible, random_orthogonal, random_scale


def _attention(x, wv, bv, wo, cols, d, kv_map, probs):
    v = x @ wv + (0 if bv is None else bv)
    heads = [probs[j] @ v[:, cols[0] + h * d: cols[0] + (h + 1) * d] for j, h in enumerate(kv_map)]
    return np.concatenate(heads, axis=1) @ wo


@pytest.mark.parametrize("kv_map", [(0, 1, 2, 3), (0, 0, 1, 1), (0, 0, 0, 0), (1, 0, 1, 0)])
@pytest.mark.parametrize("fused", [False, True])
def test_fold_attn_vo_is_exact(kv_map, fused):
    rng = np.random.default_rng(1)
    s, k, d, n = 7, 24, 8, 20
    n_kv = len(set(kv_map))
    off = 2 * n_kv * d if fused else 0  # V is the last slice of a fused QKV
    wv = rng.standard_normal((k, off + n_kv * d))
    bv = rng.standard_normal(off + n_kv * d)
    wo = rng.standard_normal((len(kv_map) * d, n))
    x = rng.standard_normal((s, k))
    probs = rng.random((len(kv_map), s, s))
    probs /= probs.sum(-1, keepdims=True)
    cols = (off, off + n_kv * d)
    ref = _attention(x, wv, bv, wo, cols, d, kv_map, probs)
    mats = np.stack([random_invertible(d, rng) for _ in range(n_kv)])
    wv2, bv2, wo2 = wv.copy(), bv.copy(), wo.copy()
    fold_attn_vo(wv2, bv2, wo2, cols, d, kv_map, mats)
    assert np.allclose(_attention(x, wv2, bv2, wo2, cols, d, kv_map, probs), ref, atol=1e-9)
    assert np.array_equal(wv2[:, :off], wv[:, :off])  # Q and K columns untouched
    assert not np.allclose(wv2, wv)


def test_fold_attn_vo_refuses_wrong_shapes():
    with pytest.raises(ValueError, match="expected 2 matrices"):
        fold_attn_vo(np.zeros((4, 8)), None, np.zeros((8, 4)), (0, 8), 4, (0, 1), np.zeros((3, 4, 4)))


def _silu(z):
    return z / (1 + np.exp(-z))


@pytest.mark.parametrize("fused", [False, True])
def test_fold_gated_mlp_is_exact(fused):
    rng = np.random.default_rng(2)
    k, i, n = 16, 24, 12
    x = rng.standard_normal((5, k))
    down = rng.standard_normal((i, n))
    if fused:
        gate = up = rng.standard_normal((k, 2 * i))
        gcols, ucols = (0, i), (i, 2 * i)
    else:
        gate, up = rng.standard_normal((k, i)), rng.standard_normal((k, i))
        gcols = ucols = (0, i)

    def f(g, u, dn):
        return (_silu(x @ g[:, slice(*gcols)]) * (x @ u[:, slice(*ucols)])) @ dn

    ref = f(gate, up, down)
    g2 = gate.copy()
    u2 = g2 if fused else up.copy()
    d2 = down.copy()
    fold_mlp(u2, None, ucols, d2, random_scale(i, rng, signs=True), rng.permutation(i), g2, None, gcols)
    assert np.allclose(f(g2, u2, d2), ref, atol=1e-9)


def test_fold_relu_mlp_positive_diagonal_and_permutation_exact_gelu_only_permutation():
    rng = np.random.default_rng(3)
    k, i, n = 10, 14, 6
    x, w1, b1, w2 = (rng.standard_normal(s) for s in ((4, k), (k, i), (i,), (i, n)))
    perm = rng.permutation(i)
    for act, scale in ((lambda z: np.maximum(z, 0), random_scale(i, rng, signs=False)),
                       (np.tanh, np.ones(i))):
        ref = act(x @ w1 + b1) @ w2
        a, b, c = w1.copy(), b1.copy(), w2.copy()
        fold_mlp(a, b, (0, i), c, scale, perm)
        assert np.allclose(act(x @ a + b) @ c, ref, atol=1e-9)
    # a non-trivial scale does not pass tanh: the check in PairTransform exists for a reason
    a, b, c = w1.copy(), b1.copy(), w2.copy()
    fold_mlp(a, b, (0, i), c, random_scale(i, rng, signs=False), perm)
    assert not np.allclose(np.tanh(x @ a + b) @ c, np.tanh(x @ w1 + b1) @ w2, atol=1e-3)


def test_product_error_and_orthogonal():
    rng = np.random.default_rng(4)
    q = random_orthogonal(9, rng)
    assert np.allclose(q @ q.T, np.eye(9), atol=1e-12)
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((3, 4))
    assert product_error(a, b, a, b) == 0
    assert product_error(a, b, 1.1 * a, b) == pytest.approx(0.1)
