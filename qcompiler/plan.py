"""Plans: what a method decided, as frozen data. Passes only apply plans.

A plan can be saved (``.npz`` with a JSON header), inspected and tested without any graph.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qcompiler.algorithms.grid import QuantizedWeight
from qcompiler.config import QuantConfig
from qcompiler.match.sites import LinearSite


@dataclass(frozen=True)
class SiteStats:
    rel_error: float  # ||W_hat - W||_F / ||W||_F
    proxy_error: float  # what the method minimised; for RTN the same Frobenius error, squared


@dataclass(frozen=True)
class SitePlan:
    site: LinearSite
    weight: QuantizedWeight
    stats: SiteStats


@dataclass(frozen=True)
class QuantPlan:
    method: str
    quant: QuantConfig
    sites: tuple[SitePlan, ...]

    def summary(self) -> list[dict]:
        return [
            {"id": p.site.id, "node": p.site.node, "k": p.site.k, "n": p.site.n,
             "bits": p.weight.bits, "block_size": p.weight.block_size, "symmetric": p.weight.symmetric,
             "storage_bits": p.weight.storage_bits(), **asdict(p.stats)}
            for p in self.sites
        ]

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        header = {"method": self.method, "quant": asdict(self.quant), "sites": []}
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
        return cls(header["method"], QuantConfig(**header["quant"]), tuple(sites))
