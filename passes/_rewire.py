"""Shared mechanics of the quantizing passes: replace a site's node by new nodes on the same output."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.passes.base import Pass, PassError, PassResult
from qcompiler.plan import QuantPlan, SitePlan
from qcompiler.sites import LinearSite

Builder = Callable[[gs.Tensor, gs.Variable], list[gs.Node]]


def nodes_by_name(graph: gs.Graph) -> dict[str, gs.Node]:
    return {n.name: n for n in graph.nodes}


def weight_dtype(graph: gs.Graph, site: LinearSite) -> np.dtype:
    return np.dtype(site.dtype)  # recorded by the matcher: no graph walk per site


def rewrite_site(graph: gs.Graph, node: gs.Node, build: Builder) -> None:
    """Detach ``node``; ``build(a, y)`` makes the nodes computing ``y = a @ W_hat``.

    Gemm's bias becomes an Add after them. The old weight (and a Transpose feeding it) are left
    unused and go at the next cleanup.
    """
    a, out = node.inputs[0], node.outputs[0]
    bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None and isinstance(bias, gs.Variable) and bias.name == "":
        bias = None  # optional input left empty
    node.inputs.clear()
    node.outputs.clear()
    if bias is None:
        graph.nodes.extend(build(a, out))
        return
    y = gs.Variable(f"{node.name}_nobias", dtype=out.dtype)
    graph.nodes.extend(build(a, y))
    graph.nodes.append(gs.Node("Add", name=f"{node.name}_bias", inputs=[y, bias], outputs=[out]))


class LinearSitePass(Pass):
    """Base of the quantizing passes: rewrites every MatMul/Gemm site of a plan (not embeddings).

    Subclasses implement ``rewrite(graph, node, site_plan)`` and name the op they emit.
    """

    emitted_op: str = ""

    def __init__(self, plan: QuantPlan):
        self.plan = plan
        self.site_plans = [p for p in plan.sites if p.site.role != "embedding"]

    def requires(self, graph: gs.Graph) -> None:
        names = nodes_by_name(graph)
        missing = [p.site.node for p in self.site_plans if p.site.node not in names]
        if missing:
            raise PassError(f"plan names nodes missing from the graph: {missing[:3]}")

    def rewrite(self, graph: gs.Graph, node: gs.Node, sp: SitePlan) -> None:
        raise NotImplementedError

    def call(self, graph: gs.Graph) -> PassResult:
        names = nodes_by_name(graph)
        for sp in self.site_plans:
            self.rewrite(graph, names[sp.site.node], sp)
        if self.site_plans:
            graph.cleanup()
        return PassResult(graph, bool(self.site_plans))

    def ensures(self, graph: gs.Graph) -> None:
        n = sum(1 for node in graph.nodes if node.op == self.emitted_op)
        if n < len(self.site_plans):
            raise PassError(f"expected at least {len(self.site_plans)} {self.emitted_op} nodes, found {n}")
