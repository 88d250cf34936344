"""SINQ's Sinkhorn-normalised scales (arXiv 2509.22944), for weights stored as ``[K, N]`` (``x W``).

SINQ writes a weight as ``diag(t) W~ diag(s)`` (here: ``t`` over the input channels K, ``s`` over the
outputs N) with ``t`` and ``s`` chosen so that the rows and columns of ``W~`` have balanced standard
deviations (a Sinkhorn-Knopp-like iteration in the log domain that keeps the iterate of least
*imbalance*, the largest over the smallest row/column std), then rounds ``W~`` to nearest.

The paper tiles the input dimension into the quantization groups and balances each tile on its own;
so does :func:`sinkhorn_scales`. A tile's output scales ``s`` are per (group, output) factors, which the
group's own quantization scale absorbs exactly; only ``t`` has to live somewhere at run time: the
compiler folds it into the op before the weight (a norm's gain, V's columns for O, up's columns for
down) or applies it as an online ``x * t``. Pure numpy, no graph.
"""

from __future__ import annotations

import numpy as np

ITERATIONS = 16  # the paper's code runs 16 and keeps the best iterate
CLIP = (1e-3, 1e3)  # stds are clipped to this range before they steer a step
STEP = (0.7, 2.0)  # one step changes a scale by at most this factor (down, up)
LOG_RANGE = (-0.3, 10.0)  # bounds of the accumulated log scales


def _stds(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The std of each row and each column of every ``[..., K, N]`` matrix."""
    return w.std(axis=-1, ddof=1), w.std(axis=-2, ddof=1)


def _imbalance(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    lo = np.maximum(np.minimum(r.min(axis=-1), c.min(axis=-1)), 1e-12)
    return np.maximum(r.max(axis=-1), c.max(axis=-1)) / lo


def imbalance(w: np.ndarray) -> np.ndarray:
    """Largest over smallest std of the rows and columns of each ``[..., K, N]`` matrix."""
    return _imbalance(*_stds(w))


def sinkhorn_tiles(tiles: np.ndarray, iterations: int = ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """``(t, s)`` for a stack of tiles ``[G, k, N]``: ``tiles / t[..., None] / s[:, None, :]`` is the
    balanced tile of least imbalance met (the start, ``t = s = 1``, included). Each tile stops at its
    first step that does not improve on its best, as the paper's code does."""
    m = tiles.astype(np.float64)
    g, k, n = m.shape
    r0, c0 = _stds(m)
    target = np.minimum(np.clip(r0, *CLIP).min(axis=1), np.clip(c0, *CLIP).min(axis=1)) + 1e-6  # [G]
    log_t, log_s = np.zeros((g, k)), np.zeros((g, n))
    best_t, best_s = np.ones((g, k)), np.ones((g, n))
    best = np.full(g, np.inf)
    running = np.ones(g, dtype=bool)
    for _ in range(iterations + 1):
        r, c = _stds(m / np.exp(log_t)[:, :, None] / np.exp(log_s)[:, None, :])  # one pass per step
        ib = _imbalance(r, c)
        better = running & (ib <= best)
        best = np.where(better, ib, best)
        best_t[better], best_s[better] = np.exp(log_t[better]), np.exp(log_s[better])
        running &= ib <= best
        if not running.any():
            break
        step_t = np.log(np.clip(np.clip(r, *CLIP) / target[:, None], *STEP))
        step_s = np.log(np.clip(np.clip(c, *CLIP) / target[:, None], *STEP))
        log_t = np.where(running[:, None], np.clip(log_t + step_t, *LOG_RANGE), log_t)
        log_s = np.where(running[:, None], np.clip(log_s + step_s, *LOG_RANGE), log_s)
    return best_t, best_s


def sinkhorn_scales(w: np.ndarray, group: int | None, iterations: int = ITERATIONS) -> np.ndarray:
    """The input-channel scales ``t`` (``[K]``, positive) of a ``[K, N]`` weight balanced tile by tile
    (tiles: its quantization groups of ``group`` rows, the last one shorter where ``group`` does not
    divide K, as the quantizer's; None: one tile). The weight to round is ``w / t[:, None]``; the model
    multiplies its input by ``t``."""
    k = w.shape[0]
    size = min(group or k, k)
    full = k // size * size
    t = [sinkhorn_tiles(w[:full].reshape(k // size, size, w.shape[1]), iterations)[0].reshape(full)]
    if full < k:
        t.append(sinkhorn_tiles(w[None, full:], iterations)[0].reshape(k - full) if k - full > 1 else np.ones(1))
    return np.concatenate(t)
