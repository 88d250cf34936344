"""The b-bit block-wise quantization grid, bit-compatible with ONNX Runtime's MatMulNBits quantizer.

Layout (ALGORITHMS.md): ``W`` is ``[K, N]`` (``y = x W``); groups of ``block_size`` consecutive rows
of one column share a scale and an integer zero point. Codes are unsigned, ``w_hat = (q - z) s``.

Asymmetric: ``min <= 0 <= max`` forced, ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``.
Symmetric (ONNX Runtime's convention): ``z = 2^(b-1)`` fixed and ``s = -extreme / 2^(b-1)``, where
``extreme`` is the value of largest magnitude with its sign, so it lands on the code 0 (= -2^(b-1)):
the wider negative half of the signed range is used. The scale may be negative.

Arithmetic is float32 throughout with the same operation order as MLAS (reciprocal, multiply, add,
round half away from zero, clamp), so codes match ONNX Runtime bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.float32


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, ties away from zero, exact for every float32."""
    t = np.trunc(x)
    frac = x - t  # exact in floating point
    return t + np.where(np.abs(frac) >= F32(0.5), np.sign(x), F32(0)).astype(x.dtype)


@dataclass(frozen=True)
class GridSpec:
    """The grid of every layer: ``bits``, ``group_size`` consecutive K rows per scale (0: one group spans
    the whole axis), symmetric or not. Called on a torch tensor it is the straight-through fake
    quantization the learners differentiate (``fakequant``)."""

    bits: int
    group_size: int  # 0: one group spans the whole axis
    symmetric: bool

    def block(self, k: int) -> int:
        """Rows per group of a weight with ``k`` rows."""
        return self.group_size or k

    def __call__(self, w, ste: bool = True):
        from qcompiler.algorithms.fakequant import fake_quant  # torch: only the learners call a grid

        return fake_quant(w, self.bits, self.block(w.shape[0]), self.symmetric, ste)


@dataclass(frozen=True)
class QuantizedWeight:
    """A ``[K, N]`` weight on a b-bit block grid. Arrays are not copied; treat them as read-only."""

    codes: np.ndarray  # uint8 [K, N], each in [0, 2^bits - 1]
    scales: np.ndarray  # float32 [n_blocks, N]
    zero_points: np.ndarray  # uint8 [n_blocks, N]
    bits: int
    block_size: int  # rows per group along K; equals K for per-channel grids
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[0]

    def dequantize(self) -> np.ndarray:
        return dequantize(self.codes, self.scales, self.zero_points, self.block_size)

    def storage_bits(self) -> int:
        """True storage: codes at ``bits`` each, float32-free accounting of scales as 16-bit
        and zero points at ``bits`` (none when symmetric)."""
        k, n = self.shape
        zp = 0 if self.symmetric else self.n_blocks * n * self.bits
        return k * n * self.bits + self.n_blocks * n * 16 + zp


def replace_columns(qw: QuantizedWeight, cols: slice, part: QuantizedWeight) -> QuantizedWeight:
    """``qw`` with the columns ``cols`` taken from ``part`` (same grid layout; columns are independent)."""
    if (part.bits, part.block_size, part.symmetric) != (qw.bits, qw.block_size, qw.symmetric):
        raise ValueError("replace_columns: the two weights are on different grids")
    codes, scales, zps = qw.codes.copy(), qw.scales.copy(), qw.zero_points.copy()
    codes[:, cols], scales[:, cols], zps[:, cols] = part.codes, part.scales, part.zero_points
    return QuantizedWeight(codes, scales, zps, qw.bits, qw.block_size, qw.symmetric)


def n_blocks(k: int, block_size: int) -> int:
    return (k + block_size - 1) // block_size


def _blocked(w: np.ndarray, block_size: int) -> np.ndarray:
    """``[K, N]`` -> ``[n_blocks, block_size, N]``, zero-padded along K."""
    k, n = w.shape
    nb = n_blocks(k, block_size)
    pad = nb * block_size - k
    if pad:
        w = np.concatenate([w, np.zeros((pad, n), dtype=w.dtype)], axis=0)
    return w.reshape(nb, block_size, n)


