"""Reading and writing a site's weight and bias in the graph, in the site's own layout and dtype.

A write always creates a new initializer for this node's input, so shared or deduplicated constants
are never edited under another node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.match.view import constant_value
from qcompiler.passes.base import Pass, PassError
from qcompiler.sites import LinearSite


class WeightTransformPass(Pass):
    """Base of the passes that apply exact transforms to sites' float weights (``transforms`` from a plan,
    ``sites`` by id). ``float_site`` checks that a site is in the graph and still holds a float weight."""

    def __init__(self, transforms: Sequence, sites: Mapping[str, LinearSite]):
        self.transforms = list(transforms)
        self.sites = dict(sites)

    def float_site(self, nodes: dict[str, gs.Node], owner: str, site_id: str) -> LinearSite:
        site = self.sites.get(site_id)
        if site is None or site.node not in nodes:
            raise PassError(f"{owner}: site {site_id} is not in the graph")
        if site.op_type not in ("MatMul", "Gemm"):
            raise PassError(f"{owner}: site {site_id} is {site.op_type}, not a float weight")
        return site


class Slot:
    """Where a site's weight or bias lives: ``node.inputs[index]``, stored transposed or not."""

    def __init__(self, node: gs.Node, index: int, transposed: bool):
        self.node, self.index, self.transposed = node, index, transposed
        value = constant_value(node.inputs[index])
        if value is None:
            raise PassError(f"{node.name}: input {index} is not a constant")
        self.dtype = value.dtype
        self.value = np.array(value.T if transposed else value, dtype=np.float64)

    def write(self, name: str) -> None:
        v = self.value.T if self.transposed else self.value
        self.node.inputs[self.index] = gs.Constant(name, np.ascontiguousarray(v.astype(self.dtype)))


def weight_slot(nodes: dict[str, gs.Node], site: LinearSite) -> Slot:
    node = nodes[site.node]
    w = node.inputs[1]
    if constant_value(w) is None and w.inputs and w.inputs[0].op == "Transpose":
        return Slot(w.inputs[0], 0, site.transposed)
    return Slot(node, 1, site.transposed)


def bias_slot(nodes: dict[str, gs.Node], site: LinearSite) -> Slot | None:
    if site.bias is None:
        return None
    node = nodes[site.node]
    if site.op_type == "Gemm" and len(node.inputs) > 2:
        return Slot(node, 2, False)
    add = next(c for c in node.outputs[0].outputs if c.op == "Add")
    return Slot(add, [t.name for t in add.inputs].index(site.bias), False)
