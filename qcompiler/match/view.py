"""A read-only networkx dataflow view of an onnx-graphsurgeon graph.

Graph nodes are ONNX node names; an edge ``u -> v`` carries the tensor names ``u`` produces and ``v``
reads. The matcher asks it for producers, consumers, constant values and the set of nodes lying
between two tensors; it never edits the graph.
"""

from __future__ import annotations

from functools import cached_property

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.external import read_values

# ops that only move, copy or relabel elements: a per-channel transform passes through them
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Cast", "Flatten",
                        "Tile", "Dropout", "Contiguous"})
# ops that slice one tensor into parts (fused QKV / gate_up weights)
SPLIT_OPS = frozenset({"Split", "Slice", "Gather"})
# ops that read only a tensor's shape, never its values
SHAPE_OPS = frozenset({"Shape", "Size"})
# element-wise ops: output channel c depends only on input channel c (given scalar second operands)
ELEMENTWISE_OPS = frozenset({
    "Abs", "Add", "Cast", "Ceil", "Clip", "Cos", "Div", "Elu", "Erf", "Exp", "FastGelu", "Floor", "Gelu",
    "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log", "Max", "Min", "Mish", "Mul", "Neg", "Pow",
    "QuickGelu", "Reciprocal", "Relu", "Selu", "Sigmoid", "Sin", "Softplus", "Softsign", "Sqrt", "Sub",
    "Tanh", "ThresholdedRelu", "Where",
})


class GraphView:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.nodes: dict[str, gs.Node] = {}
        self.dag = nx.DiGraph()
        self._producer: dict[str, gs.Node] = {}
        self._consumers: dict[str, list[gs.Node]] = {}
        for i, node in enumerate(graph.nodes):
            name = node.name or f"__node{i}"
            self.nodes[name] = node
            self.dag.add_node(name, op=node.op)
            for t in node.outputs:
                self._producer[t.name] = node
            for t in node.inputs:
                self._consumers.setdefault(t.name, []).append(node)
        names = {id(n): k for k, n in self.nodes.items()}
        self._names = names
        for t, node in self._producer.items():
            for c in self._consumers.get(t, []):
                u, v = names[id(node)], names[id(c)]
                if self.dag.has_edge(u, v):
                    self.dag.edges[u, v]["tensors"].append(t)
                else:
                    self.dag.add_edge(u, v, tensors=[t])

    def name(self, node: gs.Node) -> str:
        return self._names[id(node)]

    def producer(self, tensor: str) -> gs.Node | None:
        return self._producer.get(tensor)

    def consumers(self, tensor: str) -> list[gs.Node]:
        return self._consumers.get(tensor, [])

    @cached_property
    def graph_outputs(self) -> frozenset[str]:
        return frozenset(t.name for t in self.graph.outputs)

    @cached_property
    def tensors(self) -> dict[str, gs.Tensor]:
        return self.graph.tensors()

    def constant(self, tensor: gs.Tensor | str) -> np.ndarray | None:
        """The value of an initializer, a ``Constant`` node's output or an Identity of one; else None."""
        t = self.tensors.get(tensor) if isinstance(tensor, str) else tensor
        return None if t is None else constant_value(t)

def constant_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of a tensor that is an initializer, a ``Constant`` node's output, or an Identity of one."""
    for _ in range(8):
        if isinstance(t, gs.Constant):
            return np.asarray(read_values(t))
        node = t.inputs[0] if t.inputs else None
        if node is None:
            return None
        if node.op == "Identity":
            t = node.inputs[0]
            continue
        if node.op != "Constant":
            return None
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        for key in ("value_float", "value_int", "value_floats", "value_ints"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
        return None
    return None
