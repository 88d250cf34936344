"""The transform planner shared by cafeq, rotate and cafeq+gptaq (a :class:`Recipe` says which parts
each uses): learned or random transforms, then rounding.

Order: pair transforms first (folded into the weights, free at run time), then single-matrix
block-diagonal transforms on the sites whose input side no pair transform covers (an online op each,
shared by a sibling group), then round-to-nearest of the transformed weights. The online ops are
chosen cheapest first within ``online_budget``, a fraction of run time in the regime's cost model
(methods/online_cost.py); a learned transform that does not beat plain RTN is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler.algorithms.cafeq import (
    LearnConfig,
    LearnResult,
    channel_order,
    initial_blocks,
    learn_block_transform,
    learn_block_transforms,
    learn_updown_scale,
    learn_vo,
    learn_vos,
    weighted_row_error,
)
from qcompiler.algorithms.fold import fold_attn_vo, fold_mlp, product_error
from qcompiler.algorithms.grid import GridSpec, QuantizedWeight, quantize, replace_columns
from qcompiler.algorithms.joint import (
    Heads,
    JointConfig,
    JointItem,
    JointResult,
    channel_spans,
    joint_round,
    joint_round_batch,
)
from qcompiler.algorithms.sink import activation_factor, sink_ratio
from qcompiler.algorithms.sinq import sinkhorn_scales
from qcompiler.algorithms.transforms import apply_blocks
from qcompiler.config import CafeqConfig, QuantConfig
from qcompiler.device import resolve_device
from qcompiler.errors import QCompilerError
from qcompiler.methods.online_cost import StepCost, candidate_units, cheapest_first, step_cost
from qcompiler.plan import OnlineTransform, PairStats, PairTransform, QuantPlan, SitePlan, SiteStats
from qcompiler.resources import note_workers_peak
from qcompiler.sites import ATTN_VO, MLP_UP_DOWN, Analysis, CoupledPair, LinearSite
from qcompiler.workers import TaskPool, make_pool, open_pool, resolve_jobs

log = logging.getLogger(__name__)

VO_BATCH = "vo-batch"  # a task of V·O pairs of one shape learned as one problem (batched learners)

# (pair transforms, online transforms, stored weights by site id) -> rounded sites by id, each with
# ``weight`` (QuantizedWeight), ``proxy``, ``rtn_proxy`` and ``holdout_error`` (methods/gptq.Rounded)
Rounder = Callable[[Sequence[PairTransform], Sequence[OnlineTransform], Mapping[str, np.ndarray]], Mapping[str, Any]]


@dataclass(frozen=True)
class Recipe:
    """Which parts of the planner a method uses."""

    name: str  # recorded in the plan
    learned: bool  # learn the transforms (cafeq) or draw random orthogonal ones (rotate: no up·down)
    joint_rounding: bool  # joint rounding of coupled pairs after the transforms (cafeq)
    # sinq: diagonal transforms from Sinkhorn-balanced quantization groups (algorithms/sinq.py) instead of
    # learned or random ones, on O (folded into V), on down (folded into up) and on every other unit
    # (absorbed into the gain before it where there is one)
    sinkhorn: bool = False

    def block_size(self, cfg: CafeqConfig) -> int:
        """The block of the single transforms: 1 (diagonal) for sinq, else ``--block-size``."""
        return 1 if self.sinkhorn else cfg.block_size

    def covers(self, p: CoupledPair) -> bool:
        """Whether a transform of pair ``p`` covers its consumer's input side (no single transform there)."""
        return p.kind == ATTN_VO or (self.sinkhorn and p.kind == MLP_UP_DOWN)


@dataclass(frozen=True)
class Run:
    """Where and how the planner runs: the torch device, worker processes, the seed."""

    device: str = "auto"
    jobs: int = 0
    seed: int = 0
    executor: str = "local"  # local | ray (workers.make_pool)
    ray_address: str = ""


def joint_configs(cfg: CafeqConfig) -> dict[str, JointConfig]:
    """Joint rounding's settings per pair kind, from ``--joint-*`` (tools/joint_ablation.py uses them too)."""
    return {ATTN_VO: JointConfig(rounds=cfg.joint_rounds),
            MLP_UP_DOWN: JointConfig(rounds=cfg.joint_mlp_rounds, channel_weight=cfg.joint_channel_weight,
                                     channel_block=cfg.joint_channel_block)}


def _rtn(w: np.ndarray, quant: QuantConfig) -> np.ndarray:
    return quantize(w, quant.bits, quant.group_size, quant.symmetric).dequantize().astype(np.float64)


