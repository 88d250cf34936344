"""Calibrated rounding: GPTQ and GPTAQ over the calibration driver's two activation streams.

``gptq`` minimises ``||X W_hat - X W||`` with ``X`` the layer's input in the partially quantized model;
``gptaq`` minimises ``||X W_hat - X~ W||`` against the full-precision model's input ``X~`` as well
(``alpha`` weighs that term). ``cafeq+gptaq`` learns CafeQ's transforms without data and rounds the
transformed weights with GPTAQ (:func:`calibrated_rounder`, used by the CafeQ planner).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx

from qcompiler.algorithms.gptq import SolverConfig, solve_rows_parts
from qcompiler.algorithms.grid import GridSpec, QuantizedWeight, quantize, relative_error
from qcompiler.config import CalibConfig, CompileConfig, QuantConfig
from qcompiler.device import resolve_device
from qcompiler.errors import QCompilerError
from qcompiler.methods.base import Method, PlanContext, Setup
from qcompiler.plan import QuantPlan, SitePlan, SiteStats
from qcompiler.resources import note_workers_peak
from qcompiler.runtime.calib_data import calibration_feeds, calibration_tokens
from qcompiler.runtime.calibrate import GroupData, ValueHeads, calibrate
from qcompiler.runtime.segments import SegmentedModel
from qcompiler.runtime.session import SessionOptions, compile_session_device
from qcompiler.sites import ATTN_VO, CoupledPair, LinearSite
from qcompiler.workers import TaskPool, make_pool, open_pool, resolve_jobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """Everything a calibrated rounding needs besides the model: tokens and how to run."""

    tokens: np.ndarray  # [samples + holdout, seqlen] int64 token ids
    config: CalibConfig
    asymmetric: bool  # GPTAQ (target stream, D) rather than GPTQ
    options: SessionOptions  # ONNX Runtime, for the segments
    device: str = "cpu"  # torch, for the statistics
    # where the solves run (workers.make_pool): worker processes (0: one per core for a model of 1M+ weights) or Ray
    jobs: int = 1
    executor: str = "local"
    ray_address: str = ""


@dataclass(frozen=True)
class Rounded:
    weight: QuantizedWeight
    proxy: float  # tr(dW^T H dW) / tr(W^T H W): relative output error^2 on the calibration inputs
    rtn_proxy: float  # the same for round-to-nearest
    rtn_rel: float  # ||W_rtn - W|| / ||W||
    holdout_error: float | None


Slice = tuple[int, int, np.ndarray, np.ndarray | None]  # columns [lo, hi) and their H, D


def _slices(n: int, data: GroupData, sid: str) -> list[Slice]:
    """The columns of site ``sid`` with the statistics each is solved with: a V site's KV heads with their
    attention-mixed ``H``, ``D``; every other column with the group's."""
    heads = sorted(data.heads.get(sid, ()), key=lambda hs: hs.lo)
    out, at = [], 0
    for hs in heads:
        if hs.lo > at:
            out.append((at, hs.lo, data.h, data.d))
        out.append((hs.lo, hs.hi, hs.h, hs.d))
        at = hs.hi
    if at < n:
        out.append((at, n, data.h, data.d))
    return out


# a calibrated solve's task holds at most this many of a site's columns: columns are independent problems (the
# groups run along K), so a site spreads over the workers; fixed, so the plan does not depend on --jobs
SOLVE_COLUMNS = 256


def _column_parts(lo: int, hi: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into near-equal parts of at most ``SOLVE_COLUMNS`` columns."""
    parts = -(-(hi - lo) // SOLVE_COLUMNS)
    cuts = [lo + (hi - lo) * i // parts for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _solve_tasks(w: np.ndarray, slices: list[Slice], grid: GridSpec, solver: SolverConfig, chunks: int) -> list[tuple]:
    """:func:`solve_rows_parts`' arguments, in column order: each column slice's parts in at most ``chunks``
    consecutive runs, one task each (the parts, not the runs, fix the codes; a run factors ``H`` once)."""
    tasks = []
    for lo, hi, h, d in slices:
        parts = _column_parts(lo, hi)
        n = min(len(parts), max(1, chunks))
        for run in (parts[len(parts) * i // n:len(parts) * (i + 1) // n] for i in range(n)):
            a, b = run[0][0], run[-1][1]
            tasks.append((np.ascontiguousarray(w[:, a:b]), h, grid, d, solver, [(x - a, y - a) for x, y in run]))
    return tasks


def _join(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """The column parts of one weight, side by side."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return QuantizedWeight(np.concatenate([p.codes for p in parts], axis=1),
                           np.concatenate([p.scales for p in parts], axis=1),
                           np.concatenate([p.zero_points for p in parts], axis=1),
                           first.bits, first.block_size, first.symmetric)


