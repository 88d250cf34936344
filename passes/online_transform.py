"""Insert CafeQ's online ``x T^-1`` (block-diagonal ``T``) once per sibling group; weights become ``T W``.

``x W = (x T^-1)(T W)``. The op is standard ONNX: ``Reshape(x, [-1, K/b, b])``, ``Transpose`` to
``[K/b, M, b]``, a batched ``MatMul`` with ``T^-1`` (``[K/b, b, b]``), ``Transpose`` back, and ``Reshape``
to ``x``'s shape. Exact up to float rounding; the quantizing pass that follows stores ``Q(T W)``.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.algorithms.transforms import apply_blocks
from qcompiler.passes._rewire import nodes_by_name
from qcompiler.passes._weights import WeightTransformPass, weight_slot
from qcompiler.passes.base import PassError, PassResult
from qcompiler.plan import OnlineTransform


def _name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)


class OnlineTransformPass(WeightTransformPass):
    transforms: list[OnlineTransform]

    def requires(self, graph: gs.Graph) -> None:
        nodes = nodes_by_name(graph)
        for t in self.transforms:
            nb, b, b2 = t.blocks.shape
            if b != b2 or not np.all(np.isfinite(t.blocks)):
                raise PassError(f"{t.id}: blocks must be finite square matrices, got {t.blocks.shape}")
            for sid in t.sites:
                site = self.float_site(nodes, t.id, sid)
                if site.k != nb * b:
                    raise PassError(f"{t.id}: site {sid} has K={site.k}, the transform covers {nb * b}")
                if nodes[site.node].inputs[0].name != t.input:
                    raise PassError(f"{t.id}: site {sid} does not read {t.input}")

    def call(self, graph: gs.Graph) -> PassResult:
        self._before = _count(graph)  # a streaming compile inserts them a chunk at a time
        nodes = nodes_by_name(graph)
        tensors = graph.tensors()
        for t in self.transforms:
            x = tensors[t.input]
            nb, b, _ = t.blocks.shape
            base = _name(t.id) + "_online"
            dtype = np.dtype(self.sites[t.sites[0]].dtype)
            inv = np.linalg.inv(t.blocks.astype(np.float64)).astype(dtype)

            shape = gs.Variable(f"{base}_shape", dtype=np.int64)
            flat, heads, mixed, back, out = (gs.Variable(f"{base}_{s}", dtype=x.dtype)
                                             for s in ("flat", "blocks", "mixed", "back", "out"))
            graph.nodes += [
                gs.Node("Shape", f"{base}_Shape", inputs=[x], outputs=[shape]),
                gs.Node("Reshape", f"{base}_Reshape", inputs=[x, gs.Constant(f"{base}_split", np.array(
                    [-1, nb, b], dtype=np.int64))], outputs=[flat]),
                gs.Node("Transpose", f"{base}_Transpose", attrs={"perm": [1, 0, 2]}, inputs=[flat], outputs=[heads]),
                gs.Node("MatMul", f"{base}_MatMul", inputs=[heads, gs.Constant(f"{base}_T_inv", inv)],
                        outputs=[mixed]),
                gs.Node("Transpose", f"{base}_TransposeBack", attrs={"perm": [1, 0, 2]}, inputs=[mixed],
                        outputs=[back]),
                gs.Node("Reshape", f"{base}_ReshapeBack", inputs=[back, shape], outputs=[out]),
            ]
            for sid in t.sites:
                site = self.sites[sid]
                node = nodes[site.node]
                node.inputs[0] = out
                slot = weight_slot(nodes, site)
                slot.value = apply_blocks(t.blocks.astype(np.float64), slot.value)
                slot.write(f"{site.weight}_T")
        if self.transforms:
            graph.cleanup().toposort()
        return PassResult(graph, bool(self.transforms))

    def ensures(self, graph: gs.Graph) -> None:
        n = _count(graph) - self._before
        if n != len(self.transforms):
            raise PassError(f"expected {len(self.transforms)} new online transforms, found {n}")


def _count(graph: gs.Graph) -> int:
    return sum(1 for node in graph.nodes if node.name.endswith("_online_MatMul"))
