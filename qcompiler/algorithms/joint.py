"""Joint rounding of a coupled pair: round ``A`` and ``B`` so that the product ``A B`` stays right
(ALGORITHMS.md, "Joint / iterative adaptive rounding of pairs"). Pure numpy.

Alternate: with ``B_hat`` fixed, round ``A`` minimising ``||A_hat B_hat - A B||`` (the GPTAQ problem
with data ``X = B_hat`` and target data ``X~ = B``); then with ``A_hat`` fixed, round ``B`` the same way
(data ``A_hat``, target ``A``). Both steps are :mod:`gptq`'s solver. The best pair by product error is
kept, so the result is never worse than plain rounding of both factors.

Heads: for V·O, query head ``j`` multiplies ``A[:, cols(kv_map[j])]`` by ``B[rows_j]``; the statistics
are block-diagonal over heads. An MLP pair is one "head" spanning all channels (the activation
between the factors is treated as constant, the calibration-free proxy).

Single-matrix transforms: a factor may be stored as ``T W`` (``T`` block-diagonal on its input side,
applied online as ``x T^-1``). ``B``'s step is exact in ``T_b``'s coordinates; ``A``'s step minimises
the error of the stored ``T_a A`` (exact when ``T_a`` is orthogonal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qcompiler.algorithms.fold import product_error
from qcompiler.algorithms.gptq import SolverConfig, solve_columns, solve_rows
from qcompiler.algorithms.grid import GridSpec, QuantizedWeight, quantize
from qcompiler.algorithms.transforms import apply_blocks, row_scale
from qcompiler.config import CafeqConfig


@dataclass(frozen=True)
class JointConfig:
    rounds: int = 4  # one round = A's step then B's step
    # the pair's problem is exact (no sampling noise), so the asymmetric term gets its full weight;
    # act-order, a searched grid and coordinate-descent passes each cut MiniLM's V·O PQE further
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(
        alpha=1.0, percdamp=0.1, act_order=True, grid_search=21, refine_passes=4))
    # MLP pairs: an activation sits between the factors, so each channel's own rank-1 error is
    # also penalised with this weight (the channel's gate varies from token to token); this keeps
    # the rounding from hiding errors in directions that cancel only if the gate were constant
    channel_weight: float = 4.0
    # an MLP pair wider than this many channels is rounded a block of channels at a time (each block's
    # target the exact residual the others leave): memory grows like the weights, not like C^2
    channel_block: int = CafeqConfig.joint_channel_block


@dataclass(frozen=True)
class Heads:
    """How the product splits: ``A``'s columns and ``B``'s rows in heads of ``head_dim``; query head
    ``j`` uses ``A``'s head ``kv_map[j]``. ``None`` for an MLP: one product over all channels."""

    head_dim: int
    kv_map: tuple[int, ...]


@dataclass(frozen=True)
class JointResult:
    a: QuantizedWeight  # codes of the stored first factor (``T_a A``)
    b: QuantizedWeight  # codes of the stored second factor (``T_b B``)
    pqe_plain: float  # both factors rounded to nearest, same transforms
    pqe: float  # the kept pair
    history: tuple[float, ...]  # PQE after every step (A, B, A, B, ...)


def _inverse(blocks: np.ndarray | None) -> np.ndarray | None:
    """Dense ``T^-1`` of a block-diagonal ``T`` (``[nb, b, b]``)."""
    if blocks is None:
        return None
    nb, b, _ = blocks.shape
    out = np.zeros((nb * b, nb * b))
    for i, inv in enumerate(np.linalg.inv(blocks)):
        out[i * b:(i + 1) * b, i * b:(i + 1) * b] = inv
    return out


def _heads(heads: Heads | None, a: np.ndarray) -> Heads:
    return heads if heads is not None else Heads(a.shape[1], (0,))


