"""Round-to-nearest: every site onto its own fitted grid. The floor every method must beat."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from qcompiler.algorithms.grid import quantize, relative_error
from qcompiler.config import QuantConfig
from qcompiler.errors import QCompilerError
from qcompiler.methods.base import Method, PlanContext
from qcompiler.plan import QuantPlan, SitePlan, SiteStats
from qcompiler.sites import LinearSite


def plan_rtn(sites: Sequence[LinearSite], weight_of: Callable[[LinearSite], np.ndarray],
             quant: QuantConfig, progress: bool = False) -> QuantPlan:
    out = []
    for site in tqdm(sites, desc="rtn", unit="site", disable=not progress, leave=False):
        w = weight_of(site)
        if not np.isfinite(w).all():
            raise QCompilerError(f"weight of site {site.id} contains NaN or Inf")
        qw = quantize(w, quant.bits, quant.group_size, quant.symmetric)
        w_hat = qw.dequantize()
        err = relative_error(w, w_hat)
        out.append(SitePlan(site, qw, SiteStats(rel_error=err, proxy_error=float(np.sum((w_hat - w) ** 2)))))
    return QuantPlan("rtn", quant, tuple(out))


class Rtn(Method):
    name = "rtn"
    summary = "round to nearest on each weight's own grid; bit-identical to ONNX Runtime's quantizer"
    stream_chunk_mb = 256

    def plan(self, ctx: PlanContext) -> QuantPlan:
        return plan_rtn(ctx.sites, ctx.weight_of, ctx.config.quant, progress=ctx.progress)
