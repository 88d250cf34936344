"""tools/hqq_int.py: HQQ's zero points (issue 30's integer-zero-point peer, measured before building it)."""

import numpy as np

from qcompiler.algorithms.grid import quantize
from tools.hqq_int import P, forms, hqq_zero


def _weight(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(3, size=(256, 48)) * 0.02).astype(np.float32)


def test_hqq_zero_points_lower_the_lp_error_and_start_from_rtn():
    w = _weight(0)
    scales, z0, zf = hqq_zero(w, 4, 32, iters=0)
    np.testing.assert_array_equal(zf, z0.astype(np.float64))  # no step: RTN's zero points
    scales, z0, zf = hqq_zero(w, 4, 32)
    assert np.mean(zf != z0) > 0.5  # HQQ moves most zero points off their integer
    out = forms(w, 4, 32)
    rtn = quantize(w, 4, 32, False)
    assert out["rtn"][0] == float(((rtn.dequantize().astype(np.float64) - w) ** 2).sum())
    assert out["rtn"][1] == float((np.abs(rtn.dequantize().astype(np.float64) - w) ** P).sum())
    assert out["hqq (float z)"][1] < out["rtn"][1]  # HQQ's own objective falls
    # every integer form is on the grid ONNX Runtime reads; the best neighbour is never worse than RTN's
    assert out["best integer z"][0] <= out["rtn"][0]
