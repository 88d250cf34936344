"""Random exact transforms for every matched pair, and the fold-and-compare check used by the tests."""

from __future__ import annotations

import numpy as np
import onnx

from qcompiler.algorithms.transforms import random_invertible, random_scale
from qcompiler.emit import emit_model
from qcompiler.graphio import import_graph
from qcompiler.match.analysis import Analysis, analyze_graph
from qcompiler.passes import FoldPairsPass
from qcompiler.plan import PairTransform
from qcompiler.runtime.inputs import sample_inputs
from tests.helpers import outputs, rel


def random_transforms(analysis: Analysis, seed: int = 0) -> list[PairTransform]:
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


def fold_and_compare(model: onnx.ModelProto, transforms=None, seed: int = 0) -> tuple[float, Analysis, onnx.ModelProto]:
    """Fold random (or given) transforms into every pair; the relative change of the outputs on ORT."""
    graph = import_graph(model)
    analysis = analyze_graph(graph, model)
    transforms = random_transforms(analysis, seed) if transforms is None else transforms(analysis)
    sites = {s.id: s for s in analysis.sites}
    result = FoldPairsPass(transforms, sites)(graph)
    folded = emit_model(result.graph, model, {})
    feeds = sample_inputs(model, batch=2, seq=9)
    ref, got = outputs(model, feeds), outputs(folded, feeds)
    return max(rel(got[k], ref[k]) for k in ref), analysis, folded
