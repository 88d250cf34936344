"""Prove a model's pairs right: fold random exact transforms into every pair and run ONNX Runtime.

For V·O a random well-conditioned ``d_h x d_h`` matrix per KV head; for up·down a random permutation
and the diagonal the pair allows (signed when gated, positive after ReLU). A wrong head map or a
wrong channel correspondence changes the outputs by O(1); a right one leaves them unchanged up to
float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from qcompiler.algorithms.transforms import random_invertible, random_scale
from qcompiler.sites import Analysis


@dataclass(frozen=True)
class FoldCheck:
    pairs: int
    rel_change: float  # max over outputs of ||y_folded - y|| / ||y||
    folded: onnx.ModelProto


def random_transforms(analysis: Analysis, seed: int = 0) -> list:
    from qcompiler.plan import PairTransform

    rng = np.random.default_rng(seed)
    out = []
    for p in analysis.pairs:
        if p.kind == "attn_vo":
            mats = np.stack([random_invertible(p.head_dim, rng) for _ in range(p.num_kv_heads)])
            out.append(PairTransform(p, matrices=mats))
            continue
        width = p.producer_cols[1] - p.producer_cols[0]
        scale = None
        if "diagonal" in p.exact:
            scale = random_scale(width, rng, signs=True)
        elif "positive_diagonal" in p.exact:
            scale = random_scale(width, rng, signs=False)
        out.append(PairTransform(p, scale=scale, perm=rng.permutation(width)))
    return out


def fold_check(model: onnx.ModelProto, analysis: Analysis | None = None, transforms=None, seed: int = 0
               ) -> tuple[FoldCheck, Analysis]:
    """Fold ``transforms`` (default: random ones, one per float pair) and compare ORT outputs."""
    from qcompiler.analyze import analyze_graph
    from qcompiler.emit import emit_model
    from qcompiler.graphio import import_graph
    from qcompiler.passes import FoldPairsPass
    from qcompiler.runtime.inputs import sample_inputs
    from qcompiler.runtime.session import SessionOptions
    from qcompiler.runtime.validate import run

    graph = import_graph(model)
    analysis = analysis or analyze_graph(graph, model)
    float_ids = {s.id for s in analysis.sites}
    chosen = transforms(analysis) if callable(transforms) else (transforms or random_transforms(analysis, seed))
    chosen = [t for t in chosen if {t.pair.producer, t.pair.consumer} <= float_ids]
    result = FoldPairsPass(chosen, {s.id: s for s in analysis.sites})(graph)
    folded = emit_model(result.graph, model, {})
    feeds = sample_inputs(model, batch=2, seq=9)
    exact = SessionOptions(device="cpu", optimize=False)
    ref, got = run(model, feeds, exact), run(folded, feeds, exact)
    change = 0.0
    caches = {c for t in chosen for c in t.pair.cache}  # V's cache holds V M_h: different by design
    for k, r in ref.items():
        if k in caches:
            continue
        r64, g64 = np.asarray(r, np.float64), np.asarray(got[k], np.float64)
        change = max(change, float(np.linalg.norm(g64 - r64) / max(np.linalg.norm(r64), 1e-30)))
    return FoldCheck(len(chosen), change, folded), analysis
