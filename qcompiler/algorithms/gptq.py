"""Sequential rounding with error feedback: GPTQ, and GPTAQ's asymmetric target (ALGORITHMS.md).

One solver, used by the calibrated methods (``H``, ``D`` from activations) and by CafeQ's joint
rounding of coupled pairs (``H``, ``D`` from the partner factor). Our layout: ``y = x W`` with ``W``
``[K, N]``; the *sequential* axis is K (the input features, GPTQ's "columns"), each of the N output
columns is an independent least-squares problem. The objective is

    || X W_hat - X~ W ||_F   with   H = X^T X,   D = (X~ - X)^T X   (both K x K),

where ``X`` is the data the quantized weight will see and ``X~`` the data of the target (GPTQ:
``X~ = X``, ``D = 0``). Maths in float64; every row is rounded on the ONNX Runtime grid of
``grid.py`` (float32, bit for bit), so the returned codes are what the model stores.

Two grid layouts:
- ``solve_rows``: a site's own layout, groups of ``group_size`` consecutive K rows per column; a
  group's scale is fitted on the updated weights when its first row is reached (with act-order the
  groups are fitted up front on the weights as given: "static groups").
- ``solve_columns``: the transposed problem of a pair's first factor ``A`` ``[K, C]`` in ``A B``: its
  rows are independent, its C columns are the sequential axis, and its grid groups run along K, so each
  column is fitted and rounded on its own when reached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from qcompiler.algorithms import kernels
from qcompiler.algorithms.grid import (
    F32,
    GridSpec,
    QuantizedWeight,
    fit_grid,
    fit_grid_search,
    n_blocks,
    reciprocal,
    row_codes,
)


@dataclass(frozen=True)
class SolverConfig:
    block: int = 128  # rows per lazy batch update (B)
    percdamp: float = 0.01  # H += percdamp * mean(diag H) * I
    act_order: bool = False  # sequential order by decreasing diag(H)
    alpha: float = 0.25  # weight of GPTAQ's asymmetric term (the official code's 0.25; 1 = exact)
    # groups' ranges: 0 = min/max (ONNX Runtime's quantizer); n > 1 = the best of n shrink ratios in
    # [min_ratio, 1] by the group's squared rounding error
    grid_search: int = 0
    min_ratio: float = 0.5
    # passes of coordinate descent after the sequential pass: each code may move by one step when
    # that lowers the exact objective (undamped H, alpha-weighted target), grids fixed
    refine_passes: int = 0

    def ratios(self) -> np.ndarray | None:
        return np.linspace(1.0, self.min_ratio, self.grid_search) if self.grid_search > 1 else None

    def fit(self, w: np.ndarray, grid: GridSpec, group: int) -> tuple[np.ndarray, np.ndarray]:
        r = self.ratios()
        if r is None:
            return fit_grid(w, grid.bits, group, grid.symmetric)
        return fit_grid_search(w, grid.bits, group, grid.symmetric, r)

    def __post_init__(self) -> None:
        if self.block < 1 or self.percdamp < 0 or self.alpha < 0:
            raise ValueError("block >= 1, percdamp >= 0 and alpha >= 0 are required")


def inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper ``U`` with ``U^T U = H^-1`` (``H`` symmetric positive definite): with ``J`` the reversal,
    ``J H J = L L^T`` gives ``U = J L^-1 J`` (one Cholesky and one triangular inverse)."""
    import torch

    m = torch.from_numpy(np.ascontiguousarray(h[::-1, ::-1], dtype=np.float64))
    low = torch.linalg.cholesky(m)
    inv = torch.linalg.solve_triangular(low, torch.eye(len(h), dtype=torch.float64), upper=False)
    return inv.numpy()[::-1, ::-1].copy()


