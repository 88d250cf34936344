"""Methods turn sites and their weights into a QuantPlan. They never touch the graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from qcompiler.config import CALIBRATED_METHODS, CompileConfig
from qcompiler.errors import ConfigError, InvalidWeightsError
from qcompiler.match.analysis import Analysis
from qcompiler.match.sites import LinearSite
from qcompiler.methods.rtn import plan_rtn
from qcompiler.plan import QuantPlan

if TYPE_CHECKING:
    from qcompiler.methods.gptq import Calibration
    from qcompiler.methods.online_cost import StepCost

WeightFn = Callable[[LinearSite], np.ndarray]


TRANSFORM_METHODS = ("cafeq", "rotate", "cafeq+gptaq")
# (pair transforms, online transforms) -> the float model with those transforms applied
TransformedModelFn = Callable[[Sequence, Sequence], onnx.ModelProto]


def finite_weights(weight_of: WeightFn) -> WeightFn:
    """``weight_of`` that refuses NaN/Inf weights, naming the site: no method can round them."""
    def read(site: LinearSite) -> np.ndarray:
        w = weight_of(site)
        if not np.all(np.isfinite(w)):
            bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
            raise InvalidWeightsError(f"weight of {site.id} ({site.weight}) has {bad} NaN/Inf values")
        return w
    return read


def make_plan(config: CompileConfig, sites: Sequence[LinearSite], weight_of: WeightFn,
              analysis: Analysis | None = None, progress: bool = False, *, model: onnx.ModelProto | None = None,
              calibration: Calibration | None = None, transformed: TransformedModelFn | None = None,
              online_units: frozenset[str] | None = None, step: StepCost | None = None) -> QuantPlan:
    """The method's plan. Transform methods need the full analysis (pairs and groups); calibrated
    methods need the ``model`` to run and the ``calibration`` tokens (cafeq+gptaq: ``transformed``).
    ``online_units``: for a plan of part of a model, the units the whole model's budget gives online
    transforms (``cafeq.select_online_units``); ``step``: the run-time cost the online budget is a
    fraction of (``online_cost.step_cost``)."""
    if config.method in CALIBRATED_METHODS and (model is None or calibration is None):
        raise ConfigError(f"method {config.method} needs the model and calibration data")
    weight_of = finite_weights(weight_of)
    if config.method == "rtn":
        return plan_rtn(sites, weight_of, config.quant, progress=progress)
    if config.method in ("gptq", "gptaq"):
        from qcompiler.methods.gptq import plan_calibrated

        return plan_calibrated(model, sites, weight_of, config.quant, config.method, calibration, progress,
                               analysis.pairs if analysis is not None else ())
    if config.method in TRANSFORM_METHODS:
        from qcompiler.methods.cafeq import plan_cafeq

        if analysis is None:
            raise ConfigError(f"method {config.method} needs the matcher's analysis (pairs and groups)")
        rounder = None
        if config.method == "cafeq+gptaq":
            from qcompiler.methods.gptq import calibrated_rounder

            if transformed is None:
                raise ConfigError("method cafeq+gptaq needs the transformed model's builder")
            rounder = calibrated_rounder(transformed, analysis.sites, config.quant, calibration, progress,
                                         analysis.pairs)
        return plan_cafeq(analysis, weight_of, config.quant, config.cafeq, config.method, progress=progress,
                          rounder=rounder, online_units=online_units, step=step)
    raise ConfigError(f"method {config.method!r} is not built yet")
