"""The fake quantizer's fused CPU kernels against its torch code: the forward bit for bit, the straight-through
gradient to rounding (its per-group sums are accumulated in another order), in float32 and float64."""

import numpy as np
import pytest
import torch

from qcompiler.algorithms import fakequant, kernels


def test_the_kernels_are_available():
    """numba is a dependency: without it every learner silently takes the torch code, twice as slow."""
    assert kernels.available()


def _weights(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    wb = torch.randn(24, 32, 70, generator=g, dtype=dtype)
    wb[0, :, 0] = 0  # an all-zero group
    wb[1, 3:6, 1] = wb[1, :, 1].max()  # a tied max
    wb[2, :, 2] = wb[2, :, 2].abs() + 0.5  # one-signed groups: the asym zero point clamps
    wb[3, :, 3] = -wb[3, :, 3].abs() - 0.5
    wb[4, :, 4] = torch.round(wb[4, :, 4] * 3)  # ties on the grid
    return wb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False), (4, True), (8, False)])
def test_fused_kernels_are_the_torch_code(bits, sym, dtype, monkeypatch):
    wb = _weights(dtype)
    g = torch.randn(wb.shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
    got = {}
    for fused in (False, True):
        monkeypatch.setattr(fakequant, "FUSED", fused)
        hat, saved = fakequant.quantize(wb, bits, sym)
        got[fused] = hat, fakequant.quantize_backward(g, saved, bits, sym)
        assert len(saved) == (5 if fused else 7)  # each path's own saved state: the kernels did run
    assert torch.equal(got[True][0], got[False][0])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    scale = float(got[False][1].abs().max())
    np.testing.assert_allclose(got[True][1].numpy(), got[False][1].numpy(), rtol=tol, atol=tol * scale)
    assert torch.count_nonzero(got[True][1]) > 0


def test_float32_stays_float32(monkeypatch):
    """Every scalar reaches the kernels in the weight's dtype: a float64 one would promote the arithmetic and
    change the codes of values near a rounding boundary (the forward is compared bit for bit above)."""
    monkeypatch.setattr(fakequant, "FUSED", True)
    wb = _weights(torch.float32)
    hat, saved = fakequant.quantize(wb, 4, False)
    assert hat.dtype == torch.float32 and all(t.dtype == torch.float32 for t in saved)
    qmax, mid = fakequant._constants(wb, 4)
    assert isinstance(qmax, np.float32) and isinstance(mid, np.float32)


def test_a_gpu_or_half_tensor_takes_the_torch_code(monkeypatch):
    monkeypatch.setattr(fakequant, "FUSED", True)
    assert fakequant._fused(torch.zeros(1, 2, 3))
    assert not fakequant._fused(torch.zeros(1, 2, 3, dtype=torch.float16))
    assert not fakequant._fused(torch.zeros(1, 2, 3, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_is_lapacks(dtype):
    """Gauss-Jordan with partial pivoting: as accurate as LAPACK's inverse, a block that needs pivoting included."""
    g = torch.Generator().manual_seed(3)
    m = torch.eye(64, dtype=dtype) + 0.3 * torch.randn(5, 64, 64, generator=g, dtype=dtype)
    m[1] = m[1][torch.randperm(64, generator=g)]  # a zero-free diagonal is not given: rows must be swapped
    m[2, 0, 0] = 0.0
    out = torch.empty_like(m)
    kernels.inverse(m.numpy(), out.numpy())
    ref = torch.linalg.inv(m.double())
    lapack = torch.linalg.inv(m).double()
    eps = torch.finfo(dtype).eps
    err, err_lapack = float((out.double() - ref).abs().max()), float((lapack - ref).abs().max())
    assert err <= max(10 * err_lapack, 1e3 * eps * float(ref.abs().max()))
    eye = torch.eye(64, dtype=torch.float64)
    assert float((m.double() @ out.double() - eye).abs().max()) < 1e3 * eps


def test_a_singular_block_gives_non_finite_values_not_an_exception():
    m = np.eye(8, dtype=np.float32)[None].repeat(2, 0)
    m[1, 3] = m[1, 2]
    out = np.empty_like(m)
    kernels.inverse(m, out)
    np.testing.assert_allclose(out[0], np.eye(8))
    assert not np.isfinite(out[1]).all()


def test_the_learners_inverse_and_its_gradient_are_torchs():
    """``cafeq._Inverse`` (the kernel in float32 on a CPU): the value and the gradient of a loss through it are
    torch.linalg.inv's."""
    from qcompiler.algorithms.cafeq import _Inverse

    g = torch.Generator().manual_seed(4)
    m0 = torch.eye(16) + 0.2 * torch.randn(3, 16, 16, generator=g)
    up = torch.randn(3, 16, 16, generator=g)
    got = []
    for f in (_Inverse.apply, torch.linalg.inv):
        m = m0.clone().requires_grad_(True)
        inv = f(m)
        (inv * up).sum().backward()
        got.append((inv.detach(), m.grad))
    np.testing.assert_allclose(got[0][0].numpy(), got[1][0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[0][1].numpy(), got[1][1].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_target", [False, True])
def test_refine_pass_is_the_numpy_loop(with_target, monkeypatch):
    """``gptq.refine`` through ``kernels.refine_pass`` makes the same moves as its numpy loop (a dead input, and
    codes at both ends of the grid, included)."""
    from qcompiler.algorithms import gptq
    from qcompiler.algorithms.grid import quantize as rtn

    rng = np.random.default_rng(5)
    k, n = 96, 40
    x = rng.standard_normal((300, k))
    h = x.T @ x / 300
    h[7, :], h[:, 7] = 0.0, 0.0  # a dead input
    d = 0.1 * rng.standard_normal((k, k)) if with_target else None
    w = rng.standard_normal((k, n))
    q = rtn(w.astype(np.float32), 3, 32, False)
    rows = np.arange(k) // 32
    step, zero = q.scales[rows].astype(np.float64), q.zero_points[rows].astype(np.float64)
    got = {}
    for fused in (False, True):
        monkeypatch.setattr(kernels, "available", lambda fused=fused: fused)
        codes = q.codes.copy()
        moves = gptq.refine(codes, step, zero, 7, w, h, d, 0.5, 4)
        got[fused] = codes, moves
    assert got[True][1] == got[False][1] > 0
    np.testing.assert_array_equal(got[True][0], got[False][0])
    assert (got[True][0] == 0).any() and (got[True][0] == 7).any()


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("act_order,grid_search,alpha,bits,sym,group", [
    (False, 0, 0.0, 4, False, 32), (True, 0, 0.25, 3, True, 32), (False, 21, 0.25, 4, True, 48),
    (True, 21, 1.0, 3, False, 0), (False, 5, 0.0, 2, False, 40)])
def test_sequential_block_is_the_numpy_solver(layout, act_order, grid_search, alpha, bits, sym, group, monkeypatch):
    """``solve_rows`` / ``solve_columns`` through ``kernels.sequential_block`` give the numpy loop's codes, scales
    and zero points bit for bit: act-order or not, a searched grid, GPTAQ's target, a group that spans lazy blocks
    (48 against blocks of 32), partial groups (K = 100) and per-channel groups (0)."""
    from qcompiler.algorithms import gptq
    from qcompiler.algorithms.grid import GridSpec

    rng = np.random.default_rng(bits * 7 + group)
    k, n = 100, 36
    x = rng.standard_normal((400, k)) * rng.uniform(0.2, 3, k)
    h = x.T @ x / 400
    h[5, :], h[:, 5] = 0.0, 0.0  # a dead input
    d = 0.05 * rng.standard_normal((k, k)) if alpha else None
    w = rng.standard_normal((k, n) if layout == "rows" else (n, k))
    w[3, 4] = 9.0  # an outlier
    cfg = gptq.SolverConfig(block=32, act_order=act_order, grid_search=grid_search, alpha=alpha, refine_passes=1)
    grid = GridSpec(bits, group, sym)
    solve = gptq.solve_rows if layout == "rows" else gptq.solve_columns
    got = {}
    for fused in (False, True):
        monkeypatch.setattr(kernels, "available", lambda fused=fused: fused)
        got[fused] = solve(w, h, grid, d, cfg)
    for name in ("codes", "scales", "zero_points"):
        np.testing.assert_array_equal(getattr(got[True], name), getattr(got[False], name), err_msg=name)
    assert len(np.unique(got[True].codes)) == 1 << bits
