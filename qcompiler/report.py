"""A compile's result and what is said about it: the JSON report and the summary lines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from qcompiler import __version__
from qcompiler.config import CompileConfig
from qcompiler.passes.online_transform import online_ops
from qcompiler.plan import QuantPlan, joint_rounded_sites
from qcompiler.resources import compile_peak_mb
from qcompiler.runtime.validate import ValidationResult
from qcompiler.sites import MLP_UP_DOWN, MatchResult


@dataclass
class CompileResult:
    output: str | None
    model: onnx.ModelProto
    plan: QuantPlan
    match: MatchResult
    validation: ValidationResult | None
    size_before: int
    size_after: int
    timings: dict[str, float] = field(default_factory=dict)
    source: str = ""
    cached_export: bool = False
    loaded: Any = field(default=None, repr=False)  # the frontend's model (LoadedModel), for packaging

    def report(self, config: CompileConfig) -> dict[str, Any]:
        quantized_weight_bits = sum(p.site.k * p.site.n * 32 for p in self.plan.sites)
        true_bits = sum(p.weight.storage_bits() for p in self.plan.sites)
        return {
            "qcompiler": __version__,
            "source": self.source,
            "output": self.output,
            "config": asdict(config),
            "sites": self.plan.summary(),
            "pairs": [asdict(p) for p in self.plan.pair_stats],
            "transforms": {"pairs": [t.pair.id for t in self.plan.pair_transforms],
                           "online": [{"id": o.id, "sites": list(o.sites), "block_size": o.block_size}
                                      for o in self.plan.online]},
            "skipped": [asdict(r) for r in self.match.rejected],
            "size": {"before_bytes": self.size_before, "after_bytes": self.size_after,
                     "quantized_weights_fp32_bytes": quantized_weight_bits // 8,
                     "quantized_weights_true_bytes": true_bits // 8},
            "validation": None if self.validation is None else {
                "inputs": self.validation.inputs,
                "max_rel_error": self.validation.max_rel_error, "min_cosine": self.validation.min_cosine,
                "outputs": [asdict(o) for o in self.validation.outputs]},
            "timings_s": dict(self.timings),
            "peak_rss_mb": compile_peak_mb(),
            "cached_export": self.cached_export,
        }


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def summary_lines(result: CompileResult, config: CompileConfig, peak_mb: float, calibrated: bool) -> list[str]:
    """What ``qcompiler compile`` prints: what was written, how much each step changed, how long it took.
    ``calibrated``: the method rounded on calibration data (its proxies are output errors)."""
    plan = result.plan
    errs = [p.stats.rel_error for p in plan.sites]
    rtn = [p.stats.rtn_rel_error for p in plan.sites if p.stats.rtn_rel_error is not None]
    # a method other than RTN records plain RTN's error of each site beside its own
    versus = f"; plain RTN: mean {_mean(rtn):.4f})" if rtn else ")"
    lines = [
        f"compiled {result.source} -> {result.output}",
        f"  method {config.method}, {config.quant.describe()}, format {config.format}",
        f"  sites: {len(plan.sites)} quantized, {len(result.match.rejected)} skipped"
        f" (weight rel. error mean {_mean(errs):.4f}, max {max(errs):.4f}" + versus,
        f"  size: {_mb(result.size_before)} -> {_mb(result.size_after)}"
        f" ({result.size_after / max(result.size_before, 1):.2f}x)",
    ]
    for role in ("head", "embedding"):  # stored on their own terms (a head's grid may differ from --bits)
        for p in (p for p in plan.sites if p.site.role == role):
            w = p.weight
            scaled = role == "head" and any(p.site.id in t.sites for t in plan.online)
            lines.append(f"  {role} {p.site.id}: {p.site.n} x {p.site.k} at {w.bits}-bit block {w.block_size} "
                         f"{'sym' if w.symmetric else 'asym'}{', SINQ scales' if scaled else ''}, "
                         f"weight rel. error {p.stats.rel_error:.4f}"
                         + (f" (plain RTN {p.stats.rtn_rel_error:.4f})" if scaled and p.stats.rtn_rel_error else ""))
    if plan.pair_transforms or plan.online:
        ops = online_ops(result.model)
        absorbed = f" ({len(plan.online) - ops} absorbed into the gain before them)" if ops < len(plan.online) else ""
        lines.append(f"  transforms: {len(plan.pair_transforms)} pairs folded, {len(plan.online)} single, "
                     f"{ops} online ops{absorbed}")
    for kind in ("attn_vo", "mlp_up_down"):
        ps = [p for p in plan.pair_stats if p.kind == kind]
        if ps:
            plain = [p.pqe_plain for p in ps if p.pqe_plain is not None]
            lines.append(f"  {kind} product error (PQE) mean over {len(ps)} pairs: "
                         f"RTN {_mean(p.pqe_rtn for p in ps):.4f}"
                         + (f", transforms {_mean(plain):.4f}" if len(plain) == len(ps) else "")
                         + f", final {_mean(p.pqe for p in ps):.4f}")
    tried = [p for p in plan.pair_stats if p.joint is not None]
    if tried:
        kept = sum(p.joint == "joint" for p in tried)
        plain, sink = sum(p.joint == "plain" for p in tried), sum(p.joint == "sink" for p in tried)
        rule, mlp_rounds = config.cafeq.joint_rule, config.cafeq.joint_mlp_rounds
        early = sum(p.joint == "sink" and p.kind == MLP_UP_DOWN and (p.joint_rounds or 0) < mlp_rounds for p in tried)
        lines.append(f"  joint rounding: {kept} of {len(tried)} pairs rounded jointly"
                     + (f", {plain} kept plain rounding (no round lowered the product error)" if plain else "")
                     + (f", {sink} kept plain rounding by --joint-rule {rule} (their error at the attention "
                        "sink did not fall with the product error)" if sink else "")
                     + (f"; {early} up·down pairs were turned down after {config.cafeq.joint_mlp_screen} of "
                        f"{mlp_rounds} rounds (--joint-mlp-screen)" if early else ""))
        for p in tried:
            if p.joint not in ("joint", "plain", "sink"):
                lines.append(f"    {p.pair}: not rounded jointly, {p.joint}")
    cal = [p.stats for p in plan.sites if p.stats.rtn_proxy_error] if calibrated else []
    joint = joint_rounded_sites(plan) if not calibrated else ()  # calibrated rounding changes them otherwise
    if joint:
        lines.append(f"  joint rounding: {len(joint)} paired weights, rel. error mean "
                     f"{_mean(p.stats.plain_rel_error for p in joint):.4f} -> "
                     f"{_mean(p.stats.rel_error for p in joint):.4f} (traded for the products)")
    if cal:
        lines.append(f"  calibration output error^2 (relative) mean over {len(cal)} sites: RTN "
                     f"{_mean(s.rtn_proxy_error for s in cal):.5f} -> {_mean(s.proxy_error for s in cal):.5f}")
    ho = [p.stats.holdout_error for p in plan.sites if p.stats.holdout_error is not None]
    if ho:
        lines.append(f"  held-out ||X W_hat - X~ W|| / ||X~ W|| mean over {len(ho)} sites: {_mean(ho):.4f}")
    if result.validation is not None:
        lines += validation_lines(result.validation)
    total = sum(result.timings.values())
    lines.append(f"  time: {total:.1f}s (" + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
                 + (", export cached)" if result.cached_export else ")") + f"; peak memory {peak_mb:.0f} MiB")
    return lines


def validation_lines(validation: ValidationResult) -> list[str]:
    out = [f"  validation on {validation.inputs}, outputs against the original's (not task quality: `qcompiler eval`):"]
    for o in validation.outputs:
        out.append(f"    [{o.name}] rel. error {o.rel_error:.4f}, cosine {o.cosine:.5f}")
    return out
