"""Plans: what a method decided, as frozen data. Passes only apply plans.

A plan can be saved (``.npz`` with a JSON header), inspected and tested without any graph.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qcompiler.algorithms.grid import QuantizedWeight, quantize, relative_error
from qcompiler.algorithms.transforms import is_permutation
from qcompiler.config import QuantConfig
from qcompiler.sites import ATTN_VO, CoupledPair, LinearSite


@dataclass(frozen=True)
class SiteStats:
    rel_error: float  # ||W_eff - W||_F / ||W||_F (W_eff: the effective weight, transforms undone)
    proxy_error: float  # what the method minimised; for RTN the same Frobenius error, squared
    rtn_rel_error: float | None = None  # plain RTN of the untransformed weight, for comparison
    rtn_proxy_error: float | None = None
    # the same transforms with plain rounding (what joint rounding traded for the pairs' products)
    plain_rel_error: float | None = None
    # calibrated methods: ||X W_hat - X~ W||_F / ||X~ W||_F on held-out sequences (--calib-holdout)
    holdout_error: float | None = None


@dataclass(frozen=True)
class PairStats:
    pair: str
    kind: str
    pqe_rtn: float  # ||A_hat B_hat - A B|| / ||A B|| with plain RTN of both factors
    pqe: float  # the same with the method's effective factors
    proxy_rtn: float  # the learner's proxy (effective errors of both factors) at identity
    proxy: float
    pqe_plain: float | None = None  # the method's transforms with plain rounding (before joint rounding)
    # joint rounding: "joint" (rounded jointly), "plain" (tried; no round lowered the product error), "sink" (it
    # did, but its error at the attention sink did not fall as --joint-rule asks: plain kept), or why
    # the pair was not tried (its memory over --joint-max-gb); None where the method does no joint rounding
    joint: str | None = None
    # --joint-rule sink / sink-loose: the pair's squared output error at the attention sink, joint / plain rounding
    sink_ratio: float | None = None
    # rounds of joint rounding the pair ran: fewer than --joint-rounds where the sink rule turned it down
    # after --joint-mlp-screen (its sink_ratio is then that of the screen's result)
    joint_rounds: int | None = None


@dataclass(frozen=True)
class SitePlan:
    site: LinearSite
    weight: QuantizedWeight
    stats: SiteStats


@dataclass(frozen=True)
class PairTransform:
    """An exact transform for one coupled pair (applied by ``FoldPairsPass`` before quantization).

    ``attn_vo``: ``matrices[h]`` is ``M_h`` (``d_h x d_h``) for KV head ``h``.
    ``mlp_up_down``: new channel ``i`` is old channel ``perm[i]`` scaled by ``scale[i]``.
    """

    pair: CoupledPair
    matrices: np.ndarray | None = None
    scale: np.ndarray | None = None
    perm: np.ndarray | None = None

    def check(self) -> None:
        """Raise ValueError unless the transform is well formed and exact for its pair."""
        p = self.pair
        if p.kind == ATTN_VO:
            want = (p.num_kv_heads, p.head_dim, p.head_dim)
            if self.matrices is None or self.matrices.shape != want:
                raise ValueError(f"{p.id}: expected matrices of shape {want}")
            if not np.all(np.isfinite(self.matrices)) or np.min(np.abs(np.linalg.det(self.matrices))) == 0:
                raise ValueError(f"{p.id}: a head transform is singular or not finite")
            return
        width = p.producer_cols[1] - p.producer_cols[0]
        scale = np.ones(width) if self.scale is None else self.scale
        perm = np.arange(width) if self.perm is None else self.perm
        if scale.shape != (width,) or not np.all(np.isfinite(scale)) or np.any(scale == 0):
            raise ValueError(f"{p.id}: scale must be {width} finite non-zero values")
        if not is_permutation(perm, width):
            raise ValueError(f"{p.id}: perm is not a permutation of {width} channels")
        if np.any(scale != 1) and "diagonal" not in p.exact:
            if "positive_diagonal" not in p.exact or np.any(scale <= 0):
                raise ValueError(f"{p.id}: a scale is not exact through the activation {p.activation!r}")


@dataclass(frozen=True)
class OnlineTransform:
    """``x -> x T^-1`` applied once to ``input``, shared by ``sites`` (a sibling group or one site); each
    site stores ``T W``. ``blocks`` is ``T``'s diagonal, ``[K/b, b, b]``."""

    id: str
    input: str
    sites: tuple[str, ...]
    blocks: np.ndarray

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[-1])


