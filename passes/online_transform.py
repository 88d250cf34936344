"""Insert CafeQ's online ``x T^-1`` (block-diagonal ``T``) once per sibling group; weights become ``T W``.

``x W = (x T^-1)(T W)``. The op is standard ONNX. When ``x``'s rank is known (2 or 3), three nodes:
``Reshape(x, [0, (0,) K/b, 1, b])``, a ``MatMul`` with ``T^-1`` (``[K/b, b, b]``) that broadcasts over
the leading axes, and ``Reshape`` back to ``[0, (0,) K]``: no transposes and no ``Shape``, which matters
at batch 1, where each node's dispatch costs more than its arithmetic. Otherwise six:
``Reshape(x, [-1, K/b, b])``, ``Transpose`` to ``[K/b, M, b]``, the batched ``MatMul``, ``Transpose``
back, and ``Reshape`` to ``Shape(x)``. Exact up to float rounding; the quantizing pass that follows
stores ``Q(T W)``.
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
    layout = "auto"  # auto: broadcast when x's rank is known, else transpose (tests and timings pin one)

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
        nodes = nodes_by_name(graph)
        tensors = graph.tensors()
        for t in self.transforms:
            x = tensors[t.input]
            base = _name(t.id) + "_online"
            dtype = np.dtype(self.sites[t.sites[0]].dtype)
            inv = np.linalg.inv(t.blocks.astype(np.float64)).astype(dtype)

            rank = len(x.shape) if x.shape is not None else None
            if self.layout != "transpose" and rank in (2, 3):
                out = self._broadcast(graph, x, base, inv, rank)
            else:
                out = self._transpose(graph, x, base, inv)
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

    @staticmethod
    def _broadcast(graph: gs.Graph, x: gs.Tensor, base: str, inv: np.ndarray, rank: int) -> gs.Variable:
        nb, b, _ = inv.shape
        lead = [0] * (rank - 1)  # Reshape's 0: keep that axis of x
        split, out = (gs.Variable(f"{base}_{s}", dtype=x.dtype) for s in ("blocks", "out"))
        mixed = gs.Variable(f"{base}_mixed", dtype=x.dtype)
        graph.nodes += [
            gs.Node("Reshape", f"{base}_Reshape", inputs=[x, gs.Constant(f"{base}_split", np.array(
                lead + [nb, 1, b], dtype=np.int64))], outputs=[split]),
            gs.Node("MatMul", f"{base}_MatMul", inputs=[split, gs.Constant(f"{base}_T_inv", inv)], outputs=[mixed]),
            gs.Node("Reshape", f"{base}_ReshapeBack", inputs=[mixed, gs.Constant(f"{base}_merge", np.array(
                lead + [nb * b], dtype=np.int64))], outputs=[out]),
        ]
        return out

    @staticmethod
    def _transpose(graph: gs.Graph, x: gs.Tensor, base: str, inv: np.ndarray) -> gs.Variable:
        nb, b, _ = inv.shape
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
        return out

    def ensures(self, graph: gs.Graph) -> None:
        n = sum(1 for node in graph.nodes if node.name.endswith("_online_MatMul"))
        if n != len(self.transforms):
            raise PassError(f"expected {len(self.transforms)} online transforms, found {n}")
