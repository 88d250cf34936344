"""The fake quantizer's fused CPU kernels against its torch code: the forward bit for bit, the straight-through
gradient to rounding (its per-group sums are accumulated in another order), in float32 and float64."""

import numpy as np
import pytest
import torch

from qcompiler.algorithms import fakequant, fakequant_cpu


def test_the_kernels_are_available():
    """numba is a dependency: without it every learner silently takes the torch code, twice as slow."""
    assert fakequant_cpu.available()


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
