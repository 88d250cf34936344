"""Joint rounding of coupled pairs: never worse than plain rounding, much better on outlier-laden
pairs, exact bookkeeping of heads and transforms, and GPTQ when the partner stays in float."""

import numpy as np
import pytest

from qcompiler.algorithms.fold import product_error
from qcompiler.algorithms.gptq import SolverConfig, solve_columns, solve_rows
from qcompiler.algorithms.grid import GridSpec, quantize
from qcompiler.algorithms.joint import (
    Heads,
    JointConfig,
    first_factor_stats,
    joint_round,
    second_factor_stats,
    with_channel_term,
)
from qcompiler.algorithms.transforms import apply_blocks, random_invertible
from tests.test_gptq import naive_gptq

GRID = GridSpec(3, 32, False)
QUICK = JointConfig(rounds=2)


def heavy(rng, shape):
    return rng.standard_normal(shape) * rng.exponential(1.0, shape)


def vo_pair(rng, k=64, d=16, kv=2, groups=2, n=64):
    heads = Heads(d, tuple(h for h in range(kv) for _ in range(groups)))
    return heavy(rng, (k, kv * d)), heavy(rng, (kv * groups * d, n)), heads


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["vo", "mlp"])
def test_never_worse_than_plain_rounding(seed, kind):
    rng = np.random.default_rng(seed)
    if kind == "vo":
        a, b, heads = vo_pair(rng)
    else:
        a, b, heads = heavy(rng, (48, 96)), heavy(rng, (96, 40)), None
    grid = GridSpec(3 + seed % 2, 32, bool(seed % 2))
    res = joint_round(a, b, grid, grid, heads, cfg=QUICK)
    assert res.pqe <= res.pqe_plain
    # the reported errors are those of the returned codes
    h = (heads.head_dim, heads.kv_map) if heads else (None, None)
    assert res.pqe == pytest.approx(product_error(a, b, res.a.dequantize(), res.b.dequantize(), *h), rel=1e-6)
    assert len(res.history) == 2 * QUICK.rounds


def test_cuts_the_product_error_of_vo_pairs():
    rng = np.random.default_rng(10)
    cuts = []
    for _ in range(3):
        a, b, heads = vo_pair(rng, k=128, d=32, kv=2, groups=2, n=128)
        res = joint_round(a, b, GRID, GRID, heads)
        cuts.append(1 - res.pqe / res.pqe_plain)
    assert np.mean(cuts) > 0.15, cuts


def test_heads_use_their_kv_head():
    """A query head's product uses only its own KV head's columns: a wrong map must score worse."""
    rng = np.random.default_rng(11)
    a, b, heads = vo_pair(rng, kv=2, groups=1)
    res = joint_round(a, b, GRID, GRID, heads, cfg=QUICK)
    swapped = product_error(a, b, res.a.dequantize(), res.b.dequantize(), heads.head_dim, (1, 0))
    assert res.pqe < swapped


def test_with_transforms_on_both_factors():
    rng = np.random.default_rng(12)
    a, b = heavy(rng, (64, 32)), heavy(rng, (32, 48))
    ta = np.stack([random_invertible(16, rng) for _ in range(4)])
    tb = np.stack([random_invertible(16, rng) for _ in range(2)])
    res = joint_round(a, b, GRID, GRID, None, ta, tb, QUICK)
    eff_a = apply_blocks(np.linalg.inv(ta), res.a.dequantize().astype(np.float64))
    eff_b = apply_blocks(np.linalg.inv(tb), res.b.dequantize().astype(np.float64))
    assert res.pqe == pytest.approx(product_error(a, b, eff_a, eff_b), rel=1e-6)
    assert res.pqe <= res.pqe_plain


def test_partner_in_float_is_gptq():
    """With ``B`` unquantized, ``A``'s step is GPTQ with ``H = B B^T``; with ``A`` unquantized, ``B``'s
    step is GPTQ of ``B`` on inputs ``A`` (checked against the textbook implementation)."""
    rng = np.random.default_rng(13)
    a, b, heads = vo_pair(rng, k=96, d=16, kv=2, groups=2, n=80)
    cfg = SolverConfig(alpha=1.0, percdamp=0.01)
    h_b, d_b = second_factor_stats(a, a, heads)
    assert not d_b.any()
    got = solve_rows(b, h_b, GRID, d_b, cfg).dequantize()
    want = naive_gptq(b, h_b, GRID, percdamp=0.01)
    assert np.mean(np.isclose(got, want, atol=1e-6)) > 0.99
    x = np.zeros((a.shape[0] * len(heads.kv_map), b.shape[0]))  # the block-diagonal data of B's step
    for j, kv in enumerate(heads.kv_map):
        x[j * 96:(j + 1) * 96, j * 16:(j + 1) * 16] = a[:, kv * 16:(kv + 1) * 16]
    np.testing.assert_allclose(h_b, x.T @ x)
    h_a, d_a = first_factor_stats(b, b, heads)
    assert not d_a.any()
    got_a = solve_columns(a, h_a, GRID, d_a, cfg).dequantize()
    np.testing.assert_allclose(h_a[:16, :16], b[:16] @ b[:16].T + b[16:32] @ b[16:32].T)  # KV head 0's queries
    rtn = quantize(a.astype(np.float32), 3, 32, False).dequantize()
    assert product_error(a, b, got_a, b, heads.head_dim, heads.kv_map) < \
        product_error(a, b, rtn, b, heads.head_dim, heads.kv_map)