def _rel_proxies(slices: list[Slice], w: np.ndarray, *w_hats: np.ndarray) -> list[float]:
    """``sum tr(dW^T H dW) / sum tr(W^T H W)`` over the column slices, for each of ``w_hats`` (``dW = W_hat - W``):
    one product with ``H`` per slice for all of them."""
    num, ref = np.zeros(len(w_hats)), 0.0
    for lo, hi, h, _ in slices:
        ws = w[:, lo:hi]
        m = np.concatenate([ws] + [x[:, lo:hi] - ws for x in w_hats], axis=1)
        t = np.sum((h @ m) * m, axis=0).reshape(1 + len(w_hats), -1).sum(axis=1)
        ref += float(t[0])
        num += t[1:]
    return [float(x) / ref if ref > 0 else 0.0 for x in num]


def value_heads(pairs: Sequence[CoupledPair], sites: Sequence[LinearSite]) -> dict[str, ValueHeads]:
    """The V sites of ``pairs`` whose attention weights the matcher found, for :func:`calibrate`."""
    ids = {s.id for s in sites}
    return {p.producer: ValueHeads(p.probs, p.producer_cols, p.head_dim, p.kv_map) for p in pairs
            if p.kind == ATTN_VO and p.probs and p.producer in ids and p.kv_map}


def round_calibrated(model: onnx.ModelProto, sites: Sequence[LinearSite], weights: Mapping[str, np.ndarray],
                     quant: QuantConfig, calib: Calibration, progress: bool = False,
                     pairs: Sequence[CoupledPair] = ()) -> dict[str, Rounded]:
    """GPTQ/GPTAQ-round every site of ``model`` whose float weight (``[K, N]``) is in ``weights``. With
    ``pairs`` (and ``CalibConfig.attention_values`` on), each V·O pair's V is rounded per KV head against the error the
    attention output sees, ``||A X (W_hat - W)||``, rather than ``||X (W_hat - W)||``."""
    cfg = calib.config
    for s in sites:
        if not np.isfinite(weights[s.id]).all():
            raise QCompilerError(f"weight of site {s.id} contains NaN or Inf")
    seg = SegmentedModel(model, sites)
    ids = calib.tokens
    if len(ids) < cfg.samples + cfg.holdout:
        raise QCompilerError(f"{len(ids)} calibration sequences given, {cfg.samples + cfg.holdout} needed")
    batches = [calibration_feeds(model, ids[i:i + cfg.batch]) for i in range(0, cfg.samples, cfg.batch)]
    end = cfg.samples + cfg.holdout
    holdout = [calibration_feeds(model, ids[i:min(i + cfg.batch, end)]) for i in range(cfg.samples, end, cfg.batch)]
    grid = GridSpec(quant.bits, quant.group_size, quant.symmetric)
    solver = SolverConfig(block=cfg.block, percdamp=cfg.percdamp, act_order=cfg.act_order,
                          alpha=cfg.alpha if calib.asymmetric else 0.0)
    by_id = {s.id: s for s in sites}
    partial: dict[str, tuple[QuantizedWeight, float, float, float]] = {}

    def quantize_group(data: GroupData) -> dict[str, np.ndarray]:
        tasks, spans, at = [], {}, 0
        for sid in data.group.sites:
            w = np.asarray(weights[sid], dtype=np.float64)
            slices = _slices(w.shape[1], data, sid)
            tasks += _solve_tasks(w, slices, grid, solver, pool.jobs)
            spans[sid], at = (w, slices, at, len(tasks)), len(tasks)
        # every site of the group at once, a run of a site's column parts per task
        solved = pool.map(solve_rows_parts, tasks)
        out = {}
        for sid, (w, slices, lo, hi) in spans.items():
            qw = _join([q for run in solved[lo:hi] for q in run])
            w_hat = qw.dequantize().astype(np.float64)
            rtn = quantize(w.astype(np.float32), quant.bits, quant.group_size, quant.symmetric)
            rtn_hat = rtn.dequantize().astype(np.float64)
            proxy, rtn_proxy = _rel_proxies(slices, w, w_hat, rtn_hat)
            partial[sid] = (qw, proxy, rtn_proxy, relative_error(w, rtn_hat))
            out[sid] = w_hat
        return out

    values = value_heads(pairs, sites) if cfg.attention_values else {}
    outer = open_pool()  # cafeq+gptaq: the planner's workers
    elements = sum(weights[s].size for s in by_id)
    with nullcontext(outer) if outer is not None else _solver_pool(calib, elements) as pool:
        result = calibrate(seg, {s: weights[s] for s in by_id}, batches, quantize_group, target=calib.asymmetric,
                           holdout=holdout, options=calib.options, device=calib.device, progress=progress,
                           values=values)
    log.info("calibrated %d groups on %d tokens", result.groups, result.tokens)
    return {sid: Rounded(qw, p, r, rel, result.holdout_error.get(sid)) for sid, (qw, p, r, rel) in partial.items()}


