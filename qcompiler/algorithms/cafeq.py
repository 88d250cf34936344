"""CafeQ's calibration-free transform learning (ALGORITHMS.md, "CafeQ"). Pure torch, no graph.

Inputs are assumed isotropic (``E[x x^T] = I``), so a layer's loss is the Frobenius error of its
effective weight. Three learners:

- ``learn_block_transform``: block-diagonal ``T`` shared by the sites reading one input; the sites
  store ``Q(T W)`` and the model applies ``x T^-1`` online. Proxy: ``sum ||T^-1 Q(T W) - W||_F^2``.
- ``learn_vo``: one ``M_h`` per KV head folded into V (``W_v M``) and O (``M^-1 W_o`` for each query head
  of the group). Proxy: the effective errors of both factors mapped back to the original basis.
- ``learn_updown_scale``: a positive diagonal between up and down. Up's per-column grid absorbs it, so
  it acts on down's row groups; down's row errors are weighted by up's column norms (the product
  ``W_up W_down`` with the gate taken as constant).

Losses: ``ste`` (straight-through Frobenius: the forward value is the true proxy error) or ``lse``
(LogSumExp smooth range per quant group, squared). Optimizers: ``adam`` with an orthonormality penalty,
or ``cayley`` (orthogonal ``T = (I - A)(I + A)^-1``, ``A`` skew). The best iterate by the true proxy
error is kept, and the start (identity, or the random init) competes too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from qcompiler.algorithms import kernels
from qcompiler.algorithms.fakequant import blocked, quantize, quantize_backward, transformed_error, transformed_errors
from qcompiler.algorithms.grid import GridSpec
from qcompiler.algorithms.transforms import row_scale
from qcompiler.config import CafeqConfig


@dataclass(frozen=True)
class LearnConfig:
    """How one transform is learned. Its defaults are ``CafeqConfig``'s (qcompiler.config, the one place a
    default lives); the planner builds it from the compile's config."""

    loss: str = CafeqConfig.loss  # ste | lse
    optimizer: str = CafeqConfig.optimizer  # adam | cayley
    steps: int = CafeqConfig.steps
    lr: float = CafeqConfig.lr
    lr_schedule: str = CafeqConfig.lr_schedule  # constant | cosine
    ortho_reg: float = CafeqConfig.ortho_reg
    temperature: float = CafeqConfig.temperature  # LSE, applied to weights scaled to unit mean |w|
    init: str = CafeqConfig.init  # identity | orthogonal | hadamard
    seed: int = 0
    device: str = "cpu"
    # wide groups are learned on a random subset of this many columns per step (the loss is a sum over
    # columns, each with its own quant groups, so the subset gives an unbiased gradient)
    column_batch: int = CafeqConfig.column_batch
    # stop early once the best true error has not fallen by ``PLATEAU_TOL`` (relative) in this many
    # steps (0: never). On SmolLM2 the up·down scale stops after ~180 of 400 steps with the error it
    # reaches in 400; the transforms keep improving and run all 400. A slow start (small lr) can sit
    # on a plateau for ~50 steps before it falls: keep the patience well above that.
    patience: int = CafeqConfig.patience


PLATEAU_TOL = 1e-4


class _Plateau:
    """Counts the steps since the best error last fell by more than ``PLATEAU_TOL`` (relative)."""

    def __init__(self, start: float, patience: int):
        self.mark, self.since, self.patience = start, 0, patience

    def stalled(self, best: float, steps: int = 1) -> bool:
        if best < self.mark * (1 - PLATEAU_TOL):
            self.mark, self.since = best, 0
        else:
            self.since += steps
        return 0 < self.patience <= self.since


@dataclass(frozen=True)
class LearnResult:
    value: np.ndarray  # the transform (float64)
    start_error: float  # true proxy error of the start (identity unless a random init was asked)
    error: float  # true proxy error of the kept transform
    identity_error: float  # true proxy error with no transform (plain RTN)
    steps: int  # steps run: fewer than asked once the error plateaued (LearnConfig.patience)