@dataclass(frozen=True)
class QuantPlan:
    method: str
    quant: QuantConfig
    sites: tuple[SitePlan, ...]
    pair_transforms: tuple[PairTransform, ...] = ()  # folded into weights before quantization
    online: tuple[OnlineTransform, ...] = ()  # inserted as ops; weights become T W
    pair_stats: tuple[PairStats, ...] = ()
    # a streaming compile's plan: codes were written into the model and dropped (shapes and stats remain)
    released: bool = False

    def summary(self) -> list[dict]:
        return [
            {"id": p.site.id, "node": p.site.node, "k": p.site.k, "n": p.site.n,
             "bits": p.weight.bits, "block_size": p.weight.block_size, "symmetric": p.weight.symmetric,
             "storage_bits": p.weight.storage_bits(), **asdict(p.stats)}
            for p in self.sites
        ]

    def save(self, path: str | Path) -> None:
        if self.released:
            raise ValueError("a streaming compile's plan holds no codes (they are in the model's data file)")
        arrays: dict[str, np.ndarray] = {}
        header = {"method": self.method, "quant": asdict(self.quant), "sites": [], "pairs": [], "online": [],
                  "pair_stats": [asdict(p) for p in self.pair_stats]}
        for i, t in enumerate(self.pair_transforms):
            for name in ("matrices", "scale", "perm"):
                if getattr(t, name) is not None:
                    arrays[f"pair_{name}_{i}"] = getattr(t, name)
            header["pairs"].append(asdict(t.pair))
        for i, o in enumerate(self.online):
            arrays[f"online_{i}"] = o.blocks
            header["online"].append({"id": o.id, "input": o.input, "sites": list(o.sites)})
        for i, p in enumerate(self.sites):
            arrays[f"codes_{i}"] = p.weight.codes
            arrays[f"scales_{i}"] = p.weight.scales
            arrays[f"zero_points_{i}"] = p.weight.zero_points
            header["sites"].append({"site": asdict(p.site), "stats": asdict(p.stats),
                                    "bits": p.weight.bits, "block_size": p.weight.block_size,
                                    "symmetric": p.weight.symmetric})
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        with np.load(path) as z:
            header = json.loads(bytes(z["header"]).decode())
            sites = []
            for i, s in enumerate(header["sites"]):
                qw = QuantizedWeight(z[f"codes_{i}"], z[f"scales_{i}"], z[f"zero_points_{i}"],
                                     s["bits"], s["block_size"], s["symmetric"])
                sites.append(SitePlan(LinearSite(**s["site"]), qw, SiteStats(**s["stats"])))
            pairs = []
            for i, d in enumerate(header.get("pairs", [])):
                pair = CoupledPair(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
                pairs.append(PairTransform(pair, *(z[f"pair_{n}_{i}"] if f"pair_{n}_{i}" in z else None
                                                   for n in ("matrices", "scale", "perm"))))
            online = tuple(OnlineTransform(o["id"], o["input"], tuple(o["sites"]), z[f"online_{i}"])
                           for i, o in enumerate(header.get("online", [])))
        return cls(header["method"], QuantConfig(**header["quant"]), tuple(sites), tuple(pairs), online,
                   tuple(PairStats(**p) for p in header.get("pair_stats", [])))


def joint_rounded_sites(plan: QuantPlan, rtol: float = 1e-5) -> tuple[SitePlan, ...]:
    """The sites whose weights joint rounding changed: ``rel_error`` away from ``plain_rel_error`` by more
    than ``rtol`` (relative).

    Not an exact ``!=``: the plain error is measured on a float32 copy of the effective weight and the final
    one in float64, so a site that joint rounding left alone (Q and K of a group with an online transform)
    differs by float rounding, about 1e-9 relative (float32 sums bound it near 1e-6), while a weight joint
    rounding re-rounds moves by percents.
    """
    out = []
    for p in plan.sites:
        plain, final = p.stats.plain_rel_error, p.stats.rel_error
        if plain is not None and abs(plain - final) > rtol * max(abs(plain), abs(final)):
            out.append(p)
    return tuple(out)


def own_grid_site(site: LinearSite, quant: QuantConfig, weight_of: Callable[[LinearSite], np.ndarray],
                  like: SiteStats | None = None) -> SitePlan:
    """``site`` rounded to nearest on its own grid ``quant`` (an 8-bit head in a 4-bit model). That is also its
    RTN and plain-rounding figure wherever the plan's other sites (``like``) record those (a calibrated method's
    output-error proxies are left out: none was measured on this grid)."""
    w = weight_of(site)
    qw = quantize(w, quant.bits, quant.group_size, quant.symmetric)
    w_hat = qw.dequantize()
    err = relative_error(w, w_hat)
    return SitePlan(site, qw, SiteStats(
        rel_error=err, proxy_error=float(np.sum((w_hat - w) ** 2)),
        rtn_rel_error=None if like is None or like.rtn_rel_error is None else err,
        plain_rel_error=None if like is None or like.plain_rel_error is None else err))


def scaled_site(plain: SitePlan, quant: QuantConfig, w: np.ndarray) -> tuple[SitePlan, OnlineTransform] | None:
    """``plain`` (its site rounded to nearest on ``quant``, :func:`own_grid_site`) balanced instead by SINQ's input
    scales ``t`` (per quantization group, algorithms/sinq.py): it stores ``W / t`` and its input is multiplied by
    ``t`` (the online pass folds that into the gain of a norm before it), errors measured against ``w``. None
    where the scales do not lower the weight's error."""
    from qcompiler.algorithms.sinq import sinkhorn_scales

    t = sinkhorn_scales(w.astype(np.float64), None if quant.per_channel else quant.group_size)
    qw = quantize((w / t[:, None]).astype(np.float32), quant.bits, quant.group_size, quant.symmetric)
    w_hat = qw.dequantize().astype(np.float64) * t[:, None]
    err = relative_error(w, w_hat)
    if not err < plain.stats.rel_error:
        return None
    stats = dataclasses.replace(plain.stats, rel_error=err, proxy_error=float(np.sum((w_hat - w) ** 2)))
    site = plain.site
    return SitePlan(site, qw, stats), OnlineTransform(f"{site.id}.scales", site.input, (site.id,),
                                                      (1.0 / t).reshape(-1, 1, 1))


def regrid_role(plan: QuantPlan, role: str, quant: QuantConfig,
                weight_of: Callable[[LinearSite], np.ndarray]) -> QuantPlan:
    """``plan`` with the sites of ``role`` (``"head"``: an output head) rounded to nearest on their own grid
    ``quant``; every other site as the method planned it. Such a site must carry no transform (no pair or
    online transform names it: a head never does), so its stored weight is ``weight_of(site)`` itself."""
    if plan.released:
        raise ValueError("a released plan holds no codes: regrid each chunk's plan before its rewrite")
    touched = {m for t in plan.online for m in t.sites}
    touched |= {s for t in plan.pair_transforms for s in (t.pair.producer, t.pair.consumer, t.pair.gate) if s}
    sites = []
    for p in plan.sites:
        if p.site.role != role or (p.weight.bits, p.weight.block_size, p.weight.symmetric) == (
                quant.bits, quant.group_size, quant.symmetric):
            sites.append(p)
            continue
        if p.site.id in touched:
            raise ValueError(f"{p.site.id}: a transformed site cannot take a grid of its own")
        sites.append(own_grid_site(p.site, quant, weight_of, p.stats))
    return dataclasses.replace(plan, sites=tuple(sites))

