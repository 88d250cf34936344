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
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from qcompiler.algorithms.gptq import ActivationStats
from qcompiler.runtime.segments import Group, SegmentedModel, State
from qcompiler.runtime.session import SessionOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupData:
    """What one group's solver gets, over the calibration tokens."""

    group: Group
    h: np.ndarray  # X^T X / T
    d: np.ndarray | None  # (X~ - X)^T X / T, when the target stream is kept
    tokens: int


# returns the dequantized weight W_hat ([K, N], MatMul layout) of every site of the group
QuantizeFn = Callable[[GroupData], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class CalibrationResult:
    # per site, on held-out sequences: ||X W_hat - X~ W||_F / ||X~ W||_F
    holdout_error: dict[str, float]
    tokens: int
    groups: int


def calibrate(seg: SegmentedModel, weights: Mapping[str, np.ndarray], batches: Sequence[State],
              quantize: QuantizeFn, *, target: bool, holdout: Sequence[State] = (),
              options: SessionOptions | None = None, device: str = "cpu", progress: bool = False) -> CalibrationResult:
    """Quantize ``seg``'s groups in graph order. ``weights``: float ``[K, N]`` per site id; ``batches``:
    feeds of the model's graph inputs. ``target``: keep the full-precision stream and give ``D``."""
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
        w_hat = quantize(GroupData(group, h, d, stats.tokens))
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