def hadamard(n: int) -> np.ndarray:
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def initial_blocks(count: int, size: int, init: str, rng: np.random.Generator) -> np.ndarray:
    from qcompiler.algorithms.transforms import random_orthogonal

    if init == "identity":
        return np.broadcast_to(np.eye(size), (count, size, size)).copy()
    if init == "orthogonal":
        return np.stack([random_orthogonal(size, rng) for _ in range(count)])
    if init == "hadamard":  # randomised: random signs on the input side, so blocks differ
        h = hadamard(size)
        return np.stack([h * rng.choice([-1.0, 1.0], size)[:, None] for _ in range(count)])
    raise ValueError(f"unknown init {init!r}")


def _lse_range(w: torch.Tensor, grid: GridSpec, temperature: float) -> torch.Tensor:
    """Sum over quant groups of the squared smooth range (LogSumExp max minus min, 0 included)."""
    wb = blocked(w, grid.block(w.shape[0]))
    t = temperature / wb.abs().mean().clamp_min(1e-12)
    zero = wb.new_zeros(wb.shape[0], 1, wb.shape[2])
    ext = torch.cat([wb, zero], dim=1)
    smax = torch.logsumexp(t * ext, dim=1) / t
    smin = -torch.logsumexp(-t * ext, dim=1) / t
    if grid.symmetric:
        return (torch.maximum(smax, -smin) ** 2).sum()
    return ((smax - smin) ** 2).sum()


class _Inverse(torch.autograd.Function):
    """``M^-1`` of a batch of blocks, differentiable (``d(M^-1) = -M^-1 dM M^-1``). In float32 on a CPU the
    inverse is ``kernels.inverse`` (0.4x LAPACK's batched path at 64-wide blocks, as accurate); elsewhere torch's."""

    @staticmethod
    def forward(ctx, m: torch.Tensor) -> torch.Tensor:
        if kernels.available() and m.device.type == "cpu" and m.dtype == torch.float32:
            m = m.detach().contiguous()
            inv = torch.empty_like(m)
            kernels.inverse(m.numpy(), inv.numpy())
        else:
            inv = torch.linalg.inv(m)
        ctx.save_for_backward(inv)
        return inv

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (inv,) = ctx.saved_tensors
        inv_t = inv.transpose(-1, -2)
        return -(inv_t @ g @ inv_t)


class _Transform(torch.nn.Module):
    """A batch of square matrices, free (adam) or orthogonal by the Cayley map (cayley)."""

    def __init__(self, start: np.ndarray, optimizer: str, device: str):
        super().__init__()
        self.optimizer = optimizer
        self.start = torch.as_tensor(start, dtype=torch.float32, device=device)
        eye = torch.eye(self.start.shape[-1], device=device).expand_as(self.start)
        # decided once: the Cayley factor is orthogonal, so M^-1 = M^T whenever the start is orthogonal too
        self.start_orthogonal = bool(torch.allclose(self.start @ self.start.transpose(-1, -2), eye, atol=1e-4))
        self.last: torch.Tensor | None = None  # the M of the latest matrices() call
        if optimizer == "cayley":
            self.param = torch.nn.Parameter(torch.zeros_like(self.start))
        elif optimizer == "adam":
            self.param = torch.nn.Parameter(self.start.clone())
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, M^-1); ``M`` is also kept as ``last`` (the optimiser reads the iterate from it, no second inverse)."""
        m, m_inv = self._matrices()
        self.last = m
        return m, m_inv

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.optimizer == "cayley":
            a = self.param - self.param.transpose(-1, -2)
            eye = torch.eye(a.shape[-1], device=a.device).expand_as(a)
            q = torch.linalg.solve(eye + a, eye - a)  # (I + A)^-1 (I - A): orthogonal
            m = q @ self.start
            return m, m.transpose(-1, -2) if self.start_orthogonal else torch.linalg.inv(m)
        return self.param, _Inverse.apply(self.param)

    def ortho_penalty(self) -> torch.Tensor:
        if self.optimizer == "cayley":
            return self.param.new_zeros(())
        m = self.param
        eye = torch.eye(m.shape[-1], device=m.device).expand_as(m)
        return ((m.transpose(-1, -2) @ m - eye) ** 2).sum() / m.shape[0]


def _schedule(opt: torch.optim.Optimizer, cfg: LearnConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning rate over ``cfg.steps``: constant (None), or cosine from ``cfg.lr`` to 0 at the last step."""
    if cfg.lr_schedule == "constant":
        return None
    if cfg.lr_schedule == "cosine":
        steps = max(cfg.steps, 1)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    raise ValueError(f"unknown lr schedule {cfg.lr_schedule!r}")


