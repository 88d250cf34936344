"""Fold exact transforms into coupled pairs' weights (V·O per KV head; up·down diagonal + permutation).

The graph's structure does not change: each touched weight (and bias) gets a new initializer holding the
transformed values, in the site's own layout and dtype, so shared or deduplicated constants are never
edited under another node.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.algorithms.fold import fold_attn_vo, fold_mlp
from qcompiler.passes._rewire import nodes_by_name
from qcompiler.passes._weights import Slot, WeightTransformPass, bias_slot, weight_slot
from qcompiler.passes.base import PassResult
from qcompiler.plan import PairTransform
from qcompiler.sites import ATTN_VO


class FoldPairsPass(WeightTransformPass):
    transforms: list[PairTransform]

    def requires(self, graph: gs.Graph) -> None:
        nodes = nodes_by_name(graph)
        for t in self.transforms:
            t.check()
            for i in (t.pair.producer, t.pair.consumer, t.pair.gate):
                if i:
                    self.float_site(nodes, f"pair {t.pair.id}", i)

    def call(self, graph: gs.Graph) -> PassResult:
        nodes = nodes_by_name(graph)
        weights: dict[str, Slot] = {}
        biases: dict[str, Slot | None] = {}

        def w(site_id: str) -> np.ndarray:
            if site_id not in weights:
                weights[site_id] = weight_slot(nodes, self.sites[site_id])
                biases[site_id] = bias_slot(nodes, self.sites[site_id])
            return weights[site_id].value

        def b(site_id: str) -> np.ndarray | None:
            w(site_id)
            slot = biases[site_id]
            return None if slot is None else slot.value

        for t in self.transforms:
            p = t.pair
            if p.kind == ATTN_VO:
                fold_attn_vo(w(p.producer), b(p.producer), w(p.consumer), p.producer_cols, p.head_dim, p.kv_map,
                             np.asarray(t.matrices, dtype=np.float64))
            else:
                width = p.producer_cols[1] - p.producer_cols[0]
                scale = np.ones(width) if t.scale is None else np.asarray(t.scale, dtype=np.float64)
                perm = np.arange(width) if t.perm is None else np.asarray(t.perm)
                gate = w(p.gate) if p.gate else None
                fold_mlp(w(p.producer), b(p.producer), p.producer_cols, w(p.consumer), scale, perm,
                         gate, b(p.gate) if p.gate else None, p.gate_cols)
        for site_id, slot in weights.items():
            slot.write(f"{self.sites[site_id].weight}_folded")
            if biases[site_id] is not None:
                biases[site_id].write(f"{self.sites[site_id].weight}_bias_folded")
        if weights:
            graph.cleanup()
        return PassResult(graph, bool(weights))
