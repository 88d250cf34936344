"""The GPTQ/GPTAQ solver in torch, batched: ``P`` problems of one shape solved in one sequential pass, on
any torch device (CUDA when the compile has one). :mod:`gptq` (numpy) is its reference: the same
objective, layouts and grids; results agree up to the order of floating-point sums (a tie broken the
other way moves a code by one step), which the tests bound.

Why batched: the sequential loop visits one row at a time, and on a GPU (or CPU torch) each visit is a
dozen small kernel launches whatever the row's width. Solving all the V·O pairs of a model (or all its
sibling sites) as one batch pays those launches once for all of them.

Layout (as :mod:`gptq`): ``W`` ``[P, K, N]`` with the sequential axis K, ``H``, ``D`` ``[P, K, K]``,
objective ``||X W_hat - X~ W||_F`` per problem. ``layout="rows"``: a site's grid, groups of ``g``
consecutive K rows per column. ``layout="columns"``: the transposed problem of a pair's first factor
(``W = A^T``): its grid groups run along N, and each sequential row is fitted on its own when reached.

Memory: besides ``W`` and the codes, about four ``K x K`` float64 matrices per problem at the peak (the
damped, ordered ``H``, its inverse Cholesky factor ``U``, GPTAQ's ``P`` and one temporary), against the
reference's dozen and more; the refinement's gradient is updated a block of rows at a time (one
matrix product per block) instead of row by row.

Grid arithmetic is float32 in MLAS's order, as :mod:`grid` (a divisor is always a tensor, never a
Python scalar: CUDA multiplies by a scalar's reciprocal instead of dividing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qcompiler.algorithms.gptq import SolverConfig
from qcompiler.algorithms.grid import GridSpec, QuantizedWeight

F32, F64 = torch.float32, torch.float64
DEFAULT = SolverConfig()


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (ties away from zero), as :func:`grid.round_half_away`."""
    t = torch.trunc(x)
    return t + torch.where((x - t).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def fit(x: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float32, integer-valued) of each group of ``x`` ``[..., g]`` (groups along the
    last axis), as :func:`grid.fit_grid`."""
    x = x.to(F32)
    mx, mn = x.amax(-1), x.amin(-1)
    if symmetric:
        mid = torch.full_like(mx, -float(1 << (bits - 1)))
        extreme = torch.where(mx.abs() > mn.abs(), mx, mn)
        return extreme / mid, -mid
    qmax = (1 << bits) - 1
    mn, mx = mn.clamp(max=0), mx.clamp(min=0)
    scale = (mx - mn) / torch.full_like(mx, qmax)
    live = scale != 0
    zp = torch.where(live, torch.zeros_like(mn) - mn / torch.where(live, scale, torch.ones_like(scale)), mn)
    return scale, round_half_away(zp).clamp(0, qmax)


def codes_of(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(roundf(x * (1/s) + z), 0, 2^b - 1)`` (float32; ``scale``/``zp`` broadcast against ``x``)."""
    recip = torch.where(scale != 0, torch.ones_like(scale) / torch.where(scale != 0, scale, torch.ones_like(scale)),
                        torch.zeros_like(scale))
    return round_half_away(x.to(F32) * recip + zp).clamp(0, (1 << bits) - 1)


def dequant(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    return (codes - zp) * scale


def fit_search(x: torch.Tensor, bits: int, symmetric: bool,
               ratios: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fit`, or with ``ratios`` the shrink of each group's range with the smallest squared rounding
    error (ties to the earliest ratio), as :func:`grid.fit_grid_search`."""
    if ratios is None:
        return fit(x, bits, symmetric)
    x = x.to(F32)
    r = torch.as_tensor(np.asarray(ratios, dtype=np.float32), device=x.device).reshape(-1, *([1] * x.dim()))
    s, z = fit(x.unsqueeze(0) * r, bits, symmetric)  # [R, ...]
    err = ((dequant(codes_of(x.unsqueeze(0), s.unsqueeze(-1), z.unsqueeze(-1), bits), s.unsqueeze(-1),
                    z.unsqueeze(-1)) - x) ** 2).sum(-1)
    best = err.argmin(0, keepdim=True)
    return s.gather(0, best)[0], z.gather(0, best)[0]


def grouped(x: torch.Tensor, g: int) -> torch.Tensor:
    """``[..., M]`` -> ``[..., ceil(M/g), g]``, zero-padded (a zero never changes a group's grid)."""
    m = x.shape[-1]
    pad = -m % g
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, g)


@dataclass
class SolverGrid:
    """The batch's grid as it fills: per problem ``[P, n_blocks, width]`` scales and zero points
    (float32) and codes ``[P, K, N]`` in the sequential layout."""

    scales: torch.Tensor
    zps: torch.Tensor
    codes: torch.Tensor


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper ``U`` with ``U^T U = H^-1`` per problem (:func:`gptq.inverse_cholesky`)."""
    flipped = h.flip(-2, -1)
    low = torch.linalg.cholesky(flipped)
    del flipped
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device).expand_as(h)
    return torch.linalg.solve_triangular(low, eye, upper=False).flip(-2, -1)


def _gather2(m: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``m[p][order[p]][:, order[p]]`` per problem."""
    k = m.shape[-1]
    m = m.gather(1, order[:, :, None].expand(-1, -1, k))
    return m.gather(2, order[:, None, :].expand(-1, k, -1))


def solve(w: torch.Tensor, h: torch.Tensor, grid: GridSpec, d: torch.Tensor | None = None,
          cfg: SolverConfig = DEFAULT, layout: str = "rows") -> SolverGrid:
    """Quantize each ``W[p]`` (``[K, N]``, float64) minimising ``||X W_hat - X~ W||``; ``layout`` as in the
    module's docstring. Returns the grid with codes in the sequential layout ``[P, K, N]``."""
    w = w.to(F64).clone()
    p_count, k, n = w.shape
    if h.shape != (p_count, k, k) or (d is not None and d.shape != h.shape):
        raise ValueError(f"H (and D) must be [P, {k}, {k}] for weights of shape {tuple(w.shape)}")
    h_in = h.to(F64)
    h = h_in.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    diag += cfg.percdamp * diag.mean(-1, keepdim=True)
    w[dead] = 0.0
    order = (torch.argsort(-diag, dim=-1, stable=True) if cfg.act_order
             else torch.arange(k, device=w.device).expand(p_count, k))
    if cfg.act_order:
        h = _gather2(h, order)
    u = _inverse_cholesky(h)
    del h
    pmat = None
    if d is not None and cfg.alpha != 0:
        d_ord = _gather2(d.to(F64), order) if cfg.act_order else d.to(F64)
        pmat = torch.triu(d_ord @ u.transpose(-1, -2), 1)
        del d_ord
        pmat = cfg.alpha * (pmat @ u)
    g = grid.group_size or (k if layout == "rows" else n)
    rows_layout = layout == "rows"
    width, nb = (n, -(-k // g)) if rows_layout else (k, -(-n // g))
    out = SolverGrid(torch.zeros(p_count, nb, width, dtype=F32, device=w.device),
                torch.zeros(p_count, nb, width, dtype=F32, device=w.device),
                torch.zeros(p_count, k, n, dtype=F32, device=w.device))
    ratios = cfg.ratios()
    batch = torch.arange(p_count, device=w.device)
    if rows_layout and cfg.act_order:  # static groups, fitted on the weights as given
        s, z = fit_search(grouped(w.transpose(1, 2), g), grid.bits, grid.symmetric, ratios)  # [P, N, nb]
        out.scales[:], out.zps[:] = s.transpose(1, 2), z.transpose(1, 2)
        block = cfg.block
    elif rows_layout:  # a block holds whole groups (GPTQ's lazy batches, as the reference)
        block = g if g >= cfg.block else (cfg.block // g) * g
    else:
        block = cfg.block
    w_seq = w.gather(1, order[:, :, None].expand(-1, -1, n)) if cfg.act_order else w

    def round_row(i: int, w1: torch.Tensor) -> torch.Tensor:
        at, orig = i % block, order[:, i]
        if rows_layout:
            if not cfg.act_order and i % g == 0:
                s, z = fit_search(w1[:, at:at + g].transpose(1, 2), grid.bits, grid.symmetric, ratios)
                out.scales[:, i // g], out.zps[:, i // g] = s, z
            grp = orig // g
            s, z = out.scales[batch, grp], out.zps[batch, grp]  # [P, N]
            c = codes_of(w1[:, at], s, z, grid.bits)
        else:
            s, z = fit_search(grouped(w1[:, at], g), grid.bits, grid.symmetric, ratios)  # [P, nb]
            out.scales[batch, :, orig], out.zps[batch, :, orig] = s, z
            s, z = s.repeat_interleave(g, dim=1)[:, :n], z.repeat_interleave(g, dim=1)[:, :n]
            c = codes_of(w1[:, at], s, z, grid.bits)
        out.codes[batch, orig] = c
        return dequant(c, s, z).to(F64)

    _sequential(w_seq, u, pmat, block, round_row)
    del u, pmat
    if cfg.refine_passes:
        if rows_layout:
            rows = torch.arange(k, device=w.device) // g
            step, zero = out.scales[:, rows], out.zps[:, rows]  # [P, K, N]
        else:
            cols = torch.arange(n, device=w.device) // g
            step, zero = out.scales[:, cols].transpose(1, 2), out.zps[:, cols].transpose(1, 2)
        refine(out.codes, step.to(F64), zero.to(F64), (1 << grid.bits) - 1, w, h_in, d, cfg.alpha,
               cfg.refine_passes)
    return out


def _sequential(w: torch.Tensor, u: torch.Tensor, p: torch.Tensor | None, block: int, round_row) -> None:
    """:func:`gptq._sequential` batched (``w`` ``[P, K, N]`` float64, modified in place)."""
    k = w.shape[1]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = w1[:, i].clone()
            q = round_row(i1 + i, w1)
            e = (row - q) / u1[:, i, i, None]
            w1[:, i:] -= u1[:, i, i:, None] * e[:, None, :]
            if p is not None:
                w1[:, i:] += p[:, i1 + i, i1 + i:i2, None] * row[:, None, :]
            w1[:, i] = q
            err[:, i] = e
        w[:, i1:i2] = w1
        if i2 < k:
            w[:, i2:] -= u[:, i1:i2, i2:].transpose(1, 2) @ err
            if p is not None:
                w[:, i2:] += p[:, i1:i2, i2:].transpose(1, 2) @ w1


def refine(codes: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, qmax: int, w: torch.Tensor, h: torch.Tensor,
           d: torch.Tensor | None, alpha: float, passes: int, block: int = 128) -> int:
    """:func:`gptq.refine` batched: coordinate descent on ``||X W_hat - X~ W||^2`` over the codes (``[P, K, N]``
    float32, modified in place; ``W_hat = (codes - zero) * step`` per entry), rows in sequential order, each
    code moving by one step when that lowers the objective. The gradient of the rows of the current block
    is updated after every row, the rest's once per block (one matrix product). Returns the moves made."""
    live = h.diagonal(dim1=-2, dim2=-1) > 0  # [P, K]
    target = h @ w if d is None or alpha == 0 else (h + alpha * d.to(F64).transpose(-1, -2)) @ w
    grad = h @ ((codes.to(F64) - zero) * step) - target  # half the gradient, [P, K, N]
    del target
    k = codes.shape[1]
    moves = 0
    for _ in range(passes):
        moved = torch.zeros((), dtype=torch.int64, device=codes.device)
        for r1 in range(0, k, block):
            r2 = min(r1 + block, k)
            g_blk, h_blk = grad[:, r1:r2], h[:, r1:r2, r1:r2]
            delta_blk = torch.zeros_like(g_blk)
            for i in range(r2 - r1):
                r = r1 + i
                g, st, cr = g_blk[:, i], step[:, r], codes[:, r]
                curv = st * st * h[:, r, r, None]
                gain_up, gain_dn = curv + 2 * st * g, curv - 2 * st * g
                ok = live[:, r, None]
                up = (gain_up < 0) & (cr < qmax) & (gain_up <= gain_dn) & ok
                dn = (gain_dn < 0) & (cr > 0) & ~up & ok
                sign = up.to(F64) - dn.to(F64)
                codes[:, r] += sign.to(codes.dtype)
                delta = sign * st
                g_blk += h_blk[:, :, i, None] * delta[:, None, :]
                delta_blk[:, i] = delta
                moved += (up | dn).sum()
            if r1 > 0:
                grad[:, :r1] += h[:, :r1, r1:r2] @ delta_blk
            if r2 < k:
                grad[:, r2:] += h[:, r2:, r1:r2] @ delta_blk
        count = int(moved)
        moves += count
        if not count:
            break
    return moves


def solve_rows(ws: list[np.ndarray], hs: list[np.ndarray], grid: GridSpec, ds: list[np.ndarray] | None = None,
               cfg: SolverConfig = DEFAULT, device: str = "cpu") -> list[QuantizedWeight]:
    """:func:`gptq.solve_rows` of each ``(W, H, D)`` (one shape), as one batch."""
    out = solve(_stack(ws, device), _stack(hs, device), grid, None if ds is None else _stack(ds, device), cfg)
    return to_weights(out, grid, out.codes)


def solve_columns(as_: list[np.ndarray], hs: list[np.ndarray], grid: GridSpec, ds: list[np.ndarray] | None = None,
                  cfg: SolverConfig = DEFAULT, device: str = "cpu") -> list[QuantizedWeight]:
    """:func:`gptq.solve_columns` of each ``(A, H, D)`` (one shape), as one batch."""
    wt = _stack([np.asarray(a).T for a in as_], device)
    out = solve(wt, _stack(hs, device), grid, None if ds is None else _stack(ds, device), cfg, layout="columns")
    return to_weights(out, grid, out.codes.transpose(1, 2))


def _stack(arrays: list[np.ndarray], device: str) -> torch.Tensor:
    return torch.stack([torch.as_tensor(np.ascontiguousarray(a), dtype=F64) for a in arrays]).to(device)


def to_weights(out: SolverGrid, grid: GridSpec, codes: torch.Tensor) -> list[QuantizedWeight]:
    """Per problem: the stored ``[K, N]`` codes (uint8) and ``[n_blocks, N]`` grid."""
    g = grid.group_size or codes.shape[1]
    c = codes.to(torch.uint8).cpu().numpy()
    s, z = out.scales.cpu().numpy(), out.zps.to(torch.uint8).cpu().numpy()
    return [QuantizedWeight(c[i], s[i], z[i], grid.bits, g, grid.symmetric) for i in range(len(c))]