def test_channel_term_is_each_channels_own_product_error():
    rng = np.random.default_rng(14)
    a, b = rng.standard_normal((20, 6)), rng.standard_normal((6, 9))
    b_hat = b + 0.1 * rng.standard_normal(b.shape)
    h, d = with_channel_term(*first_factor_stats(b, b_hat, Heads(6, (0,))), 0.7)

    def quadratic(a_hat):  # ||A_hat X - A X~||^2 up to a constant, from H and D (C = H + D^T)
        return float(np.sum((a_hat @ h) * a_hat) - 2 * np.sum((a_hat @ (h + d.T)) * a))

    def direct(a_hat):
        whole = np.sum((a_hat @ b_hat - a @ b) ** 2)
        own = sum(np.sum((np.outer(a_hat[:, c], b_hat[c]) - np.outer(a[:, c], b[c])) ** 2) for c in range(6))
        return float(whole + 0.7 * own)

    x1, x2 = a + rng.standard_normal(a.shape), a - rng.standard_normal(a.shape)
    assert quadratic(x1) - quadratic(x2) == pytest.approx(direct(x1) - direct(x2), rel=1e-9)


def test_bad_shapes():
    rng = np.random.default_rng(15)
    with pytest.raises(ValueError, match="rows"):
        joint_round(rng.standard_normal((8, 4)), rng.standard_normal((6, 3)), GRID, GRID)


def test_channel_spans_hold_whole_groups_and_transform_blocks():
    from qcompiler.algorithms.joint import channel_spans

    assert channel_spans(1536, 4096, 32, 64) == [(0, 1536)]
    spans = channel_spans(5632, 4096, 32, 64)
    assert spans == [(0, 2816), (2816, 5632)]
    spans = channel_spans(14336, 4096, 128, 64)
    assert spans[0][0] == 0 and spans[-1][1] == 14336 and len(spans) == 4
    assert all(lo % 128 == 0 and hi - lo <= 4096 for lo, hi in spans)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert channel_spans(5632, 4096, 5632, 1) == [(0, 5632)]  # one group for the whole axis: no blocks


@pytest.mark.parametrize("transforms", [False, True])
def test_wide_pairs_in_blocks_of_channels(transforms):
    """A pair rounded a block of channels at a time (no C x C matrix) is never worse than plain rounding,
    reports the error of its codes, and stays close to the one-block solve."""
    rng = np.random.default_rng(16)
    a, b = heavy(rng, (96, 256)), heavy(rng, (256, 64))
    ta = np.stack([random_invertible(32, rng) for _ in range(3)]) if transforms else None
    tb = np.stack([random_invertible(64, rng) for _ in range(4)]) if transforms else None
    whole = joint_round(a, b, GRID, GRID, None, ta, tb, JointConfig(rounds=2))
    blocks = joint_round(a, b, GRID, GRID, None, ta, tb, JointConfig(rounds=2, channel_block=128))
    assert blocks.pqe_plain == whole.pqe_plain
    assert blocks.pqe < 0.7 * blocks.pqe_plain
    assert blocks.pqe < 1.1 * whole.pqe, (blocks.pqe, whole.pqe)
    eff_a = blocks.a.dequantize().astype(np.float64)
    eff_b = blocks.b.dequantize().astype(np.float64)
    if transforms:
        eff_a, eff_b = apply_blocks(np.linalg.inv(ta), eff_a), apply_blocks(np.linalg.inv(tb), eff_b)
    assert blocks.pqe == pytest.approx(product_error(a, b, eff_a, eff_b), rel=1e-6)


def _weighted_pqe(a, b, a_hat, b_hat, r, heads=None):
    dr = np.sqrt(r / r.mean())[:, None]
    h = (heads.head_dim, heads.kv_map) if heads else (None, None)
    return product_error(a * dr, b, a_hat * dr, b_hat, *h)


@pytest.mark.parametrize("kind", ["vo", "mlp", "blocks"])
def test_row_weights_weigh_the_product_error(kind):
    """Uniform row weights change nothing; other weights are what the kept pair is judged by: its reported errors
    are the weighted product errors of its codes, never above plain rounding's. Weighting changes B's rounding."""
    rng = np.random.default_rng(20)
    heads, cfg = None, QUICK
    if kind == "vo":
        a, b, heads = vo_pair(rng)
    else:
        a, b = heavy(rng, (48, 256)), heavy(rng, (256, 40))
        cfg = JointConfig(rounds=2, channel_block=128) if kind == "blocks" else QUICK
    plain = joint_round(a, b, GRID, GRID, heads, cfg=cfg)
    ones = joint_round(a, b, GRID, GRID, heads, cfg=cfg, row_weights=np.ones(a.shape[0]))
    assert ones.pqe == pytest.approx(plain.pqe, rel=1e-9) and np.array_equal(ones.b.codes, plain.b.codes)
    r = np.exp(rng.normal(0, 1.5, a.shape[0]))
    res = joint_round(a, b, GRID, GRID, heads, cfg=cfg, row_weights=r)
    a_hat, b_hat = res.a.dequantize().astype(np.float64), res.b.dequantize().astype(np.float64)
    assert res.pqe == pytest.approx(_weighted_pqe(a, b, a_hat, b_hat, r, heads), rel=1e-6)
    qa, qb = (quantize(x.astype(np.float32), GRID.bits, GRID.group_size, GRID.symmetric).dequantize() for x in (a, b))
    assert res.pqe_plain == pytest.approx(_weighted_pqe(a, b, qa, qb, r, heads), rel=1e-6)
    assert res.pqe < res.pqe_plain
    assert not np.array_equal(res.b.codes, plain.b.codes)


def test_row_weights_shape_is_checked():
    rng = np.random.default_rng(21)
    with pytest.raises(ValueError, match="row weights"):
        joint_round(rng.standard_normal((8, 4)), rng.standard_normal((4, 3)), GRID, GRID, row_weights=np.ones(7))
