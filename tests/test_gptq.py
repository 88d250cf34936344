"""The sequential-rounding solver (GPTQ / GPTAQ) against an independent textbook implementation,
its special cases, and its objective."""

import numpy as np
import pytest

from qcompiler.algorithms.gptq import (
    GridSpec,
    SolverConfig,
    gptaq_p,
    inverse_cholesky,
    prepare_hessian,
    refine,
    solve_columns,
    solve_rows,
)
from qcompiler.algorithms.grid import dequantize, fit_grid, quantize, quantize_codes


def correlated(rng, tokens, k, decay=30.0):
    mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / decay)
    return rng.standard_normal((tokens, k)) @ mix


def naive_gptq(w, h, grid, percdamp=0.01):
    """Textbook GPTQ/OBQ: quantize row i, spread its error with the explicit inverse Hessian of the rows
    not yet quantized, then eliminate row i from that inverse. No Cholesky, no lazy batches."""
    w = np.array(w, dtype=np.float64)
    k, n = w.shape
    h, dead = prepare_hessian(h, percdamp)
    w[dead] = 0
    hinv = np.linalg.inv(h)
    g = grid.group_size or k
    out = np.zeros_like(w)
    scales = zps = None
    for i in range(k):
        if i % g == 0:
            scales, zps = fit_grid(w[i:i + g].astype(np.float32), grid.bits, g, grid.symmetric)
        c = quantize_codes(w[i][None], scales[:1], zps[:1], grid.bits, 1)
        q = dequantize(c, scales[:1], zps[:1], 1)[0].astype(np.float64)
        out[i] = q
        e = (w[i] - q) / hinv[i, i]
        w[i + 1:] -= np.outer(hinv[i + 1:, i], e)
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return out


def objective(x, xt, w, w_hat):
    return float(np.linalg.norm(x @ w_hat - xt @ w))


GRIDS = [GridSpec(3, 32, False), GridSpec(4, 32, True), GridSpec(3, 0, False)]


@pytest.mark.parametrize("grid", GRIDS)
def test_solver_matches_textbook_gptq(grid):
    rng = np.random.default_rng(1)
    x = correlated(rng, 400, 96)
    w = rng.standard_normal((96, 40))
    got = solve_rows(w, x.T @ x, grid, cfg=SolverConfig(block=32, percdamp=0.01)).dequantize()
    want = naive_gptq(w, x.T @ x, grid)
    # the same decisions up to floating-point ties: almost every code equal, same objective
    assert np.mean(np.isclose(got, want, atol=1e-6)) > 0.99
    assert objective(x, x, w, got) == pytest.approx(objective(x, x, w, want), rel=1e-3)


@pytest.mark.parametrize("grid", GRIDS)
def test_identity_hessian_is_round_to_nearest(grid):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    rtn = quantize(w, grid.bits, grid.group_size, grid.symmetric)
    got = solve_rows(w, np.eye(64), grid)
    assert np.array_equal(got.codes, rtn.codes) and np.array_equal(got.scales, rtn.scales)
    cols = solve_columns(w, np.eye(24), grid)  # A's step: grid along K, sequential along columns
    assert np.array_equal(cols.codes, rtn.codes) and np.array_equal(cols.zero_points, rtn.zero_points)


def test_lazy_batches_change_nothing():
    rng = np.random.default_rng(3)
    x = correlated(rng, 300, 128)
    w = rng.standard_normal((128, 30))
    grid = GridSpec(3, 32, False)
    a = solve_rows(w, x.T @ x, grid, cfg=SolverConfig(block=128)).dequantize()
    b = solve_rows(w, x.T @ x, grid, cfg=SolverConfig(block=1)).dequantize()
    assert np.mean(np.isclose(a, b, atol=1e-6)) > 0.99


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    rng = np.random.default_rng(4)
    x = correlated(rng, 1000, 128)
    w = rng.standard_normal((128, 64))
    grid = GridSpec(3, 32, False)
    rtn = quantize(w.astype(np.float32), 3, 32, False).dequantize()
    got = solve_rows(w, x.T @ x, grid, cfg=SolverConfig(act_order=act_order)).dequantize()
    assert objective(x, x, w, got) < 0.85 * objective(x, x, w, rtn)