def _optimise(module: _Transform, true_error: Callable[[], float], surrogate: Callable[[], torch.Tensor],
              cfg: LearnConfig, exact_surrogate: bool = True) -> tuple[np.ndarray, float, float, int]:
    """Run the optimiser on one problem; return (best matrices, best true error, start true error, steps).
    With the STE loss the surrogate's forward value *is* the true proxy error of the current iterate, so it is
    read from the loss before each step instead of being recomputed (:func:`_optimise_items`, one item)."""
    value, best, start, done = _optimise_items(module, lambda: np.array([true_error()]),
                                               lambda: surrogate().reshape(1), cfg, 1,
                                               exact_surrogate and cfg.loss == "ste")
    return value, float(best[0]), float(start[0]), int(done[0])


def _t(x: np.ndarray, device: str) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32, device=device)


@dataclass(frozen=True)
class _BlockProblem:
    """One sibling group's learning problem, ready for torch: the weight (``D W`` when weighted), the start
    (``T_0 D^-1``), ``D``'s diagonal, the weight's squared norm and plain RTN's (weighted) error over it."""

    w: torch.Tensor  # [K, N]
    start: np.ndarray  # [K/b, b, b]
    d: np.ndarray | None
    norm: float
    identity: float


def _block_problem(weights: list[np.ndarray], grid: GridSpec, block: int, cfg: LearnConfig,
                   row_weights: np.ndarray | None) -> _BlockProblem:
    w_np = np.concatenate(weights, axis=1)
    k = w_np.shape[0]
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the transform block {block}")
    nb = k // block
    d = row_scale(row_weights, k)
    start = initial_blocks(nb, block, cfg.init, np.random.default_rng(cfg.seed))
    w = _t(w_np, cfg.device)
    with torch.no_grad():  # plain RTN's error, weighted: the bar a learned transform must beat
        rows = 1.0 if d is None else _t(d ** 2, cfg.device)[:, None]
        rtn_error = float((((grid(w, False) - w) ** 2) * rows).sum())
    if d is not None:
        w, start = _t(w_np * d[:, None], cfg.device), start / d.reshape(nb, 1, block)
    norm = float((w ** 2).sum()) or 1.0
    return _BlockProblem(w, start, d, norm, rtn_error / norm)


def _block_result(prob: _BlockProblem, value: np.ndarray, err: float, start: float, steps: int) -> LearnResult:
    nb, block = prob.start.shape[:2]
    if prob.d is not None:
        value = value * prob.d.reshape(nb, 1, block)  # T = T' D
    if prob.identity <= err:  # learning never makes the group worse than plain RTN
        value, err = np.broadcast_to(np.eye(block), (nb, block, block)).copy(), prob.identity
    return LearnResult(value, start * prob.norm, err * prob.norm, prob.identity * prob.norm, steps)


def learn_block_transform(weights: list[np.ndarray], grid: GridSpec, block: int, cfg: LearnConfig,
                          row_weights: np.ndarray | None = None) -> LearnResult:
    """Block-diagonal ``T`` (``[K/b, b, b]``) for sites sharing one input; ``weights`` are ``[K, N_i]``.

    ``row_weights`` (``[K]``, positive): how much each input channel counts, the error becoming
    ``sum_k r_k ||row k of (T^-1 Q(T W) - W)||^2``. With ``D = diag(sqrt(r))`` that is the unweighted error of
    ``D W`` under ``T D^-1``, so the same learner runs on ``D W`` from ``T_0 D^-1`` and returns ``T = T' D``; the
    errors it reports are weighted."""
    prob = _block_problem(weights, grid, block, cfg, row_weights)
    w, norm = prob.w, prob.norm
    k, n = w.shape
    nb = k // block
    wb = w.reshape(nb, block, n)
    module = _Transform(prob.start, cfg.optimizer, cfg.device)

    def true_error() -> float:
        m, m_inv = module.matrices()
        w_hat = grid(torch.bmm(m, wb).reshape(k, n), False)
        diff = (torch.bmm(m_inv, w_hat.reshape(nb, block, n)) - wb).reshape(-1)
        return float(torch.dot(diff, diff)) / norm

    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    subsample = n > cfg.column_batch
    # the drawn columns gathered as rows of W^T (contiguous copies), then laid back as columns: in a learner's
    # loop this costs a third of a gather along the last dim of W (whose cache lines each column touches)
    w_t = w.t().contiguous() if subsample else None

    def surrogate() -> torch.Tensor:
        m, m_inv = module.matrices()
        cols = torch.randperm(n, generator=gen, device=cfg.device)[:cfg.column_batch] if subsample else None
        part = wb if cols is None else w_t.index_select(0, cols).t().contiguous().reshape(nb, block, -1)
        width = part.shape[2]
        if cfg.loss == "lse":
            tw = torch.einsum("kij,kjn->kin", m, part).reshape(k, width)
            ref = part.reshape(k, width)
            return _lse_range(tw, grid, cfg.temperature) / _lse_range(ref, grid, cfg.temperature).detach()
        return transformed_error(m, m_inv, part, grid.bits, grid.block(k), grid.symmetric) / (norm * width / n)

    value, err, start, steps = _optimise(module, true_error, surrogate, cfg, exact_surrogate=not subsample)
    return _block_result(prob, value, err, start, steps)


