"""Methods turn sites and their weights into a QuantPlan. They never touch the graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from qcompiler.config import CompileConfig
from qcompiler.errors import ConfigError
from qcompiler.match.analysis import Analysis
from qcompiler.match.sites import LinearSite
from qcompiler.methods.rtn import plan_rtn
from qcompiler.plan import QuantPlan

WeightFn = Callable[[LinearSite], np.ndarray]


TRANSFORM_METHODS = ("cafeq", "rotate")


def make_plan(config: CompileConfig, sites: Sequence[LinearSite], weight_of: WeightFn,
              analysis: Analysis | None = None, progress: bool = False) -> QuantPlan:
    """The method's plan. Transform methods need the full analysis (pairs and groups)."""
    if config.method == "rtn":
        return plan_rtn(sites, weight_of, config.quant, progress=progress)
    if config.method in TRANSFORM_METHODS:
        from qcompiler.methods.cafeq import plan_cafeq

        if analysis is None:
            raise ConfigError(f"method {config.method} needs the matcher's analysis (pairs and groups)")
        return plan_cafeq(analysis, weight_of, config.quant, config.cafeq, config.method, progress=progress)
    raise ConfigError(f"method {config.method!r} is not built yet")