def test_gptaq_term():
    rng = np.random.default_rng(5)
    x = correlated(rng, 1500, 64)
    xt = x + 0.3 * rng.standard_normal(x.shape) * x.std(axis=0)
    w = rng.standard_normal((64, 48))
    h, d = x.T @ x, (xt - x).T @ x
    grid = GridSpec(3, 32, False)
    gptq = solve_rows(w, h, grid).dequantize()
    # alpha = 0 is GPTQ exactly, whatever D is
    assert np.array_equal(solve_rows(w, h, grid, d, SolverConfig(alpha=0.0)).dequantize(), gptq)
    # GPTAQ repairs part of the input error that GPTQ ignores: it closes a share of the gap to the
    # float least-squares optimum
    full = solve_rows(w, h, grid, d, SolverConfig(alpha=1.0)).dequantize()
    opt = np.linalg.lstsq(x, xt @ w, rcond=None)[0]
    gap = objective(x, xt, w, gptq) - objective(x, xt, w, opt)
    assert objective(x, xt, w, gptq) - objective(x, xt, w, full) > 0.1 * gap
    # P's row q is alpha * D[q, q+1:] inv(H[q+1:, q+1:]) (H damped)
    hd, _ = prepare_hessian(h, 0.01)
    p = gptaq_p(d, inverse_cholesky(hd), 0.5)
    for q in (0, 7, 40, 62):
        want = 0.5 * d[q, q + 1:] @ np.linalg.inv(hd[q + 1:, q + 1:])
        np.testing.assert_allclose(p[q, q + 1:], want, rtol=1e-6, atol=1e-8 * np.abs(want).max())
        assert np.all(p[q, :q + 1] == 0)


@pytest.mark.parametrize("k", [37, 64, 100])
def test_gptaq_p_by_blocks_of_rows_is_the_dense_product(monkeypatch, k):
    """``gptaq_p`` computes ``alpha triu(D U^T, 1) U`` a block of rows at a time on the triangles: the dense formula's
    values (to float64 rounding) for any K against the block (a block, several, a part block), zeros on and below
    the diagonal."""
    import qcompiler.algorithms.gptq as gq

    monkeypatch.setattr(gq, "P_ROWS", 16)
    rng = np.random.default_rng(k)
    x = correlated(rng, 400, k)
    xt = x + 0.2 * rng.standard_normal(x.shape)
    h, d = x.T @ x, (xt - x).T @ x
    u = inverse_cholesky(prepare_hessian(h, 0.01)[0])
    want = 0.7 * np.triu(d @ u.T, 1) @ u
    got = gptaq_p(d, u, 0.7)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    assert np.all(np.tril(got) == 0)


def test_refinement_lowers_the_objective():
    rng = np.random.default_rng(6)
    x = correlated(rng, 800, 96)
    w = rng.standard_normal((96, 40))
    h = x.T @ x
    grid = GridSpec(3, 32, True)
    base = objective(x, x, w, solve_rows(w, h, grid).dequantize())
    refined = objective(x, x, w, solve_rows(w, h, grid, cfg=SolverConfig(refine_passes=3)).dequantize())
    assert refined < base


def naive_refine(codes, step, zero, qmax, w, h, d, alpha, passes):
    """Textbook coordinate descent: rows in order; each row's entries judged on the objective's gradient
    as the previous rows left it (the entries of one row do not interact), recomputed from scratch."""
    codes = codes.astype(np.int64)
    target = (h + alpha * d.T) @ w if d is not None else h @ w
    for _ in range(passes):
        moved = 0
        for r in range(codes.shape[0]):
            if h[r, r] <= 0:
                continue
            g = (h @ ((codes - zero) * step) - target)[r]
            for c in range(codes.shape[1]):
                st = step[r, c]
                up, dn = st * st * h[r, r] + 2 * st * g[c], st * st * h[r, r] - 2 * st * g[c]
                if up < 0 and codes[r, c] < qmax and up <= dn:
                    codes[r, c] += 1
                    moved += 1
                elif dn < 0 and codes[r, c] > 0:
                    codes[r, c] -= 1
                    moved += 1
        if not moved:
            break
    return codes


@pytest.mark.parametrize("target", [False, True])
def test_refinement_is_plain_coordinate_descent(target):
    rng = np.random.default_rng(11)
    k, n, qmax = 48, 20, 7
    x = correlated(rng, 300, k)
    h = x.T @ x / 300
    h += rng.standard_normal(h.shape) * 1e-3  # not exactly symmetric: column r of H is what row r moves
    h[5] = h[:, 5] = 0  # a dead input is left alone
    d = rng.standard_normal((k, k)) * 0.1 if target else None
    w = rng.standard_normal((k, n))
    step = rng.uniform(0.3, 0.6, (k, n))
    zero = rng.integers(2, 6, (k, n)).astype(np.float64)
    start = np.clip(np.round(w / step + zero) + rng.integers(-1, 2, (k, n)), 0, qmax).astype(np.uint8)
    got = start.copy()
    moves = refine(got, step, zero, qmax, w, h, d, 0.7, 3)
    want = naive_refine(start, step, zero, qmax, w, h, d, 0.7, 3)
    assert moves > 0 and np.array_equal(got, want)


def test_dead_inputs_get_zero_weights():
    rng = np.random.default_rng(7)
    x = correlated(rng, 200, 32)
    x[:, [3, 17]] = 0
    got = solve_rows(rng.standard_normal((32, 8)), x.T @ x, GridSpec(4, 16, False)).dequantize()
    assert np.all(got[[3, 17]] == 0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="H"):
        solve_rows(np.zeros((8, 4)), np.eye(4), GridSpec(4, 16, False))