def fit_grid(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group scale ``[n_blocks, N]`` (float32) and zero point (uint8) from the group's range."""
    wb = _blocked(np.asarray(w, dtype=F32), block_size)
    mx = wb.max(axis=1)
    mn = wb.min(axis=1)
    if symmetric:
        mid = 1 << (bits - 1)
        extreme = np.where(np.abs(mx) > np.abs(mn), mx, mn)
        scales = (extreme / F32(-mid)).astype(F32)
        zps = np.full(scales.shape, mid, dtype=np.uint8)
        return scales, zps
    qmax = (1 << bits) - 1
    mn = np.minimum(mn, F32(0))
    mx = np.maximum(mx, F32(0))
    scales = ((mx - mn) / F32(qmax)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp_f = np.where(scales != 0, F32(0) - mn / scales, mn).astype(F32)
    zps = np.clip(round_half_away(zp_f), 0, qmax).astype(np.uint8)
    return scales, zps


GRID_SEARCH_ELEMENTS = 1 << 22  # weight copies a grid search holds at once (x ~6 temporaries, float32)


def fit_grid_search(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool, ratios: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`fit_grid`, but each group's range is shrunk by the ratio (of ``ratios``) that
    gives the group the smallest squared rounding error (values outside are clamped)."""
    w = np.asarray(w, dtype=F32)
    n, r = w.shape[1], len(ratios)
    cols = max(1, GRID_SEARCH_ELEMENTS // max(1, w.shape[0] * r))
    if n > cols:  # columns are independent: a slice at a time bounds the R-fold temporaries
        parts = [fit_grid_search(w[:, i:i + cols], bits, block_size, symmetric, ratios) for i in range(0, n, cols)]
        return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1)
    wide = np.concatenate([w] * r, axis=1)  # [K, R*N]: every ratio at once
    s, z = fit_grid(wide * np.repeat(np.asarray(ratios, dtype=F32), n)[None], bits, block_size, symmetric)
    err = (dequantize(quantize_codes(wide, s, z, bits, block_size), s, z, block_size) - wide) ** 2
    err = _blocked(err, block_size).sum(axis=1).reshape(-1, r, n)  # [n_blocks, R, N]
    best = np.argmin(err, axis=1)[:, None]  # ties go to the earliest ratio (1.0 first: plain min/max)
    pick = lambda a: np.take_along_axis(a.reshape(-1, r, n), best, axis=1)[:, 0]  # noqa: E731
    return pick(s).astype(F32), pick(z).astype(np.uint8)


def quantize_codes(
    w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, block_size: int
) -> np.ndarray:
    """Codes ``[K, N]`` of ``w`` on a given grid: ``clamp(roundf(w * (1/s) + z), 0, 2^b - 1)``."""
    w = np.asarray(w, dtype=F32)
    k = w.shape[0]
    recip = reciprocal(scales)
    rows = np.arange(k) // block_size
    v = w * recip[rows] + zero_points[rows].astype(F32)
    return np.clip(round_half_away(v), 0, (1 << bits) - 1).astype(np.uint8)


def reciprocal(scales: np.ndarray) -> np.ndarray:
    """``1 / s`` in float32, 0 where ``s`` is 0 (how MLAS quantizes with a zero scale)."""
    with np.errstate(divide="ignore"):
        return np.where(scales != 0, F32(1) / scales, F32(0)).astype(F32)


def row_codes(w: np.ndarray, recip: np.ndarray, zero: np.ndarray, qmax: int) -> np.ndarray:
    """:func:`quantize_codes` of float32 values whose reciprocal scales and zero points (float32, same shape or
    broadcast) are given: the same codes in fewer passes (the solvers round one row at a time).
    A value below 0 clamps to 0 whatever its rounding, so only ``v >= 0`` is rounded: ``floor(v) + (frac >= .5)``
    is round-half-away there, exactly."""
    v = np.maximum(w * recip + zero, F32(0))
    t = np.floor(v)
    return np.minimum(t + (v - t >= F32(0.5)), F32(qmax)).astype(np.uint8)


def dequantize(
    codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block_size: int
) -> np.ndarray:
    rows = np.arange(codes.shape[0]) // block_size
    return ((codes.astype(F32) - zero_points[rows].astype(F32)) * scales[rows]).astype(F32)


def quantize(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest onto the block grid fitted to ``w`` (``block_size`` 0: per channel)."""
    w = np.asarray(w, dtype=F32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    bs = w.shape[0] if block_size == 0 else block_size
    scales, zps = fit_grid(w, bits, bs, symmetric)
    codes = quantize_codes(w, scales, zps, bits, bs)
    return QuantizedWeight(codes, scales, zps, bits, bs, symmetric)


def relative_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w_hat - w)) / norm if norm > 0 else 0.0