@contextmanager
def _solver_pool(calib: Calibration, elements: int) -> Iterator[TaskPool]:
    """Workers for the solves (numpy, on the CPU whatever ``--device``: no GPU asked of Ray)."""
    with make_pool(resolve_jobs(calib.jobs, elements, "cpu"), False, calib.executor, calib.ray_address) as pool:
        yield pool
    note_workers_peak(pool.workers_peak_mb)


def plan_calibrated(model: onnx.ModelProto, sites: Sequence[LinearSite], weight_of: Callable[[LinearSite], np.ndarray],
                    quant: QuantConfig, method: str, calib: Calibration, progress: bool = False,
                    pairs: Sequence[CoupledPair] = ()) -> QuantPlan:
    """``gptq`` / ``gptaq``: linear sites by calibrated rounding, embedding tables by RTN."""
    weights = {s.id: weight_of(s) for s in sites}
    linear = [s for s in sites if s.role != "embedding"]
    rounded = round_calibrated(model, linear, weights, quant, calib, progress, pairs)
    plans = []
    for s in sites:
        w = weights[s.id]
        r = rounded.get(s.id)
        if r is None:  # an embedding table: no activations to calibrate on
            rtn = quantize(w, quant.bits, quant.group_size, quant.symmetric)
            plans.append(SitePlan(s, rtn, SiteStats(relative_error(w, rtn.dequantize()),
                                                    float(np.sum((rtn.dequantize() - w) ** 2)))))
            continue
        plans.append(SitePlan(s, r.weight, SiteStats(relative_error(w, r.weight.dequantize()), r.proxy, r.rtn_rel,
                                                     r.rtn_proxy, holdout_error=r.holdout_error)))
    return QuantPlan(method, quant, tuple(plans))


def calibrated_rounder(model_of: Callable[[Sequence, Sequence], onnx.ModelProto], sites: Sequence[LinearSite],
                       quant: QuantConfig, calib: Calibration, progress: bool = False,
                       pairs: Sequence[CoupledPair] = ()):
    """For cafeq+gptaq: a rounder for the CafeQ planner. ``model_of(pair_transforms, online)`` is the float
    model with the transforms applied; the planner gives the stored (transformed) weights."""
    by_id = {s.id: s for s in sites}

    def rounder(pair_transforms, online, stored: Mapping[str, np.ndarray]) -> dict[str, Rounded]:
        model = model_of(pair_transforms, online)
        return round_calibrated(model, [by_id[s] for s in stored], stored, quant, calib, progress, pairs)

    return rounder


def load_calibration(config: CompileConfig, tokenizer_dir: str | None, asymmetric: bool) -> Calibration:
    """The calibration tokens (the model's tokenizer unless ``CalibConfig.tokenizer``) and how to run the
    segments."""
    cfg = config.calib
    tokens = calibration_tokens(cfg.source, cfg.tokenizer or tokenizer_dir, cfg.samples + cfg.holdout, cfg.seqlen,
                                config.seed)
    options = SessionOptions(device=compile_session_device(config.device))
    return Calibration(tokens, cfg, asymmetric=asymmetric, options=options,
                       device=resolve_device(config.device), jobs=config.jobs, executor=config.executor,
                       ray_address=config.ray_address)


class CalibratedMethod(Method):
    """A method that runs the model on calibration data: the whole model, never a chunk at a time."""

    needs_calibration: ClassVar[bool] = True
    streamable: ClassVar[bool] = False
    asymmetric: ClassVar[bool]  # GPTAQ's target stream (the full-precision model's inputs) as well

    def needs_analysis(self, config: CompileConfig) -> bool:
        # V·O pairs: V rounded per KV head as attention mixes its inputs
        return config.calib.attention_values or self.transforms

    def prepare(self, setup: Setup) -> PlanContext:
        ctx = super().prepare(setup)
        calibration = load_calibration(setup.config, setup.loaded.tokenizer_dir, self.asymmetric)
        return dataclasses.replace(ctx, calibration=calibration)


class _GptqFamily(CalibratedMethod):
    def plan(self, ctx: PlanContext) -> QuantPlan:
        pairs = ctx.analysis.pairs if ctx.analysis is not None else ()
        return plan_calibrated(ctx.model, ctx.sites, ctx.weight_of, ctx.config.quant, self.name, ctx.calibration,
                               ctx.progress, pairs)


class Gptq(_GptqFamily):
    name = "gptq"
    summary = "Hessian-aware rounding on calibration data"
    asymmetric = False


class Gptaq(_GptqFamily):
    name = "gptaq"
    summary = "GPTQ that also corrects the error earlier quantized layers push into each layer's input"
    asymmetric = True