def with_channel_term(h_mat: np.ndarray, d_mat: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Add ``weight * sum_c ||a_hat_c b_hat_c - a_c b_c||^2`` (each channel's own product error) to the
    objective: the diagonals of ``H`` and ``D`` grow by ``weight`` times themselves."""
    if weight == 0:
        return h_mat, d_mat
    h_mat, d_mat = h_mat.copy(), d_mat.copy()
    h_mat[np.diag_indices_from(h_mat)] *= 1 + weight
    d_mat[np.diag_indices_from(d_mat)] *= 1 + weight
    return h_mat, d_mat


def first_factor_stats(b: np.ndarray, b_hat: np.ndarray, heads: Heads) -> tuple[np.ndarray, np.ndarray]:
    """``H = X X^T`` and ``D = (X~ - X) X^T`` over ``A``'s columns, ``X = B_hat``, ``X~ = B`` per head."""
    d = heads.head_dim
    c = d * (max(heads.kv_map) + 1)
    h_mat, d_mat = np.zeros((c, c)), np.zeros((c, c))
    for j, kv in enumerate(heads.kv_map):
        cols, rows = slice(kv * d, (kv + 1) * d), slice(j * d, (j + 1) * d)
        x = b_hat[rows]
        h_mat[cols, cols] += x @ x.T
        d_mat[cols, cols] += (b[rows] - x) @ x.T
    return h_mat, d_mat


def second_factor_stats(a: np.ndarray, a_hat: np.ndarray, heads: Heads, tb_inv: np.ndarray | None = None,
                        channel_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``H = X^T X`` and ``D = (X~ - X)^T X`` over ``B``'s rows, ``X = A_hat``, ``X~ = A`` per head,
    in the coordinates of the stored ``T_b B`` (``X T_b^-1``) when ``B`` has a transform."""
    d = heads.head_dim
    r = d * len(heads.kv_map)
    h_mat, d_mat = np.zeros((r, r)), np.zeros((r, r))
    for j, kv in enumerate(heads.kv_map):
        cols, rows = slice(kv * d, (kv + 1) * d), slice(j * d, (j + 1) * d)
        x = a_hat[:, cols]
        h_mat[rows, rows] = x.T @ x
        d_mat[rows, rows] = (a[:, cols] - x).T @ x
    h_mat, d_mat = with_channel_term(h_mat, d_mat, channel_weight)
    if tb_inv is not None:
        h_mat, d_mat = tb_inv.T @ h_mat @ tb_inv, tb_inv.T @ d_mat @ tb_inv
    return h_mat, d_mat


def joint_round(a: np.ndarray, b: np.ndarray, grid_a: GridSpec, grid_b: GridSpec, heads: Heads | None = None,
                a_blocks: np.ndarray | None = None, b_blocks: np.ndarray | None = None,
                cfg: JointConfig = JointConfig(), row_weights: np.ndarray | None = None) -> JointResult:
    """Round ``A`` ``[K, C]`` and ``B`` ``[R, N]`` (float, untransformed) jointly; ``a_blocks`` /
    ``b_blocks`` are the single-matrix transforms their stored forms carry (or ``None``).

    ``row_weights`` (``[K]``): how much each of ``A``'s input channels counts (``--input-weights noise``): the
    product error becomes ``||D (A_hat B_hat - A B)||``, ``D = diag(sqrt(r))``. It weighs ``B``'s step (data
    ``D A_hat``) and the choice of the kept pair; ``A``'s step is separable over its rows, so only its grid
    search would see them, and it stays unweighted."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    dr = row_scale(row_weights, a.shape[0])
    aw = a if dr is None else a * dr[:, None]  # D A: what B's step and the error see
    channel = cfg.channel_weight if heads is None else 0.0  # V·O's product is exact: no activation between
    heads = _heads(heads, a)
    if b.shape[0] != heads.head_dim * len(heads.kv_map):
        raise ValueError(f"B has {b.shape[0]} rows; the heads need {heads.head_dim * len(heads.kv_map)}")
    spans = channel_spans(a.shape[1], cfg.channel_block, grid_b.group_size or b.shape[0],
                          0 if b_blocks is None else b_blocks.shape[1])
    blocked = len(heads.kv_map) == 1 and len(spans) > 1  # a wide MLP pair: no C x C matrix anywhere
    ta_inv = None if a_blocks is None else np.linalg.inv(a_blocks)
    tb_inv = None if b_blocks is None else np.linalg.inv(b_blocks)
    a_st = apply_blocks(a_blocks, a) if a_blocks is not None else a
    b_st = apply_blocks(b_blocks, b) if b_blocks is not None else b

    def eff(q: QuantizedWeight, t_inv: np.ndarray | None) -> np.ndarray:
        w = q.dequantize().astype(np.float64)
        return apply_blocks(t_inv, w) if t_inv is not None else w

    def pqe(a_hat: np.ndarray, b_hat: np.ndarray) -> float:
        return product_error(aw, b, weigh(a_hat), b_hat, heads.head_dim, heads.kv_map)

    def weigh(a_hat: np.ndarray) -> np.ndarray:
        return a_hat if dr is None else a_hat * dr[:, None]

    qa = quantize(a_st.astype(np.float32), grid_a.bits, grid_a.group_size, grid_a.symmetric)
    qb = quantize(b_st.astype(np.float32), grid_b.bits, grid_b.group_size, grid_b.symmetric)
    a_hat, b_hat = eff(qa, ta_inv), eff(qb, tb_inv)
    plain = pqe(a_hat, b_hat)
    best, history = (plain, qa, qb), []
    # what every round reuses: the products the blocked steps aim at, or the dense T_b^-1 of the one-block step
    target_a, target_b = (b.T @ a_st.T, aw @ b) if blocked else (None, None)
    tb_dense = None if blocked else _inverse(b_blocks)
    for _ in range(cfg.rounds):
        if blocked:
            qa = _blocked_first(a_st, b, b_hat, target_a, grid_a, cfg, channel, spans)
        else:
            h_mat, d_mat = with_channel_term(*first_factor_stats(b, b_hat, heads), channel)
            qa = solve_columns(a_st, h_mat, grid_a, d_mat, cfg.solver)
        a_hat = eff(qa, ta_inv)
        history.append(pqe(a_hat, b_hat))
        if history[-1] < best[0]:
            best = (history[-1], qa, qb)
        if blocked:
            qb = _blocked_second(b_st, aw, weigh(a_hat), target_b, tb_inv, grid_b, cfg, channel, spans)
        else:
            h_mat, d_mat = second_factor_stats(aw, weigh(a_hat), heads, tb_dense, channel)
            qb = solve_rows(b_st, h_mat, grid_b, d_mat, cfg.solver)
        b_hat = eff(qb, tb_inv)
        history.append(pqe(a_hat, b_hat))
        if history[-1] < best[0]:
            best = (history[-1], qa, qb)
    return JointResult(best[1], best[2], plain, best[0], tuple(history))


def channel_spans(c: int, block: int, group: int, t_block: int) -> list[tuple[int, int]]:
    """Blocks of a pair's ``c`` channels for :func:`joint_round`: at most ``block`` wide (one span when ``c``
    fits), cut on boundaries of ``B``'s quant groups and of ``T_b``'s blocks, about equal in width."""
    if c <= block:
        return [(0, c)]
    unit = math.lcm(max(group, 1), max(t_block, 1))
    units = -(-c // unit)
    parts = -(-c // max(block // unit * unit, unit))
    cuts = [min(c, (units * i // parts) * unit) for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True) if hi > lo]


def _block_target(h_jj: np.ndarray, g_j: np.ndarray) -> np.ndarray:
    """``H_jj^-1 G_j``: the block's least-squares target (a tiny ridge for rank-deficient blocks)."""
    ridge = 1e-10 * max(float(np.mean(np.diag(h_jj))), 1e-30)
    return np.linalg.solve(h_jj + ridge * np.eye(len(h_jj)), g_j)


def _blocked_solve(w0: np.ndarray, x: np.ndarray, product: np.ndarray, h_extra: list[np.ndarray],
                   g_extra: list[np.ndarray], spans: list[tuple[int, int]], solve, dequant) -> list:
    """Minimise ``||X V - product||^2 + sum_j (V_j^T E_j V_j - 2 V_j^T F_j W0_j)`` over rounded ``V``
    (``[C, M]``, sequential axis C) a block of rows at a time: block ``j`` sees the others fixed (rounded
    before it, float after) and is rounded by ``solve(target, H_jj)`` on its least-squares target, so it
    also absorbs the error the blocks before it left. ``X`` is ``[T, C]``; ``E_j``, ``F_j`` the block's
    share of the channel term. Returns each block's solver result."""
    current = x @ w0  # X V with V = W0 so far
    out = []
    for (lo, hi), e_j, f_j in zip(spans, h_extra, g_extra, strict=True):
        x_j = x[:, lo:hi]
        own = x_j @ w0[lo:hi]
        h_jj = x_j.T @ x_j + e_j
        g_j = x_j.T @ (product - current + own) + f_j @ w0[lo:hi]
        target = _block_target(h_jj, g_j)
        res = solve(target, h_jj)
        out.append(res)
        current += x_j @ dequant(res) - own
    return out


def _channel_share(hc: np.ndarray, gc: np.ndarray, t_inv: np.ndarray | None, lo: int, hi: int):
    """The channel term's ``E_j``, ``F_j`` on channels ``lo:hi`` (diagonal; ``T_j^-T diag T_j^-1`` in a
    transformed factor's coordinates)."""
    e, f = np.diag(hc[lo:hi]), np.diag(gc[lo:hi])
    if t_inv is None:
        return e, f
    b = t_inv.shape[1]
    ti = np.zeros((hi - lo, hi - lo))
    for i, blk in enumerate(t_inv[lo // b:hi // b]):
        ti[i * b:(i + 1) * b, i * b:(i + 1) * b] = blk
    return ti.T @ e @ ti, ti.T @ f @ ti


def _blocked_first(a_st: np.ndarray, b: np.ndarray, b_hat: np.ndarray, product: np.ndarray, grid: GridSpec,
                   cfg: JointConfig, channel: float, spans: list[tuple[int, int]]) -> QuantizedWeight:
    """``A``'s step of a wide pair: ``||A_hat B_hat - A B||`` (+ the channel term) over ``A``'s columns in
    blocks; the transposed problem has data ``B_hat^T``, ``V = A^T`` and ``product = (A B)^T`` (stored ``A``)."""
    hc = channel * np.einsum("cn,cn->c", b_hat, b_hat)
    gc = channel * np.einsum("cn,cn->c", b, b_hat)
    shares = [_channel_share(hc, gc, None, lo, hi) for lo, hi in spans]
    parts = _blocked_solve(a_st.T, b_hat.T, product, [e for e, _ in shares], [f for _, f in shares], spans,
                           lambda t, h: solve_columns(t.T, h, grid, None, cfg.solver),
                           lambda q: q.dequantize().astype(np.float64).T)
    codes = np.concatenate([q.codes for q in parts], axis=1)
    scales = np.concatenate([q.scales for q in parts], axis=1)
    zps = np.concatenate([q.zero_points for q in parts], axis=1)
    return QuantizedWeight(codes, scales, zps, grid.bits, parts[0].block_size, grid.symmetric)


def _blocked_second(b_st: np.ndarray, a: np.ndarray, a_hat: np.ndarray, product: np.ndarray,
                    tb_inv: np.ndarray | None, grid: GridSpec, cfg: JointConfig, channel: float,
                    spans: list[tuple[int, int]]) -> QuantizedWeight:
    """``B``'s step of a wide pair, in the stored ``T_b B``'s coordinates (data ``A_hat T_b^-1``), a block of
    ``B``'s rows (whole quant groups) at a time."""
    hc = channel * np.einsum("kc,kc->c", a_hat, a_hat)
    gc = channel * np.einsum("kc,kc->c", a, a_hat)
    x = a_hat if tb_inv is None else apply_blocks(np.transpose(tb_inv, (0, 2, 1)), a_hat.T).T  # A_hat T^-1
    shares = [_channel_share(hc, gc, tb_inv, lo, hi) for lo, hi in spans]
    parts = _blocked_solve(b_st, x, product, [e for e, _ in shares], [f for _, f in shares],
                           spans, lambda t, h: solve_rows(t, h, grid, None, cfg.solver),
                           lambda q: q.dequantize().astype(np.float64))
    return QuantizedWeight(np.concatenate([q.codes for q in parts]), np.concatenate([q.scales for q in parts]),
                           np.concatenate([q.zero_points for q in parts]), grid.bits, parts[0].block_size,
                           grid.symmetric)


@dataclass(frozen=True)
class JointItem:
    """One pair of a batch: the factors (float, untransformed) and their stored forms' transforms."""

    a: np.ndarray  # [K, C]
    b: np.ndarray  # [R, N]
    a_blocks: np.ndarray | None = None
    b_blocks: np.ndarray | None = None
    row_weights: np.ndarray | None = None  # [K]: A's input channels' weights (joint_round's)


def joint_round_batch(items: list[JointItem], grid_a: GridSpec, grid_b: GridSpec, heads: Heads | None = None,
                      cfg: JointConfig = JointConfig(), device: str = "cpu") -> list[JointResult]:
    """:func:`joint_round` of pairs of one shape (and one layout of transforms: all or none per factor) as one
    batch, in torch on ``device`` (:mod:`solver`); an item's ``row_weights`` as :func:`joint_round`'s.
    :func:`joint_round` is its reference."""
    import torch

    from qcompiler.algorithms import solver

    if not items:
        return []
    for side in ("a_blocks", "b_blocks"):
        if len({None if getattr(it, side) is None else getattr(it, side).shape for it in items}) > 1:
            raise ValueError(f"a batch's pairs must all have {side} of one shape, or none")
    f64 = torch.float64

    def stack(arrays) -> torch.Tensor:
        return torch.stack([torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in arrays]).to(device)

    a, b = stack([it.a for it in items]), stack([it.b for it in items])
    scales = [row_scale(it.row_weights, it.a.shape[0]) for it in items]
    dr = stack([np.ones(len(it.a)) if x is None else x for it, x in zip(items, scales, strict=True)])[:, :, None]
    aw = a * dr  # D A: what B's step and the error see
    channel = cfg.channel_weight if heads is None else 0.0
    heads = _heads(heads, items[0].a)
    if b.shape[1] != heads.head_dim * len(heads.kv_map):
        raise ValueError(f"B has {b.shape[1]} rows; the heads need {heads.head_dim * len(heads.kv_map)}")
    ta = stack([it.a_blocks for it in items]) if items[0].a_blocks is not None else None
    tb = stack([it.b_blocks for it in items]) if items[0].b_blocks is not None else None
    ta_inv = torch.linalg.inv(ta) if ta is not None else None
    tb_inv = torch.linalg.inv(tb) if tb is not None else None
    a_st, b_st = _blocks_t(ta, a), _blocks_t(tb, b)
    d, p_count = heads.head_dim, len(items)

    def dq(q: solver.SolverGrid, group: int) -> torch.Tensor:
        rows = torch.arange(q.codes.shape[1], device=q.codes.device) // group
        return solver.dequant(q.codes, q.scales[:, rows], q.zps[:, rows]).to(f64)

    ga, gb = grid_a.group_size or a.shape[1], grid_b.group_size or b.shape[1]

    def eff_a(q: solver.SolverGrid) -> torch.Tensor:
        return _blocks_t(ta_inv, dq(q, ga))

    def eff_b(q: solver.SolverGrid) -> torch.Tensor:
        return _blocks_t(tb_inv, dq(q, gb))

    def pqe(a_hat: torch.Tensor, b_hat: torch.Tensor) -> torch.Tensor:
        num = torch.zeros(p_count, dtype=f64, device=device)
        den = torch.zeros_like(num)
        a_hat = a_hat * dr
        for j, kv in enumerate(heads.kv_map):
            c, r = slice(kv * d, (kv + 1) * d), slice(j * d, (j + 1) * d)
            ref = aw[:, :, c] @ b[:, r]
            num += ((a_hat[:, :, c] @ b_hat[:, r] - ref) ** 2).sum((1, 2))
            den += (ref ** 2).sum((1, 2))
        return (num / den.clamp_min(1e-30)).sqrt()

    def rtn(w: torch.Tensor, grid: GridSpec) -> solver.SolverGrid:
        g = grid.group_size or w.shape[1]
        s, z = solver.fit(solver.grouped(w.transpose(1, 2), g), grid.bits, grid.symmetric)  # [P, N, nb]
        s, z = s.transpose(1, 2).contiguous(), z.transpose(1, 2).contiguous()
        rows = torch.arange(w.shape[1], device=w.device) // g
        return solver.SolverGrid(s, z, solver.codes_of(w, s[:, rows], z[:, rows], grid.bits))

    qa, qb = rtn(a_st, grid_a), rtn(b_st, grid_b)
    a_hat, b_hat = eff_a(qa), eff_b(qb)
    best_err = pqe(a_hat, b_hat)
    plain = best_err.clone()
    best_a, best_b = qa, qb
    history: list[torch.Tensor] = []

    def keep(err: torch.Tensor, qa: solver.SolverGrid, qb: solver.SolverGrid) -> None:
        nonlocal best_err, best_a, best_b
        history.append(err)
        better = err < best_err
        if bool(better.any()):
            best_err = torch.where(better, err, best_err)
            best_a, best_b = _where(better, qa, best_a), _where(better, qb, best_b)

    for _ in range(cfg.rounds):
        h_mat, d_mat = _first_stats_t(b, b_hat, heads)
        _channel_t(h_mat, d_mat, channel)
        out = solver.solve(a_st.transpose(1, 2), h_mat, grid_a, d_mat, cfg.solver, layout="columns")
        del h_mat, d_mat
        qa = solver.SolverGrid(out.scales, out.zps, out.codes.transpose(1, 2))
        a_hat = eff_a(qa)
        keep(pqe(a_hat, b_hat), qa, qb)
        h_mat, d_mat = _second_stats_t(aw, a_hat * dr, heads)
        _channel_t(h_mat, d_mat, channel)
        if tb_inv is not None:
            h_mat, d_mat = _congruence(tb_inv, h_mat), _congruence(tb_inv, d_mat)
        qb = solver.solve(b_st, h_mat, grid_b, d_mat, cfg.solver)
        del h_mat, d_mat
        b_hat = eff_b(qb)
        keep(pqe(a_hat, b_hat), qa, qb)
    hist = torch.stack(history, 1).cpu().numpy() if history else np.zeros((p_count, 0))
    wa, wb = solver.to_weights(best_a, grid_a, best_a.codes), solver.to_weights(best_b, grid_b, best_b.codes)
    return [JointResult(wa[i], wb[i], float(plain[i]), float(best_err[i]), tuple(float(x) for x in hist[i]))
            for i in range(p_count)]


def _where(mask, new, old):
    """Per problem: ``new``'s grid where ``mask``, else ``old``'s."""
    from qcompiler.algorithms.solver import SolverGrid

    m = mask[:, None, None]
    pairs = ((new.scales, old.scales), (new.zps, old.zps), (new.codes, old.codes))
    return SolverGrid(*(x.where(m, y) for x, y in pairs))


def _blocks_t(blocks, w):
    """``T W`` per problem for block-diagonal ``T`` (``[P, nb, b, b]``; None: ``W``), ``W`` ``[P, K, X]``."""
    if blocks is None:
        return w
    p, nb, bs, _ = blocks.shape
    return (blocks @ w.reshape(p, nb, bs, -1)).reshape(w.shape)


def _congruence(t_inv, m):
    """``T^-T M T^-1`` per problem, ``T^-1`` block-diagonal."""
    t_inv_t = t_inv.transpose(-1, -2)
    x = _blocks_t(t_inv_t, m)  # T^-T M
    return _blocks_t(t_inv_t, x.transpose(1, 2)).transpose(1, 2)  # (T^-T (T^-T M)^T)^T = T^-T M T^-1


def _channel_t(h_mat, d_mat, weight: float) -> None:
    """:func:`with_channel_term` in place."""
    if weight:
        h_mat.diagonal(dim1=-2, dim2=-1).mul_(1 + weight)
        d_mat.diagonal(dim1=-2, dim2=-1).mul_(1 + weight)


def _first_stats_t(b, b_hat, heads: Heads):
    """:func:`first_factor_stats` per problem."""
    import torch

    d = heads.head_dim
    c = d * (max(heads.kv_map) + 1)
    h_mat = torch.zeros(b.shape[0], c, c, dtype=b.dtype, device=b.device)
    d_mat = torch.zeros_like(h_mat)
    for j, kv in enumerate(heads.kv_map):
        cols, rows = slice(kv * d, (kv + 1) * d), slice(j * d, (j + 1) * d)
        x = b_hat[:, rows]
        xt = x.transpose(1, 2)
        h_mat[:, cols, cols] += x @ xt
        d_mat[:, cols, cols] += (b[:, rows] - x) @ xt
    return h_mat, d_mat


def _second_stats_t(a, a_hat, heads: Heads):
    """:func:`second_factor_stats` per problem (before the channel term and ``T_b``)."""
    import torch

    d = heads.head_dim
    r = d * len(heads.kv_map)
    h_mat = torch.zeros(a.shape[0], r, r, dtype=a.dtype, device=a.device)
    d_mat = torch.zeros_like(h_mat)
    for j, kv in enumerate(heads.kv_map):
        cols, rows = slice(kv * d, (kv + 1) * d), slice(j * d, (j + 1) * d)
        x = a_hat[:, :, cols]
        xt = x.transpose(1, 2)
        h_mat[:, rows, rows] = xt @ x
        d_mat[:, rows, rows] = (a[:, :, cols] - x).transpose(1, 2) @ x
    return h_mat, d_mat