def prepare_hessian(h: np.ndarray, percdamp: float) -> tuple[np.ndarray, np.ndarray]:
    """Damped copy of ``H`` with dead inputs (``diag H = 0``) set to 1; and the dead mask."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    diag = np.diag(h)
    h[np.diag_indices_from(h)] += percdamp * float(np.mean(diag))
    return h, dead


# rows of P computed at a time by gptaq_p
P_ROWS = 256


def gptaq_p(d: np.ndarray, u: np.ndarray, alpha: float) -> np.ndarray:
    """``P = alpha * triu(D U^T, 1) U``: row q is ``alpha * D[q, q+1:] inv(H[q+1:, q+1:])``.

    ``U`` is upper triangular, so rows from ``s`` on need only ``D[:, s:]`` and ``U[s:, s:]``: a block of rows at a
    time, the products skip the zero triangles (about a third of the flops of the two dense ``K^3`` products; the
    same sums, their terms in another order)."""
    k = len(u)
    p = np.zeros((k, k))
    for s in range(0, k, P_ROWS):
        e = min(s + P_ROWS, k)
        us = u[s:, s:]
        a = np.triu(d[s:e, s:] @ us.T, 1)  # this block's columns j > q (j, q counted from s)
        p[s:e, s:] = alpha * (a @ us)
    return p


# A row rounder: (row index in sequential order, current values [N]) -> dequantized values [N].
Rounder = Callable[[int, np.ndarray], np.ndarray]


# One lazy block's rows, rounded in place: (w1 [B, N], err [B, N], u1 [B, B], p1 [B, B] or None, i1) -> None.
BlockRows = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int], None]


def _sequential(w: np.ndarray, u: np.ndarray, p: np.ndarray | None, block: int, rows: BlockRows) -> None:
    """The GPTQ loop on ``w`` (float64 ``[K, N]``, modified: ends holding the rounded rows): ``rows`` rounds a lazy
    block's rows (:func:`_numpy_rows` or :func:`_kernel_rows`), the rest of ``w`` takes the block's update."""
    k = w.shape[0]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[i1:i2].copy()
        err = np.zeros_like(w1)
        rows(w1, err, u[i1:i2, i1:i2], None if p is None else p[i1:i2, i1:i2], i1)
        w[i1:i2] = w1
        if i2 < k:
            w[i2:] -= u[i1:i2, i2:].T @ err
            if p is not None:
                w[i2:] += p[i1:i2, i2:].T @ w1  # w1 holds the rounded block (the reference code's choice)


def _numpy_rows(round_row: Rounder) -> BlockRows:
    """A lazy block's rows in numpy, each rounded by ``round_row(i, w1)`` (row ``i`` in sequential order, given
    the current block): the reference the kernel is tested against."""
    def rows(w1: np.ndarray, err: np.ndarray, u1: np.ndarray, p1: np.ndarray | None, i1: int) -> None:
        for i in range(len(w1)):
            row = w1[i].copy()
            q = round_row(i1 + i, w1)
            e = (row - q) / u1[i, i]
            w1[i:] -= np.outer(u1[i, i:], e)
            if p1 is not None:
                w1[i:] += np.outer(p1[i, i:], row)
            w1[i] = q  # exact already, up to floating point
            err[i] = e
    return rows


def _kernel_rows(mode: int, order: np.ndarray, g: int, grid: GridSpec, cfg: SolverConfig, scales: np.ndarray,
                 zps: np.ndarray, codes: np.ndarray) -> BlockRows:
    """A lazy block's rows by ``kernels.sequential_block``, whose ``mode`` is the rounder of :func:`solve_rows` or
    :func:`solve_columns` (filling ``scales``, ``zps`` and ``codes`` as their ``round_row`` does)."""
    ratios = cfg.ratios()
    ratios = np.zeros(0, F32) if ratios is None else np.asarray(ratios, dtype=F32)
    order = np.ascontiguousarray(order, dtype=np.int64)
    none = np.zeros((0, 0))

    def rows(w1: np.ndarray, err: np.ndarray, u1: np.ndarray, p1: np.ndarray | None, i1: int) -> None:
        kernels.sequential_block(w1, err, np.ascontiguousarray(u1), none if p1 is None else np.ascontiguousarray(p1),
                                 p1 is not None, i1, mode, order, g, grid.bits, grid.symmetric, ratios, scales, zps,
                                 codes)
    return rows


@dataclass(frozen=True)
class Factored:
    """What a solve needs of ``H`` and ``D`` alone, whatever the columns: the dead inputs, the sequential order,
    ``U`` (``U^T U = H^-1``, damped, in that order) and GPTAQ's ``P`` (None without a target). The column parts of
    one weight share it (:func:`solve_rows_parts`): it costs a Cholesky and a few ``K^3`` products."""

    dead: np.ndarray
    order: np.ndarray
    u: np.ndarray
    p: np.ndarray | None


def factor(h: np.ndarray, d: np.ndarray | None, cfg: SolverConfig) -> Factored:
    h, dead = prepare_hessian(h, cfg.percdamp)
    d = None if d is None or cfg.alpha == 0 else np.array(d, dtype=np.float64)
    order = np.argsort(-np.diag(h), kind="stable") if cfg.act_order else np.arange(len(h))
    h = h[np.ix_(order, order)]
    if d is not None:
        d = d[np.ix_(order, order)]
    u = inverse_cholesky(h)
    return Factored(dead, order, u, gptaq_p(d, u, cfg.alpha) if d is not None else None)


def _setup(w: np.ndarray, h: np.ndarray, d: np.ndarray | None, cfg: SolverConfig, factored: Factored | None = None):
    w = np.array(w, dtype=np.float64)
    if h.shape != (w.shape[0], w.shape[0]) or (d is not None and d.shape != h.shape):
        raise ValueError(f"H (and D) must be {w.shape[0]}x{w.shape[0]} for a weight of shape {w.shape}")
    f = factored if factored is not None else factor(h, d, cfg)
    w[f.dead] = 0.0
    return w, f.order, f.u, f.p


def _refine_pass(codes: np.ndarray, step: np.ndarray, h: np.ndarray, h_cols: np.ndarray, grad_t: np.ndarray,
                 live: np.ndarray, qmax: int) -> int:
    """One pass of :func:`refine` in numpy (``kernels.refine_pass`` is tested against it); returns the moves."""
    moved = 0
    for r in np.flatnonzero(live):
        hr, st, cr, g = h[r, r], step[r], codes[r], grad_t[:, r]
        gain_up = st * st * hr + 2 * st * g  # objective change for code + 1
        gain_dn = st * st * hr - 2 * st * g
        up = (gain_up < 0) & (cr < qmax) & (gain_up <= gain_dn)
        dn = (gain_dn < 0) & (cr > 0) & ~up
        if not (up.any() or dn.any()):
            continue
        idx = np.flatnonzero(up | dn)  # few entries move: update only their gradients
        delta = np.where(up[idx], st[idx], -st[idx])
        codes[r, idx] = (cr[idx].astype(np.int16) + np.where(up[idx], 1, -1)).astype(codes.dtype)
        grad_t[idx] += np.outer(delta, h_cols[r])
        moved += idx.size
    return moved


def refine(codes: np.ndarray, step: np.ndarray, zero: np.ndarray, qmax: int, w: np.ndarray, h: np.ndarray,
           d: np.ndarray | None, alpha: float, passes: int) -> int:
    """Coordinate descent on ``||X W_hat - X~ W||^2`` over integer codes (``[K, N]``, modified in
    place; ``W_hat = (codes - zero) * step`` per entry, sequential axis K). Returns the moves made."""
    h = np.array(h, dtype=np.float64)
    h_cols = np.ascontiguousarray(h.T)  # h_cols[r] is H's column r, read contiguously
    dead = np.diag(h) <= 0
    target = h @ w if d is None or alpha == 0 else (h + alpha * np.asarray(d, dtype=np.float64).T) @ w
    # half the gradient, transposed ([N, K]): a move in row r updates a few contiguous rows of it
    grad_t = np.ascontiguousarray((h @ ((codes.astype(np.float64) - zero) * step) - target).T)
    live = ~dead
    if kernels.available():
        step = np.ascontiguousarray(step, dtype=np.float64)
        one_pass = partial(kernels.refine_pass, codes, step, h_cols, grad_t, live, np.uint8(qmax))
    else:
        one_pass = partial(_refine_pass, codes, step, h, h_cols, grad_t, live, qmax)
    moves = 0
    for _ in range(passes):
        moved = int(one_pass())
        moves += moved
        if not moved:
            break
    return moves


def _empty(k: int, n: int, grid: GridSpec) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Group length and empty scales, zero points (``[n_blocks, N]``) and codes (``[K, N]``) of a
    ``[K, N]`` weight grouped along K."""
    g = grid.group_size or k
    nb = n_blocks(k, g)
    return (g, np.zeros((nb, n), dtype=F32), np.zeros((nb, n), dtype=np.uint8),
            np.zeros((k, n), dtype=np.uint8))


