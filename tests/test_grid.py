import numpy as np
import pytest

from qcompiler.algorithms.grid import (
    dequantize,
    fit_grid,
    quantize,
    quantize_codes,
    reciprocal,
    relative_error,
    round_half_away,
    row_codes,
)


def test_round_half_away_matches_c_roundf():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 0.49999997, -0.49999997, 7.4999995, 0.0, -0.0, 3.0],
                 dtype=np.float32)
    assert round_half_away(x).tolist() == [1, 2, 3, -1, -2, 0, 0, 7, 0, 0, 3]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_row_codes_are_quantize_codes(bits):
    """The solvers' one-row rounding gives the grid's codes: ties (exact halves either side of every code),
    the float next to them, values beyond both ends, zero scales, negative (symmetric) scales."""
    rng = np.random.default_rng(bits)
    qmax = (1 << bits) - 1
    s = (rng.standard_normal(6000) * 0.1).astype(np.float32)
    s[::50] = 0
    z = rng.integers(0, qmax + 1, s.size).astype(np.uint8)
    w = (rng.standard_normal(s.size) * 3).astype(np.float32)
    ties = np.arange(0, s.size, 5)
    w[ties] = ((rng.integers(-3, qmax + 3, ties.size) + 0.5 - z[ties]) * s[ties]).astype(np.float32)
    w[1::5] = np.nextafter(w[ties], np.float32(np.inf))
    w[2::5] = np.nextafter(w[ties], np.float32(-np.inf))
    # unit scale, zero point 0: the code-space value is w itself, so the float just under each half is tested
    # (``floor(v + 0.5)`` rounds 0.49999997 up)
    halves = np.arange(-2, qmax + 2, dtype=np.float32) + np.float32(0.5)
    unit = np.arange(3, 3 + 2 * halves.size, 2)
    s[unit], z[unit], w[unit] = 1, 0, np.nextafter(halves, np.float32(-np.inf))
    s[unit + 1], z[unit + 1], w[unit + 1] = 1, 0, halves
    want = quantize_codes(w[None], s[None], z[None], bits, 1)[0]
    got = row_codes(w, reciprocal(s), z.astype(np.float32), qmax)
    assert got.dtype == want.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asym_grid_covers_range_and_zero(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((256, 24)).astype(np.float32)
    scales, zps = fit_grid(w, bits, 64, symmetric=False)
    assert scales.shape == (4, 24) and zps.shape == (4, 24)
    assert (scales > 0).all() and (zps <= 2 ** bits - 1).all()
    qw = quantize(w, bits, 64, symmetric=False)
    assert qw.codes.max() <= 2 ** bits - 1
    err = np.abs(qw.dequantize() - w)
    step = np.repeat(scales, 64, axis=0)
    assert (err <= step * 0.5 + 1e-6 + step * 0.51).all()  # within half a step (+ zero-point rounding)
    # 0.0 is exactly representable on an asymmetric grid with integer zero point
    zero = quantize_codes(np.zeros((256, 24), np.float32), scales, zps, bits, 64)
    assert np.array_equal(dequantize(zero, scales, zps, 64), np.zeros((256, 24), np.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sym_grid_maps_extreme_to_lowest_code(bits):
    w = np.zeros((32, 2), dtype=np.float32)
    w[0, 0], w[1, 0] = 2.0, -1.0  # extreme positive
    w[0, 1], w[1, 1] = -3.0, 1.0  # extreme negative
    qw = quantize(w, bits, 32, symmetric=True)
    mid = 2 ** (bits - 1)
    assert (qw.zero_points == mid).all()
    assert qw.codes[0, 0] == 0 and qw.codes[0, 1] == 0  # the extreme lands on -2^(b-1)
    np.testing.assert_allclose(qw.dequantize()[0], [2.0, -3.0], rtol=1e-6)


def test_ragged_k_and_per_channel():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((100, 8)).astype(np.float32)
    qw = quantize(w, 4, 32, symmetric=False)
    assert qw.n_blocks == 4 and qw.codes.shape == (100, 8)
    pc = quantize(w, 4, 0, symmetric=False)
    assert pc.block_size == 100 and pc.n_blocks == 1
    assert relative_error(w, pc.dequantize()) > relative_error(w, qw.dequantize())


def test_all_zero_block_is_exact():
    w = np.zeros((64, 4), dtype=np.float32)
    for sym in (False, True):
        qw = quantize(w, 4, 32, sym)
        assert np.array_equal(qw.dequantize(), w)


def test_more_bits_less_error():
    w = np.random.default_rng(2).standard_normal((128, 64)).astype(np.float32)
    errs = [relative_error(w, quantize(w, b, 32, False).dequantize()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 0.01 < errs[0]


def test_storage_bits_accounts_codes_scales_and_zero_points():
    w = np.ones((64, 8), dtype=np.float32)
    assert quantize(w, 3, 32, True).storage_bits() == 64 * 8 * 3 + 2 * 8 * 16
    assert quantize(w, 3, 32, False).storage_bits() == 64 * 8 * 3 + 2 * 8 * 16 + 2 * 8 * 3


@pytest.mark.parametrize("sym", [False, True])
def test_grid_search_never_rounds_a_group_worse(sym):
    from qcompiler.algorithms.grid import dequantize, fit_grid, fit_grid_search, quantize_codes

    rng = np.random.default_rng(11)
    w = (rng.standard_normal((256, 40)) * rng.exponential(1.0, (256, 40))).astype(np.float32)

    def group_err(s, z):
        e = (dequantize(quantize_codes(w, s, z, 3, 64), s, z, 64) - w) ** 2
        return e.reshape(4, 64, 40).sum(axis=1)

    plain = group_err(*fit_grid(w, 3, 64, sym))
    searched = group_err(*fit_grid_search(w, 3, 64, sym, np.linspace(1, 0.5, 11)))
    assert np.all(searched <= plain + 1e-6) and searched.sum() < 0.9 * plain.sum()


def test_grid_search_in_column_slices_is_the_same_fit(monkeypatch):
    import qcompiler.algorithms.grid as grid_mod

    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 300)).astype(np.float32)
    ratios = np.linspace(1.0, 0.6, 9)
    whole = grid_mod.fit_grid_search(w, 3, 64, False, ratios)
    monkeypatch.setattr(grid_mod, "GRID_SEARCH_ELEMENTS", 256 * 9 * 7)  # 7 columns at a time, uneven tail
    sliced = grid_mod.fit_grid_search(w, 3, 64, False, ratios)
    np.testing.assert_array_equal(whole[0], sliced[0])
    np.testing.assert_array_equal(whole[1], sliced[1])
