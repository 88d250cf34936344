"""The calibration driver: a full-precision and a quantized activation stream, advanced together one
segment at a time (ALGORITHMS.md, "Driver").

At each group's cut the quantized stream holds ``X`` (every earlier group already quantized) and the
full-precision stream ``X~``; the group is quantized from ``H`` and ``D``, then both streams run
through the next segment (the quantized one with the quantized weights). Each segment runs once per
stream and batch, so the whole model is never re-run per site, and memory is the states at one cut
(plus one segment's activations inside ONNX Runtime).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from qcompiler.algorithms.gptq import ActivationStats
from qcompiler.errors import QCompilerError
from qcompiler.runtime.segments import Group, SegmentedModel, State
from qcompiler.runtime.session import SessionOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueHeads:
    """An attention V site: its output columns ``cols`` hold KV heads of ``head_dim`` channels, query head
    ``j`` reads KV head ``kv_map[j]`` through the attention weights ``probs`` ([batch, heads, query, key])."""

    probs: str
    cols: tuple[int, int]
    head_dim: int
    kv_map: tuple[int, ...]


@dataclass(frozen=True)
class HeadStats:
    """``H``, ``D`` of one KV head's columns ``[lo, hi)`` of a V site, over ``Y = A X`` (attention-mixed inputs)."""

    lo: int
    hi: int
    h: np.ndarray
    d: np.ndarray | None


@dataclass(frozen=True)
class GroupData:
    """What one group's solver gets, over the calibration tokens."""

    group: Group
    h: np.ndarray  # X^T X / T
    d: np.ndarray | None  # (X~ - X)^T X / T, when the target stream is kept
    tokens: int
    # V sites: per KV head, the statistics of the inputs as attention mixes them (ALGORITHMS.md's objective
    # on the attention output ``A X W_v`` instead of ``X W_v``); columns outside every head use ``h``
    heads: Mapping[str, tuple[HeadStats, ...]] = field(default_factory=dict)


# returns the dequantized weight W_hat ([K, N], MatMul layout) of every site of the group
QuantizeFn = Callable[[GroupData], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class CalibrationResult:
    # per site, on held-out sequences: ||X W_hat - X~ W||_F / ||X~ W||_F
    holdout_error: dict[str, float]
    tokens: int
    groups: int


def _mix(a: np.ndarray, x):
    """``A X`` for one head: weights ``[batch, query, key]``, inputs ``[batch, key, K]`` (torch)."""
    import torch

    return (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) @ x).numpy()


def _value_stats(seg: SegmentedModel, gi: int, values: Mapping[str, ValueHeads], q: Sequence[State],
                 fp: Sequence[State], w_q: Mapping[str, np.ndarray], w_fp: Mapping[str, np.ndarray], n_cal: int,
                 target: bool, options: SessionOptions | None, device: str) -> dict[str, tuple[HeadStats, ...]]:
    """Per KV head of the group's V sites, ``H`` (and ``D``) of ``Y_j = A_j X`` summed over the query heads
    ``j`` reading it: the error of V's output as the attention output sees it. The weights ``A`` come from
    running the stretch to the next cut with the group still in float (one probe run per batch and stream)."""
    import torch

    group = seg.groups[gi]
    sites = [s for s in group.sites if s in values]
    if not sites:
        return {}
    stop = seg.groups[gi + 1].position if gi + 1 < len(seg.groups) else None
    names = sorted({values[s].probs for s in sites})
    try:
        probe = seg.segment(group.position, stop, only=names).runner(options)
    except QCompilerError as e:
        log.info("%s: attention weights not reachable (%s); plain statistics for V", group.sites[0], e)
        return {}
    k = seg.shapes[group.sites[0]][0]
    acc = {s: [ActivationStats(k, target, device) for _ in range(max(values[s].kv_map) + 1)] for s in sites}
    for m in range(n_cal):
        a_q = probe(q[m], w_q)
        a_fp = probe(fp[m], w_fp) if target else None
        x = torch.from_numpy(np.ascontiguousarray(q[m][group.input], np.float32))
        xt = torch.from_numpy(np.ascontiguousarray(fp[m][group.input], np.float32)) if target else None
        for s in list(acc):
            v = values[s]
            a = a_q[v.probs]
            if a.ndim != 4 or a.shape[1] != len(v.kv_map) or x.numel() != a.shape[0] * a.shape[3] * k:
                log.info("%s: attention weights of shape %s do not match; plain statistics", s, a.shape)
                del acc[s]
                continue
            xs = x.reshape(a.shape[0], a.shape[3], k)  # [batch, key, K]
            xts = xt.reshape(xs.shape) if target else None
            for j, h in enumerate(v.kv_map):
                acc[s][h].add(_mix(a[:, j], xs), _mix(a_fp[v.probs][:, j], xts) if target else None)
    out = {}
    for s, stats in acc.items():
        lo, d = values[s].cols[0], values[s].head_dim
        parts = []
        for h, st in enumerate(stats):
            hh, dd = st.result()
            parts.append(HeadStats(lo + h * d, lo + (h + 1) * d, hh, dd))
        out[s] = tuple(parts)
    return out