def _refine_codes(codes_seq: np.ndarray, scales: np.ndarray, zps: np.ndarray, g: int, transposed: bool,
                  w: np.ndarray, h: np.ndarray, d: np.ndarray | None, grid: GridSpec, cfg: SolverConfig) -> None:
    """:func:`refine` with per-entry steps taken from a K-grouped grid; ``codes_seq`` is laid out along
    the sequential axis (the grid's K is its second axis when ``transposed``)."""
    rows = np.arange(codes_seq.shape[1] if transposed else codes_seq.shape[0]) // g  # K index -> group
    step, zero = scales[rows].astype(np.float64), zps[rows].astype(np.float64)
    if transposed:
        step, zero = step.T, zero.T
    refine(codes_seq, step, zero, (1 << grid.bits) - 1, w, h, d, cfg.alpha, cfg.refine_passes)


def solve_rows(w: np.ndarray, h: np.ndarray, grid: GridSpec, d: np.ndarray | None = None,
               cfg: SolverConfig = SolverConfig(), factored: Factored | None = None) -> QuantizedWeight:
    """Quantize ``W`` ``[K, N]`` (groups along K) minimising ``||X W_hat - X~ W||``; ``factored``: ``factor(h, d,
    cfg)`` when the caller has it already."""
    w, order, u, p = _setup(w, h, d, cfg, factored)
    k, n = w.shape
    g, scales, zps, codes = _empty(k, n, grid)
    if cfg.act_order:  # static groups, fitted on the weights as given
        scales[:], zps[:] = cfg.fit(w.astype(F32), grid, g)
        block = cfg.block
    else:
        # a block holds whole groups (a group longer than the block is one block), so a group is
        # fitted on rows that are all in the current block, as updated so far
        block = g if g >= cfg.block else (cfg.block // g) * g

    qmax = (1 << grid.bits) - 1
    recip, zero = reciprocal(scales), zps.astype(F32)  # act-order's static groups; else filled as fitted

    def round_row(i: int, w1: np.ndarray) -> np.ndarray:
        orig, at = order[i], i % block
        grp = orig // g
        if not cfg.act_order and orig % g == 0:
            s, z = cfg.fit(w1[at:at + g].astype(F32), grid, g)
            scales[grp], zps[grp] = s[0], z[0]
            recip[grp], zero[grp] = reciprocal(s[0]), z[0]
        c = row_codes(w1[at].astype(F32), recip[grp], zero[grp], qmax)
        codes[orig] = c
        return ((c.astype(F32) - zero[grp]) * scales[grp]).astype(np.float64)

    by = (_kernel_rows(kernels.STATIC if cfg.act_order else kernels.FIT_ROWS, order, g, grid, cfg, scales, zps, codes)
          if kernels.available() else _numpy_rows(round_row))
    _sequential(w[order], u, p, block, by)
    if cfg.refine_passes:
        _refine_codes(codes, scales, zps, g, False, w, h, d, grid, cfg)
    return QuantizedWeight(codes, scales, zps, grid.bits, g, grid.symmetric)


def solve_rows_parts(w: np.ndarray, h: np.ndarray, grid: GridSpec, d: np.ndarray | None, cfg: SolverConfig,
                     parts: list[tuple[int, int]]) -> list[QuantizedWeight]:
    """:func:`solve_rows` of each column part ``w[:, a:b]`` (columns are independent problems), ``H`` and ``D``
    factored once for all: each part's codes are those of its own ``solve_rows``."""
    f = factor(h, d, cfg)
    return [solve_rows(w[:, a:b], h, grid, d, cfg, f) for a, b in parts]


def solve_columns(a: np.ndarray, h: np.ndarray, grid: GridSpec, d: np.ndarray | None = None,
                  cfg: SolverConfig = SolverConfig()) -> QuantizedWeight:
    """Quantize ``A`` ``[K, C]`` (groups along K) minimising ``||A_hat X - A X~||`` row by row, with
    ``H = X X^T`` and ``D = (X~ - X) X^T`` over A's C columns (the sequential axis)."""
    wt, order, u, p = _setup(np.asarray(a).T, h, d, cfg)
    c, k = wt.shape
    g, scales, zps, codes = _empty(k, c, grid)

    qmax, rows = (1 << grid.bits) - 1, np.arange(k) // g

    def round_row(i: int, w1: np.ndarray) -> np.ndarray:
        col = order[i]
        vec = w1[i % cfg.block].astype(F32)
        s, z = cfg.fit(vec[:, None], grid, g)
        s, z = s[:, 0], z[:, 0]
        zero = z.astype(F32)[rows]
        q = row_codes(vec, reciprocal(s)[rows], zero, qmax)
        scales[:, col], zps[:, col], codes[:, col] = s, z, q
        return ((q.astype(F32) - zero) * s[rows]).astype(np.float64)

    by = (_kernel_rows(kernels.COLUMNS, order, g, grid, cfg, scales, zps, codes) if kernels.available()
          else _numpy_rows(round_row))
    _sequential(wt[order], u, p, cfg.block, by)
    if cfg.refine_passes:
        ct = np.ascontiguousarray(codes.T)
        _refine_codes(ct, scales, zps, g, True, wt, h, d, grid, cfg)
        codes[:] = ct.T
    return QuantizedWeight(codes, scales, zps, grid.bits, g, grid.symmetric)


class ActivationStats:
    """Accumulates ``H = X^T X / T`` and, with a target stream, ``D = (X~ - X)^T X / T`` over the
    ``T`` tokens of batches of activations ``[..., K]`` (float32 products per batch, float64 sums)."""

    def __init__(self, k: int, target: bool, device: str = "cpu"):
        import torch

        self.k, self.device, self.tokens = k, device, 0
        self.h = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.d = torch.zeros(k, k, dtype=torch.float64, device=device) if target else None

    def add(self, x: np.ndarray, x_target: np.ndarray | None = None) -> None:
        import torch

        xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.k)).to(self.device)
        self.h += (xs.T @ xs).double()
        if self.d is not None:
            if x_target is None:
                raise ValueError("a target stream was asked for: pass x_target")
            xt = torch.from_numpy(np.ascontiguousarray(x_target, dtype=np.float32).reshape(-1, self.k))
            self.d += ((xt.to(self.device) - xs).T @ xs).double()
        self.tokens += xs.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        t = max(self.tokens, 1)
        return ((self.h / t).cpu().numpy(), None if self.d is None else (self.d / t).cpu().numpy())
