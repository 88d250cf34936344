"""Methods turn sites and their weights into a QuantPlan. They never touch the graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from qcompiler.config import QuantConfig
from qcompiler.errors import ConfigError
from qcompiler.match.sites import LinearSite
from qcompiler.methods.rtn import plan_rtn
from qcompiler.plan import QuantPlan

WeightFn = Callable[[LinearSite], np.ndarray]


def make_plan(method: str, sites: Sequence[LinearSite], weight_of: WeightFn, quant: QuantConfig,
              progress: bool = False) -> QuantPlan:
    if method == "rtn":
        return plan_rtn(sites, weight_of, quant, progress=progress)
    raise ConfigError(f"method {method!r} is not built yet")