def calibrate(seg: SegmentedModel, weights: Mapping[str, np.ndarray], batches: Sequence[State],
              quantize: QuantizeFn, *, target: bool, holdout: Sequence[State] = (),
              options: SessionOptions | None = None, device: str = "cpu", progress: bool = False,
              values: Mapping[str, ValueHeads] | None = None) -> CalibrationResult:
    """Quantize ``seg``'s groups in graph order. ``weights``: float ``[K, N]`` per site id; ``batches``:
    feeds of the model's graph inputs. ``target``: keep the full-precision stream and give ``D``.
    ``values``: attention V sites, whose statistics are taken on the attention-mixed inputs per KV head."""
    groups = seg.groups
    if not groups:
        return CalibrationResult({}, 0, 0)
    dtypes = seg.dtypes
    w_fp = {seg.weight_inputs[s]: np.ascontiguousarray(w, dtype=dtypes[s]) for s, w in weights.items()}
    w_q = dict(w_fp)
    n_cal = len(batches)
    keep_fp = target or bool(holdout)
    prelude = seg.segment(0, groups[0].position).runner(options)
    q = [prelude(b, w_fp) for b in list(batches) + list(holdout)]
    fp = list(q) if keep_fp else []
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    tokens = 0
    bar = tqdm(total=len(groups), desc="calibrate", unit="group", disable=not progress, leave=False)
    for gi, group in enumerate(groups):
        k = seg.shapes[group.sites[0]][0]
        stats = ActivationStats(k, target, device)
        for m in range(n_cal):
            stats.add(q[m][group.input], fp[m][group.input] if target else None)
        h, d = stats.result()
        tokens = stats.tokens
        heads = _value_stats(seg, gi, values or {}, q, fp, w_q, w_fp, n_cal, target, options, device)
        w_hat = quantize(GroupData(group, h, d, stats.tokens, heads))
        for sid in group.sites:
            w_q[seg.weight_inputs[sid]] = np.ascontiguousarray(w_hat[sid], dtype=dtypes[sid])
        for m in range(n_cal, len(q)):  # held-out sequences
            x = q[m][group.input].reshape(-1, k).astype(np.float64)
            xt = fp[m][group.input].reshape(-1, k).astype(np.float64)
            for sid in group.sites:
                ref = xt @ np.asarray(weights[sid], dtype=np.float64)
                num[sid] = num.get(sid, 0.0) + float(np.sum((x @ np.asarray(w_hat[sid], np.float64) - ref) ** 2))
                den[sid] = den.get(sid, 0.0) + float(np.sum(ref ** 2))
        if gi + 1 < len(groups):
            run = seg.segment(group.position, groups[gi + 1].position).runner(options)
            q = [run(s, w_q) for s in q]
            if keep_fp:
                fp = [run(s, w_fp) for s in fp]
        bar.update(1)
    bar.close()
    errors = {s: (num[s] / den[s]) ** 0.5 if den[s] > 0 else 0.0 for s in num}
    return CalibrationResult(errors, tokens, len(groups))
