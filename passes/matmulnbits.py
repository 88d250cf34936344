"""Emit com.microsoft MatMulNBits for every site of a plan (3-bit codes in the 4-bit container)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from qcompiler.algorithms.packing import pack_matmulnbits
from qcompiler.passes._rewire import LinearSitePass, rewrite_site, weight_dtype
from qcompiler.plan import QuantPlan, SitePlan


class MatMulNBitsPass(LinearSitePass):
    emitted_op = "MatMulNBits"

    def __init__(self, plan: QuantPlan, accuracy_level: int = 1):
        super().__init__(plan)
        self.accuracy_level = accuracy_level

    def rewrite(self, graph: gs.Graph, node: gs.Node, sp: SitePlan) -> None:
        site = sp.site
        t = pack_matmulnbits(sp.weight)
        base = f"{site.weight}_q{sp.weight.bits}"
        inputs: list[gs.Tensor] = [
            gs.Constant(f"{base}_B", t.b),
            gs.Constant(f"{base}_scales", t.scales.astype(weight_dtype(graph, site))),
        ]
        if t.zero_points is not None:
            inputs.append(gs.Constant(f"{base}_zero_points", t.zero_points))
        attrs = {"K": t.k, "N": t.n, "bits": t.bits, "block_size": t.block_size,
                 "accuracy_level": self.accuracy_level}

        def build(a: gs.Tensor, y: gs.Variable) -> list[gs.Node]:
            return [gs.Node("MatMulNBits", name=f"{site.node}_MatMulNBits", domain="com.microsoft", attrs=attrs,
                            inputs=[a, *inputs], outputs=[y])]

        rewrite_site(graph, node, build)