def learn_block_transforms(problems: list[tuple[list[np.ndarray], np.ndarray | None]], grid: GridSpec, block: int,
                           cfg: LearnConfig) -> list[LearnResult]:
    """:func:`learn_block_transform` of several sibling groups of one shape as one batched problem: each item is
    ``(weights, row_weights)``. The items are independent (a sum of their normalised errors, Adam per
    element), each with its own column draws, best iterate and early stop, so an item's result is what it gets
    alone up to the floating-point order of the batched products. One optimiser step for all: on a GPU kernel
    launches, not arithmetic, bound a learner (on a CPU a batch is slower: the planner batches on GPUs only).
    The ``lse`` loss is learned one item at a time."""
    if cfg.loss != "ste" or len(problems) < 2:
        return [learn_block_transform(ws, grid, block, cfg, r) for ws, r in problems]
    probs = [_block_problem(ws, grid, block, cfg, r) for ws, r in problems]
    if len({p.w.shape for p in probs}) > 1:
        raise ValueError("a batch of learners needs sibling groups of one shape")
    items, (k, n) = len(probs), probs[0].w.shape
    nb = k // block
    w = torch.stack([p.w for p in probs])  # [items, K, N]
    wb = w.reshape(items * nb, block, n)
    norms = torch.tensor([p.norm for p in probs], device=cfg.device)
    module = _Transform(np.concatenate([p.start for p in probs]), cfg.optimizer, cfg.device)
    gens = [torch.Generator(device=cfg.device).manual_seed(cfg.seed) for _ in probs]
    subsample = n > cfg.column_batch

    def errors(part: torch.Tensor, ste: bool) -> torch.Tensor:
        m, m_inv = module.matrices()
        if ste:
            return transformed_errors(m, m_inv, part, grid.bits, grid.block(k), grid.symmetric, items)
        width = part.shape[2]
        tw = torch.bmm(m, part).reshape(items, k, width)
        hat = torch.stack([grid(x, False) for x in tw]).reshape(items * nb, block, width)
        r = (torch.bmm(m_inv, hat) - part).reshape(items, -1)
        return (r ** 2).sum(dim=1)

    def true_errors() -> np.ndarray:
        return (errors(wb, False) / norms).cpu().numpy()

    def surrogates() -> torch.Tensor:
        if not subsample:
            return errors(wb, True) / norms
        cols = [torch.randperm(n, generator=g, device=cfg.device)[:cfg.column_batch] for g in gens]
        part = torch.stack([x.index_select(1, c) for x, c in zip(w, cols, strict=True)])
        width = part.shape[2]
        return errors(part.reshape(items * nb, block, width), True) / (norms * width / n)

    values, errs, starts, steps = _optimise_items(module, true_errors, surrogates, cfg, items,
                                                  exact_surrogate=not subsample)
    return [_block_result(p, values[i * nb:(i + 1) * nb], float(errs[i]), float(starts[i]), int(steps[i]))
            for i, p in enumerate(probs)]