class _Planner:
    def __init__(self, analysis: Analysis, weight_of: Callable[[LinearSite], np.ndarray], quant: QuantConfig,
                 cfg: CafeqConfig, recipe: Recipe, step: StepCost, progress: bool, rounder: Rounder | None = None,
                 online_units: frozenset[str] | None = None, run: Run = Run(),
                 sink: Mapping[str, np.ndarray] | None = None, input_power: Mapping[str, np.ndarray] | None = None):
        self.analysis, self.quant, self.cfg, self.recipe = analysis, quant, cfg, recipe
        self.input_power = input_power or {}  # tensor -> mean square per channel (--input-weights noise)
        self.sink = sink  # tensor -> its attention-sink value (--joint-rule sink on a decoder)
        self.perms: dict[str, np.ndarray] = {}  # up·down pair id -> its folded channel order
        self.online_units, self.step = online_units, step
        self.rounder = rounder
        self.run = run
        learned = recipe.learned
        self.sites = {s.id: s for s in analysis.sites if s.role != "embedding"}
        # float32: the weights come as float32, so this is exact; the solvers work on float64 copies
        self.original: dict[str, np.ndarray] = {}
        for sid, s in self.sites.items():
            w = np.asarray(weight_of(s), dtype=np.float32)
            if not np.isfinite(w).all():
                raise QCompilerError(f"weight of site {sid} contains NaN or Inf")
            self.original[sid] = w
        self.folded = {sid: w.astype(np.float64) for sid, w in self.original.items()}  # after pair transforms
        self.progress = progress
        self.rng = np.random.default_rng(run.seed)
        self.learn = LearnConfig(loss=cfg.loss, optimizer=cfg.optimizer, steps=cfg.steps, lr=cfg.lr,
                                 lr_schedule=cfg.lr_schedule, ortho_reg=cfg.ortho_reg, temperature=cfg.temperature,
                                 init=cfg.init,
                                 seed=run.seed, device=resolve_device(run.device) if learned else "cpu",
                                 column_batch=cfg.column_batch, patience=cfg.patience)
        self.joint_kinds = {ATTN_VO if k == "vo" else MLP_UP_DOWN for k in cfg.joint_pairs}
        if not recipe.joint_rounding:  # rotate: a baseline; cafeq+gptaq: calibrated rounding instead
            self.joint_kinds = set()
        self.joint_cfg = joint_configs(cfg)
        self.pool = TaskPool(1)  # plan_cafeq hands in a started pool; this one runs tasks in-process
        self.joint_outcome: dict[str, str] = {}  # pair id -> PairStats.joint
        self.sink_ratio: dict[str, float] = {}  # pair id -> PairStats.sink_ratio
        self.rounds_run: dict[str, int] = {}  # pair id -> PairStats.joint_rounds

    def grid(self, k: int) -> GridSpec:
        return GridSpec(self.quant.bits, self.quant.group_size or k, self.quant.symmetric)

    def _usable(self, p: CoupledPair) -> bool:
        return all(i in self.sites for i in (p.producer, p.consumer, p.gate) if i)

    def _pair_task(self, p: CoupledPair) -> tuple[str, tuple]:
        """(kind, arguments) of :func:`_learn_pair` for ``p`` on its factors as folded so far."""
        cols = slice(*p.producer_cols)
        a, b = self.folded[p.producer][:, cols], self.folded[p.consumer]
        if p.kind == ATTN_VO:
            return p.kind, (a, b, p.kv_map, p.head_dim, self.grid(a.shape[0]), self.grid(b.shape[0]), self.learn,
                            self._row_weights(self.sites[p.producer].input))
        diagonal = "diagonal" in p.exact or "positive_diagonal" in p.exact
        return p.kind, (a, b, self.grid(b.shape[0]), self.learn, diagonal)

    def _sinkhorn_pair(self, p: CoupledPair) -> Any:
        """sinq: the consumer's Sinkhorn scales ``t``, in the form a learned pair takes. V·O: ``M_h = diag(t)``
        per KV head, ``t`` the geometric mean over the query heads that read it (a ``LearnResult``-like
        ``.value``); up·down: ``(identity, t)`` (up's columns times ``t``, down's rows over it), or None where
        no diagonal passes the activation exactly."""
        t = sinkhorn_scales(self.folded[p.consumer], self.quant.group_size)
        if p.kind == MLP_UP_DOWN:
            exact = "positive_diagonal" in p.exact or "diagonal" in p.exact
            return (np.arange(len(t)), t) if exact else None
        d = p.head_dim
        logs = np.zeros((p.num_kv_heads, d))
        for j, h in enumerate(p.kv_map):
            logs[h] += np.log(t[j * d:(j + 1) * d])
        counts = np.bincount(np.asarray(p.kv_map), minlength=p.num_kv_heads)[:, None]
        return _Scales(np.stack([np.diag(v) for v in np.exp(logs / np.maximum(counts, 1))]))

    def pair_transforms(self) -> list[PairTransform]:
        pairs = [p for p in self.analysis.pairs if self._usable(p) and (
            "vo" in self.cfg.transforms if p.kind == ATTN_VO
            else "updown" in self.cfg.transforms and (self.recipe.learned or self.recipe.sinkhorn))]
        learned: dict[str, Any] = {}
        if self.recipe.learned:
            # learned side by side on the factors as they come in: the same as one after another, since
            # a fold touches only its own pair's sites; pairs sharing a factor wait for the folds before them
            shared = _shared_sites(pairs)
            free = [p for p in pairs if not _sites_of(p) & shared]
            results = self._learn_pairs(free)
            learned = {p.id: r for p, r in zip(free, results, strict=True)}
        out = []
        for p in pairs:  # in graph order: a pair folds into its factors before a later pair reads them
            res = learned[p.id] if p.id in learned else None
            if self.recipe.sinkhorn:
                res = self._sinkhorn_pair(p)
            elif res is None and self.recipe.learned:
                res = self.pool.map(_learn_pair, [self._pair_task(p)])[0]
            if p.kind == ATTN_VO:
                if res is None:  # rotate
                    mats = initial_blocks(p.num_kv_heads, p.head_dim, "orthogonal", self.rng)
                else:
                    mats = res.value
                    if np.allclose(mats, np.eye(p.head_dim)):
                        continue
                fold_attn_vo(self.folded[p.producer], None, self.folded[p.consumer], p.producer_cols, p.head_dim,
                             p.kv_map, mats)
                out.append(PairTransform(p, matrices=mats))
            else:
                if res is None:
                    continue
                perm, scale = res
                if np.array_equal(perm, np.arange(len(perm))) and np.allclose(scale, 1.0):
                    continue
                self.perms[p.id] = np.asarray(perm)
                fold_mlp(self.folded[p.producer], None, p.producer_cols, self.folded[p.consumer], scale, perm,
                         self.folded[p.gate] if p.gate else None, None, p.gate_cols)
                out.append(PairTransform(p, scale=scale, perm=perm))
        return out

    def online(self, covered: set[str]) -> tuple[list[OnlineTransform], dict[str, np.ndarray]]:
        """The online transforms of the units named in ``online_units`` (a streamed plan, chosen for the
        whole model), else of the cheapest units within budget; learned ones only where they beat RTN."""
        if "single" not in self.cfg.transforms:
            return [], {}
        units = candidate_units(self.sites, self.analysis.groups, covered, self.recipe.block_size(self.cfg),
                                self.step)
        if self.online_units is not None:
            units = [u for u in units if u.id in self.online_units]
        elif not self.recipe.sinkhorn:  # sinq scales every unit (a gain before it absorbs the scale for free)
            units = cheapest_first(units, self.cfg.online_budget)
        out, blocks_of = [], {}
        learned = [] if not self.recipe.learned else self._learn_units(units)
        for i, u in enumerate(units):
            k = self.sites[u.members[0]].k
            if self.recipe.sinkhorn:  # T = diag(1/t): the members store W / t, the model reads x * t
                w = np.concatenate([self.folded[m] for m in u.members], axis=1)
                blocks = (1.0 / sinkhorn_scales(w, self.quant.group_size)).reshape(k, 1, 1)
            elif not self.recipe.learned:
                init = "hadamard" if self.cfg.init == "hadamard" else "orthogonal"
                blocks = initial_blocks(k // u.block, u.block, init, self.rng)
            else:
                res = learned[i]
                if res.error >= res.identity_error:
                    continue
                blocks = res.value
            out.append(OnlineTransform(u.id, u.input, u.members, blocks))
            for m in u.members:
                blocks_of[m] = blocks
        return out, blocks_of

    def _batched_learn(self) -> bool:
        """Sibling groups of one shape learned as one batch on the torch device (a GPU); on the CPU a batch is
        slower than the same learners one at a time."""
        return self.learn.device != "cpu"

    def _learn_pairs(self, pairs: list[CoupledPair]) -> list[Any]:
        """Each pair's :func:`_learn_pair` result: one task per pair, or, batched, V·O pairs of one shape as one
        task (:func:`learn_vos`; up·down's scale learners stay one per pair: they stop after ~110 steps)."""
        tasks = [self._pair_task(p) for p in pairs]
        what = f"{self.recipe.name} pairs"
        if not self._batched_learn():
            return self.pool.map(_learn_pair, tasks, what, cost=[_pair_cost(kind, args) for kind, args in tasks])
        jobs: list[tuple[list[int], tuple[str, tuple]]] = []
        batches: dict[tuple, list[int]] = {}
        for i, (kind, args) in enumerate(tasks):
            if kind == ATTN_VO:
                a, b, kv_map, head_dim, grid_a, grid_b, _, _ = args
                batches.setdefault((a.shape, b.shape, kv_map, head_dim, grid_a, grid_b), []).append(i)
            else:
                jobs.append(([i], (kind, args)))
        for (_, _, kv_map, head_dim, grid_a, grid_b), idx in batches.items():
            items = [(tasks[i][1][0], tasks[i][1][1], tasks[i][1][7]) for i in idx]
            jobs.append((idx, (VO_BATCH, (items, kv_map, head_dim, grid_a, grid_b, self.learn))))
        results = self.pool.map(_learn_pair, [t for _, t in jobs], what)
        return _scatter([idx for idx, _ in jobs], [r if kind == VO_BATCH else [r]
                                                   for (_, (kind, _)), r in zip(jobs, results, strict=True)])

    def _learn_units(self, units: list) -> list[LearnResult]:
        """Each unit's learned block transform: one task per unit, or per batch of units of one shape."""
        tasks = [([self.folded[m] for m in u.members], self.grid(self.sites[u.members[0]].k), u.block,
                  self._row_weights(u.input)) for u in units]
        if not self._batched_learn():
            return self.pool.map(learn_block_transform, [(ws, grid, block, self.learn, rows)
                                                         for ws, grid, block, rows in tasks],
                                 f"{self.recipe.name} single",
                                 cost=[_unit_cost(ws, self.learn.column_batch) for ws, _, _, _ in tasks])
        batches: dict[tuple, list[int]] = {}
        for i, (ws, grid, block, _) in enumerate(tasks):
            batches.setdefault((ws[0].shape[0], sum(w.shape[1] for w in ws), grid, block), []).append(i)
        parts = list(batches.values())
        results = self.pool.map(
            learn_block_transforms, [([(tasks[i][0], tasks[i][3]) for i in part], tasks[part[0]][1], tasks[part[0]][2],
                                      self.learn) for part in parts], f"{self.recipe.name} single (batched)")
        return _scatter(parts, results)

    def _row_weights(self, tensor: str) -> np.ndarray | None:
        """The weights of ``tensor``'s channels in the learned errors and in joint rounding's product error
        (``--input-weights``); None: alike, as for a tensor with no power (a pair's inner tensor, O's or down's
        input, has none: methods/transforming.py). A floor of 1e-3 of the mean keeps a channel that is silent on
        random tokens from being ignored."""
        power = self.input_power.get(tensor)
        if power is None or not np.isfinite(power).all() or power.mean() <= 0:
            return None
        return np.maximum(power, 1e-3 * power.mean())

    def _effective(self, qw: QuantizedWeight, blocks: np.ndarray | None) -> np.ndarray:
        eff = qw.dequantize().astype(np.float64)
        return apply_blocks(np.linalg.inv(blocks), eff) if blocks is not None else eff

    def _joint_bytes(self, p: CoupledPair) -> int:
        return joint_memory_bytes(p, self.sites[p.producer].k, self.cfg.joint_channel_block, self.quant.group_size)

    def _span(self, p: CoupledPair) -> int:
        return _span(p, self.cfg.joint_channel_block, self.quant.group_size)

    def joint(self, qws: dict[str, QuantizedWeight], blocks_of: dict[str, np.ndarray],
              plain: Mapping[str, np.ndarray]) -> int:
        """Joint rounding of every pair whose factors are not claimed by an earlier pair; updates ``qws``.
        ``plain``: the effective weights of plain rounding (what the sink rule compares against)."""
        claimed: set[str] = set()
        pairs = []
        for p in self.analysis.pairs:
            if (p.kind in self.joint_kinds and self.joint_cfg[p.kind].rounds > 0 and self._usable(p)
                    and not {p.producer, p.consumer} & claimed):
                need = self._joint_bytes(p)
                if need > self.cfg.joint_max_gb * 2**30:
                    why = (f"skipped: needs about {need / 2**30:.1f} GB ({self._span(p)}"
                           f"-channel Hessians), over --joint-max-gb {self.cfg.joint_max_gb:g}")
                    log.warning("%s: joint rounding %s", p.id, why)
                    self.joint_outcome[p.id] = why
                    continue
                claimed |= {p.producer, p.consumer}
                pairs.append(p)
        grid = GridSpec(self.quant.bits, self.quant.group_size, self.quant.symmetric)

        def tasks_of(ps: list[CoupledPair], rounds: int | None = None) -> list[tuple]:
            return [(self.folded[p.producer][:, slice(*p.producer_cols)], self.folded[p.consumer], grid, grid,
                     Heads(p.head_dim, p.kv_map) if p.kind == ATTN_VO else None, blocks_of.get(p.producer),
                     blocks_of.get(p.consumer), self.joint_cfg[p.kind] if rounds is None
                     else dataclasses.replace(self.joint_cfg[p.kind], rounds=rounds),
                     self._row_weights(self.sites[p.producer].input)) for p in ps]

        rounds = {p.id: self.joint_cfg[p.kind].rounds for p in pairs}
        screen = self.cfg.joint_mlp_screen
        early = [p for p in pairs if p.kind == MLP_UP_DOWN and rounds[p.id] > screen > 0]
        if self.sink is not None and early:
            # the sink rule turns nearly every up·down pair down: judge them after the first rounds, and spend the
            # rest only on the pairs that pass; the final test below runs on their full results
            for p, res in zip(early, self._joint_run(early, tasks_of(early, screen), "joint screen"),
                              strict=True):
                self.rounds_run[p.id] = screen
                if not self._keeps_joint(p, res, plain, blocks_of):
                    rounds[p.id] = 0
        todo = [p for p in pairs if rounds[p.id]]
        for p, res in zip(todo, self._joint_run(todo, tasks_of(todo), "joint rounding"), strict=True):
            log.info("%s: joint rounding PQE %.4f -> %.4f", p.id, res.pqe_plain, res.pqe)
            self.rounds_run[p.id] = rounds[p.id]
            if self._keeps_joint(p, res, plain, blocks_of):
                cols = slice(*p.producer_cols)
                qws[p.producer] = replace_columns(qws[p.producer], cols, res.a)
                qws[p.consumer] = res.b
        return len(pairs)

    def _joint_run(self, pairs: list[CoupledPair], tasks: list[tuple], what: str) -> list[JointResult]:
        if self._batched_joint():
            return self._joint_batched(pairs, tasks)
        # side by side while their working sets fit in --joint-max-gb together (a V·O pair beside an 8B MLP pair)
        return self.pool.map(joint_round, tasks, what,
                             cost=[t[7].rounds * self._span(p) ** 2 * t[0].shape[0]
                                   for p, t in zip(pairs, tasks, strict=True)],
                             memory=[self._joint_bytes(p) for p in pairs], budget=self.cfg.joint_max_gb * 2**30)

    def _keeps_joint(self, p: CoupledPair, res: JointResult, plain: Mapping[str, np.ndarray],
                     blocks_of: Mapping[str, np.ndarray]) -> bool:
        """Whether ``p`` keeps ``res``, its joint rounding (``joint_outcome`` and ``sink_ratio`` record why)."""
        self.joint_outcome[p.id] = "joint" if res.pqe < res.pqe_plain else "plain"
        if self.joint_outcome[p.id] == "joint" and self.sink is not None:
            ratio = self._sink_ratio(p, plain, res, blocks_of)
            if ratio is not None:
                self.sink_ratio[p.id] = ratio
                # sink: at least the product's gain there too; sink-loose: no further off there
                bound = 1.0 if self.cfg.joint_rule == "sink-loose" else (res.pqe / res.pqe_plain) ** 2
                log.info("%s: squared error at the attention sink x%.3f with joint rounding (bound %.3f)",
                         p.id, ratio, bound)
                if ratio > bound:  # plain rounding stays
                    self.joint_outcome[p.id] = "sink"
        return self.joint_outcome[p.id] == "joint"

    def _sink_ratio(self, p: CoupledPair, plain: Mapping[str, np.ndarray], res: JointResult,
                    blocks_of: Mapping[str, np.ndarray]) -> float | None:
        """The pair's squared output error at the attention sink, joint / plain rounding (algorithms/sink.py);
        None where the sink state of its input is not known. Up·down's activation factor comes from the float
        model's own run, in the folded channel order."""
        x = self.sink.get(self.sites[p.producer].input)
        if x is None:
            return None
        cols = slice(*p.producer_cols)
        heads, g = (Heads(p.head_dim, p.kv_map), None) if p.kind == ATTN_VO else (None, None)
        if p.kind != ATTN_VO:
            inner = self.sink.get(self.sites[p.consumer].input)
            if inner is None:
                return None
            g = activation_factor(inner, x @ self.original[p.producer][:, cols].astype(np.float64))
            g = g[self.perms[p.id]] if p.id in self.perms else g
        ta, tb = blocks_of.get(p.producer), blocks_of.get(p.consumer)
        return sink_ratio(x, (self.folded[p.producer][:, cols], self.folded[p.consumer]),
                          (plain[p.producer][:, cols], plain[p.consumer]),
                          (self._effective(res.a, ta), self._effective(res.b, tb)), heads, g)

    def _batched_joint(self) -> bool:
        """Joint rounding batched in torch on the device (a GPU); on the CPU numpy's solver is faster."""
        return self.learn.device != "cpu"

    def _joint_batched(self, pairs: list[CoupledPair], tasks: list[tuple]) -> list[JointResult]:
        """Joint rounding on the torch device, pairs of one shape as one batch, as many as fit in --joint-max-gb
        together (algorithms/solver.py: on a GPU the sequential loop's launches, not its arithmetic, bound a pair);
        a pair rounded in blocks of channels goes through the numpy solver, one at a time."""
        need = max((self._joint_bytes(p) for p in pairs), default=1)
        limit = max(1, int(self.cfg.joint_max_gb * 2**30 // need))
        results: list[JointResult | None] = [None] * len(pairs)
        batches: dict[tuple, list[int]] = {}
        for i, (p, t) in enumerate(zip(pairs, tasks, strict=True)):
            a, b, grid, _, heads, ta, tb, jcfg, _ = t
            if p.kind == MLP_UP_DOWN and self._span(p) < _channels(p):
                results[i] = joint_round(*t)
                continue
            key = (a.shape, b.shape, heads, jcfg, None if ta is None else ta.shape, None if tb is None else tb.shape)
            batches.setdefault(key, []).append(i)
        for (_, _, heads, jcfg, _, _), idx in batches.items():
            for lo in range(0, len(idx), limit):
                part = idx[lo:lo + limit]
                items = [JointItem(tasks[i][0], tasks[i][1], tasks[i][5], tasks[i][6], tasks[i][8]) for i in part]
                grid = tasks[part[0]][2]
                for i, res in zip(part, joint_round_batch(items, grid, grid, heads, jcfg, self.learn.device),
                                  strict=True):
                    results[i] = res
        return results  # type: ignore[return-value]

    def plan(self) -> QuantPlan:
        pair_transforms = self.pair_transforms()
        # a V·O transform is a learned block-diagonal transform of O's input side already; up·down's
        # diagonal and permutation are not (but sinq's diagonal is all it would give down)
        covered = {t.pair.consumer for t in pair_transforms if self.recipe.covers(t.pair)}
        online, blocks_of = self.online(covered)
        qws = {}
        for sid, w in self.folded.items():
            stored = apply_blocks(blocks_of[sid], w) if sid in blocks_of else w
            qws[sid] = quantize(stored.astype(np.float32), self.quant.bits, self.quant.group_size,
                                self.quant.symmetric)
        # the dequantized weights below are kept for the statistics only: float32 halves a chunk's peak
        plain = {sid: self._effective(qw, blocks_of.get(sid)).astype(np.float32) for sid, qw in qws.items()}
        calibrated = {}
        if self.rounder is not None:
            stored = {sid: apply_blocks(blocks_of[sid], w) if sid in blocks_of else w for sid, w in self.folded.items()}
            calibrated = self.rounder(pair_transforms, online, stored)
            qws.update({sid: r.weight for sid, r in calibrated.items()})
        else:
            self.joint(qws, blocks_of, plain)
        site_plans, effective, rtn = [], {}, {}
        for sid, site in self.sites.items():
            w, qw = self.folded[sid], qws[sid]
            eff = self._effective(qw, blocks_of.get(sid))
            err2 = float(np.sum((eff - w) ** 2))
            effective[sid] = eff.astype(np.float32)
            del eff
            r = _rtn(self.original[sid], self.quant)  # plain RTN of the untransformed weight, once
            rtn2 = float(np.sum((r - self.original[sid]) ** 2))
            rtn[sid] = r.astype(np.float32)
            del r
            norm_w, norm_o = max(float(np.linalg.norm(w)), 1e-30), max(float(np.linalg.norm(self.original[sid])), 1e-30)
            plain_rel = float(np.sum((plain[sid] - w) ** 2)) ** 0.5 / norm_w  # the same formula as rel_error
            cal = calibrated.get(sid)
            stats = SiteStats(err2 ** 0.5 / norm_w, err2, rtn2 ** 0.5 / norm_o, rtn2, plain_rel)
            if cal is not None:  # proxies: relative output errors^2 on the calibration inputs (transformed basis)
                stats = dataclasses.replace(stats, proxy_error=cal.proxy, rtn_proxy_error=cal.rtn_proxy,
                                            holdout_error=cal.holdout_error)
            site_plans.append(SitePlan(site, qw, stats))
        return QuantPlan(self.recipe.name, self.quant, tuple(site_plans), tuple(pair_transforms), tuple(online),
                         tuple(self.pair_stats(effective, plain, rtn)))

    def pair_stats(self, effective: dict[str, np.ndarray], plain: dict[str, np.ndarray],
                   rtn: dict[str, np.ndarray]) -> list[PairStats]:
        out = []
        for p in self.analysis.pairs:
            if not self._usable(p):
                continue
            cols = slice(*p.producer_cols)
            a0, b0 = self.original[p.producer][:, cols], self.original[p.consumer]
            a1, b1 = self.folded[p.producer][:, cols], self.folded[p.consumer]
            ra, rb = rtn[p.producer][:, cols], rtn[p.consumer]
            ea, eb = effective[p.producer][:, cols], effective[p.consumer]
            pa, pb = plain[p.producer][:, cols], plain[p.consumer]
            heads = (p.head_dim, p.kv_map) if p.kind == ATTN_VO else (None, None)
            proxy_rtn = float(np.sum((ra - a0) ** 2) / np.sum(a0 ** 2) + np.sum((rb - b0) ** 2) / np.sum(b0 ** 2))
            proxy = float(np.sum((ea - a1) ** 2) / np.sum(a1 ** 2) + np.sum((eb - b1) ** 2) / np.sum(b1 ** 2))
            # the folded factors have the same product as the original ones (the transforms are exact)
            out.append(PairStats(p.id, p.kind, product_error(a0, b0, ra, rb, *heads),
                                 product_error(a1, b1, ea, eb, *heads), proxy_rtn, proxy,
                                 product_error(a1, b1, pa, pb, *heads), self.joint_outcome.get(p.id),
                                 self.sink_ratio.get(p.id), self.rounds_run.get(p.id)))
        return out


@dataclass(frozen=True)
class _Scales:
    """sinq's V·O matrices, shaped like a learner's result (``.value``)."""

    value: np.ndarray


def _scatter(groups: list[list[int]], results: list[list[Any]]) -> list[Any]:
    """Batched results back in task order: ``results[j][m]`` belongs to task ``groups[j][m]``."""
    out: list[Any] = [None] * sum(len(g) for g in groups)
    for group, res in zip(groups, results, strict=True):
        for i, r in zip(group, res, strict=True):
            out[i] = r
    return out


def _learn_pair(kind: str, args: tuple) -> Any:
    """One pair's transform (a task): V·O's ``LearnResult``; up·down's ``(perm, scale)``, the channel
    order kept only where it lowers down's weighted error, then the scale where the activation allows."""
    if kind == ATTN_VO:
        return learn_vo(*args)
    if kind == VO_BATCH:
        return learn_vos(*args)
    a, b, grid, learn, diagonal = args
    perm = channel_order(b)
    if weighted_row_error(a[:, perm], b[perm], grid) >= weighted_row_error(a, b, grid):
        perm = np.arange(b.shape[0])
    scale = learn_updown_scale(a[:, perm], b[perm], grid, learn).value if diagonal else np.ones(b.shape[0])
    return perm, scale


def _unit_cost(weights: Sequence[np.ndarray], column_batch: int) -> float:
    """A block learner's rough cost (for the order of tasks): a step's products over the drawn columns, and a
    subsampled learner's true error over all of them every 10 steps."""
    k, n = weights[0].shape[0], sum(w.shape[1] for w in weights)
    return k * (min(n, column_batch) + (n / 10 if n > column_batch else 0))


def _pair_cost(kind: str, args: tuple) -> float:
    """A pair learner's rough cost (for the order of tasks): the elements it quantizes each step, both factors
    for V·O, down alone for up·down's scale learner."""
    a, b = args[0], args[1]
    return float(a.size + b.size if kind == ATTN_VO else b.size)


def _sites_of(p: CoupledPair) -> set[str]:
    """What learning ``p`` reads (its factors) and folding it writes (its factors and gate)."""
    return {p.producer, p.consumer} | ({p.gate} if p.gate else set())


def _shared_sites(pairs: Sequence[CoupledPair]) -> set[str]:
    """Sites of more than one of ``pairs``."""
    seen: set[str] = set()
    shared: set[str] = set()
    for p in pairs:
        for sid in _sites_of(p):
            (shared if sid in seen else seen).add(sid)
    return shared


def _channels(p: CoupledPair) -> int:
    """Width of the solver's Hessians: the pair's inner channels (V·O: O's rows, all query heads)."""
    if p.kind == ATTN_VO:
        return p.head_dim * max(p.num_heads, p.num_kv_heads)
    return p.producer_cols[1] - p.producer_cols[0]


def _span(p: CoupledPair, channel_block: int, group: int = 1) -> int:
    """Width of the solver's Hessians: a V·O pair's inner channels (O's rows, all query heads); an up·down
    pair's channels, or its widest block of channels when it is wider than ``channel_block`` (blocks hold
    whole quant groups of ``group`` rows: 0, one group for the whole axis, allows no blocks)."""
    if p.kind == ATTN_VO:
        return p.head_dim * max(p.num_heads, p.num_kv_heads)
    c = _channels(p)
    return max(hi - lo for lo, hi in channel_spans(c, channel_block, group or c, 1))


def joint_memory_bytes(p: CoupledPair, k: int, channel_block: int = CafeqConfig.joint_channel_block,
                       group: int = 32) -> int:
    """Peak working memory of joint rounding for a pair (``C`` inner channels, producer input ``K``, Hessians
    ``S`` wide: ``C``, or a block of channels for a wide up·down pair): about 7 ``S x S`` and 11 ``C x K``
    float64 matrices, fitted to the peak RSS of a lone process (less its 0.35 GB at start), 1 round,
    K = N = 2048: 2.9 GB at C = S = 5632 (one block), 1.7 GB at C = 5632 in two blocks of 2816."""
    s = _span(p, channel_block, group)
    return 8 * (7 * s * s + 11 * _channels(p) * k)


def select_online_units(analysis: Analysis, cfg: CafeqConfig, step: StepCost, recipe: Recipe) -> frozenset[str]:
    """The units a whole-model plan would give online transforms, chosen from shapes alone (V·O pairs
    assumed to transform their O; sinq's up·down pairs their down), for planning the model a chunk at a time."""
    sites = {s.id: s for s in analysis.sites if s.role != "embedding"}
    kinds = {ATTN_VO: "vo", MLP_UP_DOWN: "updown"}
    covered = {p.consumer for p in analysis.pairs if recipe.covers(p) and kinds[p.kind] in cfg.transforms}
    units = candidate_units(sites, analysis.groups, covered, recipe.block_size(cfg), step)
    return frozenset(u.id for u in (units if recipe.sinkhorn else cheapest_first(units, cfg.online_budget)))


def plan_transforms(analysis: Analysis, weight_of: Callable[[LinearSite], np.ndarray], quant: QuantConfig,
                    cfg: CafeqConfig, recipe: Recipe, progress: bool = False, rounder: Rounder | None = None,
                    online_units: frozenset[str] | None = None, step: StepCost | None = None,
                    run: Run = Run(), sink: Mapping[str, np.ndarray] | None = None,
                    input_power: Mapping[str, np.ndarray] | None = None) -> QuantPlan:
    """The plan of ``recipe`` (cafeq: learned, joint rounding; rotate: random orthogonal/Hadamard, no
    learning; cafeq+gptaq: learned, then ``rounder``: calibrated rounding of the transformed weights).
    ``online_units``: the units allowed an online transform (default: the budget decides).
    ``step``: the model's run-time cost the budget is a fraction of (default: ``cfg.online_regime``'s,
    from the sites alone; the pipeline adds the bytes of the weights kept in float).
    ``sink``: the attention sink's value of the tensors the pairs' factors read (runtime/sink.py): a pair keeps
    its joint rounding only where its output error there falls as ``cfg.joint_rule`` asks.
    ``input_power``: the mean square per channel of the site inputs that read the residual stream (``--input-weights
    noise``): the row weights of those factors' learned errors and of joint rounding's product error."""
    if step is None:
        step = step_cost(cfg.online_regime, analysis.sites, quant)
    planner = _Planner(analysis, weight_of, quant, cfg, recipe, step, progress, rounder, online_units, run, sink,
                       input_power)
    if not recipe.learned:  # nothing to learn
        return planner.plan()
    planner.pool = open_pool()
    if planner.pool is not None:  # a streaming compile's, for all its chunks
        return planner.plan()
    elements = sum(w.size for w in planner.original.values())
    jobs = resolve_jobs(run.jobs, elements, planner.learn.device)
    with make_pool(jobs, progress, run.executor, run.ray_address, planner.learn.device) as pool:
        planner.pool = pool
        plan = planner.plan()
    note_workers_peak(pool.workers_peak_mb)
    return plan
