"""Emit com.microsoft MatMulNBits for every site of a plan (3-bit codes in the 4-bit container)."""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs
from qcompiler.passes._rewire import nodes_by_name, rewrite_site, weight_dtype
from qcompiler.passes.base import Pass, PassError, PassResult

from qcompiler.algorithms.packing import pack_matmulnbits
from qcompiler.plan import QuantPlan

log = logging.getLogger(__name__)


class MatMulNBitsPass(Pass):
    def __init__(self, plan: QuantPlan, accuracy_level: int = 1):
        self.plan = plan
        self.accuracy_level = accuracy_level

    def requires(self, graph: gs.Graph) -> None:
        names = nodes_by_name(graph)
        missing = [p.site.node for p in self.plan.sites if p.site.node not in names]
        if missing:
            raise PassError(f"plan names nodes missing from the graph: {missing[:3]}")

    def call(self, graph: gs.Graph) -> PassResult:
        names = nodes_by_name(graph)
        for sp in self.plan.sites:
            site = sp.site
            if site.role == "embedding":
                continue
            node = names[site.node]
            dtype = weight_dtype(graph, site)
            t = pack_matmulnbits(sp.weight)
            base = f"{site.weight}_q{sp.weight.bits}"
            inputs: list[gs.Tensor] = [
                gs.Constant(f"{base}_B", t.b),
                gs.Constant(f"{base}_scales", t.scales.astype(dtype)),
            ]
            if t.zero_points is not None:
                inputs.append(gs.Constant(f"{base}_zero_points", t.zero_points))
            attrs = {"K": t.k, "N": t.n, "bits": t.bits, "block_size": t.block_size,
                     "accuracy_level": self.accuracy_level}

            def build(a, y, inputs=inputs, attrs=attrs, name=f"{site.node}_MatMulNBits"):
                return [gs.Node("MatMulNBits", name=name, domain="com.microsoft", attrs=attrs,
                                inputs=[a, *inputs], outputs=[y])]

            rewrite_site(graph, node, build)
        graph.cleanup()
        return PassResult(graph, bool(self.plan.sites))

    def ensures(self, graph: gs.Graph) -> None:
        n = sum(1 for node in graph.nodes if node.op == "MatMulNBits")
        want = sum(1 for p in self.plan.sites if p.site.role != "embedding")
        if n < want:
            raise PassError(f"expected at least {want} MatMulNBits nodes, found {n}")