def _optimise_items(module: _Transform, true_errors: Callable[[], np.ndarray], surrogates: Callable[[], torch.Tensor],
                    cfg: LearnConfig, items: int, exact_surrogate: bool) -> tuple[np.ndarray, ...]:
    """:func:`_optimise` of ``items`` independent problems (``module``'s blocks in ``items`` equal runs): the
    loss is the sum of their errors, and each keeps its own best iterate, plateau and stop. An item that stops
    keeps what it had then; the others run on. Returns (best matrices, best errors, start errors, steps)."""
    with torch.no_grad():
        start = true_errors()
    best, best_m = start.copy(), module.matrices()[0].detach().clone()
    per = best_m.shape[0] // items
    done = np.full(items, cfg.steps)
    if cfg.steps <= 0:
        return best_m.double().cpu().numpy(), best, start, np.zeros(items, dtype=int)
    opt = (torch.optim.Adam(module.parameters(), lr=cfg.lr) if cfg.optimizer == "adam"
           else torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=0.9))
    schedule = _schedule(opt, cfg)
    ste = cfg.ortho_reg == 0 and exact_surrogate
    plateaus = [_Plateau(float(s), cfg.patience) for s in start]
    active = np.ones(items, dtype=bool)

    def keep(i: int, value: float, m: torch.Tensor) -> None:
        best[i] = value
        best_m[i * per:(i + 1) * per] = m[i * per:(i + 1) * per].detach()

    def keep_current() -> None:
        """The active items' current iterates, kept where their true errors are their best."""
        with torch.no_grad():
            errs = true_errors()
            m = module.matrices()[0]
        for i in np.flatnonzero(active):
            if errs[i] < best[i]:
                keep(i, float(errs[i]), m)

    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        sv = surrogates()
        values = sv.detach().cpu().numpy()
        for i in np.flatnonzero(active & ~np.isfinite(values)):
            active[i] = False  # as one run's loop ends at a non-finite loss
        if ste:
            for i in np.flatnonzero(active):
                if values[i] < best[i]:  # the iterate the surrogate just read
                    keep(i, float(values[i]), module.last)
                if plateaus[i].stalled(float(best[i])):
                    active[i], done[i] = False, step
        if not active.any():
            break
        mask = torch.as_tensor(active, device=sv.device)
        loss = torch.where(mask, sv, 0.0).sum()
        if cfg.ortho_reg:
            loss = loss + cfg.ortho_reg * module.ortho_penalty() * items
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        if not ste and (step % 10 == 9 or step == cfg.steps - 1):
            keep_current()
            for i in np.flatnonzero(active):
                if plateaus[i].stalled(float(best[i]), 10):
                    active[i], done[i] = False, step + 1
    if ste:  # the final iterate of the items that ran every step
        keep_current()
    return best_m.double().cpu().numpy(), best, start, done


def learn_vo(a: np.ndarray, b: np.ndarray, kv_map: tuple[int, ...], head_dim: int, grid_a: GridSpec, grid_b: GridSpec,
             cfg: LearnConfig, row_weights: np.ndarray | None = None) -> LearnResult:
    """``M_h`` per KV head. ``a`` is V's column slice ``[K, n_kv d]``; ``b`` is O ``[n_q d, N]``.
    ``row_weights`` (``[K]``): how much each of V's input channels counts in V's error (``--input-weights``)."""
    return learn_vos([(a, b, row_weights)], kv_map, head_dim, grid_a, grid_b, cfg)[0]


def learn_vos(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], kv_map: tuple[int, ...], head_dim: int,
              grid_a: GridSpec, grid_b: GridSpec, cfg: LearnConfig) -> list[LearnResult]:
    """:func:`learn_vo` of V·O pairs of one shape (``(a, b, row_weights)`` each) as one batched problem: each pair
    keeps its own best iterate and early stop (:func:`_optimise_items`), so a pair gets what it gets alone up to
    the float order of the batched products; one optimiser step for all (a GPU's path, as
    :func:`learn_block_transforms`). Factors of the pairs sit side by side as columns of one grid, whose
    groups run down the columns: a group never mixes two pairs."""
    if len({(x.shape, y.shape) for x, y, _ in pairs}) > 1:
        raise ValueError("a batch of V·O learners needs pairs of one shape")
    items, d, n_q = len(pairs), head_dim, len(kv_map)
    (k, cols), n = pairs[0][0].shape, pairs[0][1].shape[1]
    n_kv = cols // d
    ta = torch.stack([_t(x, cfg.device) for x, _, _ in pairs])  # [items, K, n_kv d]
    tb = torch.stack([_t(y, cfg.device) for _, y, _ in pairs])  # [items, n_q d, N]
    scales = [row_scale(r, k) for _, _, r in pairs]
    ra = torch.stack([torch.ones(k, device=cfg.device) if x is None else _t(x ** 2, cfg.device) for x in scales])
    ra = ra[:, :, None]
    na = torch.stack([v.sum() for v in ta ** 2 * ra]).clamp_min(0)
    na = torch.where(na > 0, na, 1.0)
    nb_ = torch.stack([v.sum() for v in tb ** 2])
    nb_ = torch.where(nb_ > 0, nb_, 1.0)
    # each pair's query head j reads its KV head kv_map[j]: rows of the batch's [items * n_kv] blocks
    idx = (torch.arange(items, device=cfg.device)[:, None] * n_kv
           + torch.as_tensor(kv_map, device=cfg.device)[None]).reshape(-1)
    rng = np.random.default_rng(cfg.seed)
    start = initial_blocks(n_kv, d, cfg.init, rng)
    module = _Transform(np.concatenate([start] * items), cfg.optimizer, cfg.device)
    a4, b3 = ta.reshape(items, k, n_kv, d), tb.reshape(items * n_q, d, n)

    def per_item(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(items, -1).sum(dim=1)

    def side_by_side(x: torch.Tensor, grid: GridSpec, ste: bool) -> torch.Tensor:
        """``grid`` on each item's ``[R, C]`` matrix of ``x`` (``[items, R, C]``), the items as columns of one."""
        if items == 1:
            return grid(x[0], ste)[None]
        r, c = x.shape[1:]
        return grid(x.transpose(0, 1).reshape(r, items * c), ste).reshape(r, items, c).transpose(0, 1)

    def errors(ste: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        m, m_inv = module.matrices()
        m4, m_inv4 = m.reshape(items, n_kv, d, d), m_inv.reshape(items, n_kv, d, d)
        a_t = torch.einsum("gkhi,ghij->gkhj", a4, m4)
        a_hat = side_by_side(a_t.reshape(items, k, n_kv * d), grid_a, ste).reshape(items, k, n_kv, d)
        a_eff = torch.einsum("gkhi,ghij->gkhj", a_hat, m_inv4)
        ea = per_item((a_eff.reshape(items, k, -1) - ta) ** 2 * ra) / na
        if ste and cfg.loss == "ste":  # O's rows in heads: M_h Q(M_h^-1 B_j), the block learner's fused error
            eb = transformed_errors(m_inv[idx], m[idx], b3, grid_b.bits, grid_b.block(n_q * d), grid_b.symmetric,
                                    items)
            return ea, eb / nb_, a_t, None
        b_t = torch.einsum("qij,qjn->qin", m_inv[idx], b3).reshape(items, n_q * d, n)
        b_hat = side_by_side(b_t, grid_b, ste).reshape(items * n_q, d, n)
        b_eff = torch.einsum("qij,qjn->qin", m[idx], b_hat).reshape(items, n_q * d, n)
        return ea, per_item((b_eff - tb) ** 2) / nb_, a_t, b_t

    def true_errors() -> np.ndarray:
        ea, eb, _, _ = errors(False)
        return (ea + eb).double().cpu().numpy()

    def surrogates() -> torch.Tensor:
        ea, eb, a_t, b_t = errors(True)
        if cfg.loss == "lse":
            a_t = a_t.reshape(items, k, n_kv * d)
            return torch.stack([
                _lse_range(a_t[i], grid_a, cfg.temperature) / _lse_range(ta[i], grid_a, cfg.temperature).detach()
                + _lse_range(b_t[i], grid_b, cfg.temperature) / _lse_range(tb[i], grid_b, cfg.temperature).detach()
                for i in range(items)])
        return ea + eb

    with torch.no_grad():
        identity = (torch.stack([v.sum() for v in (side_by_side(ta, grid_a, False) - ta) ** 2 * ra]) / na
                    + torch.stack([v.sum() for v in (side_by_side(tb, grid_b, False) - tb) ** 2]) / nb_)
    identity = identity.double().cpu().numpy()
    value, err, start_err, steps = _optimise_items(module, true_errors, surrogates, cfg, items,
                                                   exact_surrogate=cfg.loss == "ste")
    out = []
    for i in range(items):
        v, e = value[i * n_kv:(i + 1) * n_kv], float(err[i])
        if identity[i] <= e:
            v, e = np.broadcast_to(np.eye(d), (n_kv, d, d)).copy(), float(identity[i])
        out.append(LearnResult(v, float(start_err[i]), e, float(identity[i]), int(steps[i])))
    return out


def _updown_error_and_grad(theta: torch.Tensor, dn: torch.Tensor, weight: torch.Tensor, norm: float,
                           grid: GridSpec) -> tuple[float, torch.Tensor]:
    """:func:`learn_updown_scale`'s error ``sum_c w_c ||(Q(d_c / s_c) - d_c / s_c) s_c||^2 / norm`` (``s = exp
    theta``) and its straight-through gradient in theta, by hand: the chain rule of autograd on that formula, in
    fewer passes over down's weight (each a torch op and its temporary; the quantizer's own two, fused, where
    ``fakequant.quantize`` runs ``kernels``). Tested against autograd of the formula."""
    c, n = dn.shape
    s = torch.exp(theta)[:, None]
    x = dn / s
    xb = blocked(x, grid.block(c))
    hat_b, saved = quantize(xb, grid.bits, grid.symmetric)
    diff = hat_b.reshape(-1, n)[:c] - x  # Q(x) - x
    e = diff * s
    we = weight[:, None] * e
    value = float(torch.vdot(we.reshape(-1), e.reshape(-1))) / norm
    g = we.mul_(2.0 / norm)  # dL/de
    g_hat = g * s
    g_x = quantize_backward(blocked(g_hat, grid.block(c)), saved, grid.bits, grid.symmetric).reshape(-1, n)[:c]
    g_x = g_x - g_hat  # e = (Q(x) - x) s: x's own term
    # dL/ds_c: e's direct s, and x = d / s (dx/ds = -x / s); ds/dtheta = s
    g_s = (g * diff).sum(dim=1) - (g_x * x).sum(dim=1) / s[:, 0]
    return value, g_s * s[:, 0]


def learn_updown_scale(up: np.ndarray, down: np.ndarray, grid_down: GridSpec, cfg: LearnConfig) -> LearnResult:
    """Positive per-channel scale ``s``: up's columns times ``s``, down's rows divided by ``s``."""
    u, dn = _t(up, cfg.device), _t(down, cfg.device)
    weight = (u ** 2).sum(dim=0)  # ||W_up[:, c]||^2: how much down's row c matters in the product
    norm = float((weight[:, None] * dn ** 2).sum()) or 1.0
    theta = torch.nn.Parameter(torch.zeros(dn.shape[0], device=cfg.device))

    with torch.no_grad():  # the error (the true one: the quantizer's forward) and gradient at s = 1
        identity, grad = _updown_error_and_grad(theta, dn, weight, norm, grid_down)
    best, best_theta = identity, theta.detach().clone()
    opt = torch.optim.Adam([theta], lr=max(cfg.lr, 1e-2))
    plateau, done = _Plateau(identity, cfg.patience), cfg.steps
    for step in range(cfg.steps):
        value = identity
        if step:
            with torch.no_grad():
                value, grad = _updown_error_and_grad(theta, dn, weight, norm, grid_down)
        theta.grad = grad
        if value < best:
            best, best_theta = value, theta.detach().clone()
        if plateau.stalled(best):
            done = step
            break
        opt.step()
        with torch.no_grad():
            theta.clamp_(-4.0, 4.0)
    return LearnResult(torch.exp(best_theta).double().cpu().numpy(), identity, best, identity, done)


def channel_order(down: np.ndarray) -> np.ndarray:
    """A permutation of the intermediate channels that groups rows of similar range into down's quant
    groups: rows sorted by their largest magnitude (outlier rows share groups instead of widening all)."""
    return np.argsort(np.abs(down).max(axis=1), kind="stable")


def weighted_row_error(up: np.ndarray, down: np.ndarray, grid: GridSpec) -> float:
    """Down's quantization error with row ``c`` weighted by ``||W_up[:, c]||^2`` (the product proxy)."""
    u, dn = torch.as_tensor(up, dtype=torch.float32), torch.as_tensor(down, dtype=torch.float32)
    w = (u ** 2).sum(dim=0)[:, None]
    with torch.no_grad():
        return float((w * (grid(dn, False) - dn) ** 2).sum() / (w * dn ** 2).sum().clamp_min(1e-30))
