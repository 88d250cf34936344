"""Insert CafeQ's online ``x T^-1`` (block-diagonal ``T``) once per sibling group; weights become ``T W``.

``x W = (x T^-1)(T W)``. The op is standard ONNX, in one of two layouts:

- ``matmul`` (throughput: encoders, prefill): ``Reshape(x, [-1, K/b, b])``, ``Transpose`` to
  ``[K/b, M, b]``, a batched ``MatMul`` with ``T^-1`` (``[K/b, b, b]``), ``Transpose`` back, ``Reshape`` to
  ``x``'s shape. Each block is one GEMM over all M rows.
- ``conv`` (a decoder's batch-1 token step): a 1x1 ``Conv`` with ``group = K/b`` (weight ``[K, b, 1]``:
  block j's ``T^-1`` transposed). A ``[B, S, K]`` input is transposed to ``[B, K, S]`` and back (three
  nodes), so each block is one GEMM over the S positions; an input of another or unknown rank goes
  through ``Reshape(x, [-1, K, 1])`` and back (four nodes: one small product per row, slow at large M).
  ONNX Runtime runs a token's small grouped Conv on one thread, where the batched MatMul hands its K/b
  GEMMs to the thread pool (``tools/online_op_bench.py`` times each form).

With ``fold_scale``, an input made by ``Mul(a, s)`` with a constant ``s`` over the last axis (a norm's
gain) and read by nothing but the group is replaced by ``a``, and ``diag(s)`` is folded into the
op's ``T^-1``: one node fewer, the same function. Exact up to float rounding; the quantizing pass
that follows stores ``Q(T W)``.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.algorithms.transforms import apply_blocks
from qcompiler.config import ONLINE_LAYOUTS
from qcompiler.match.view import constant_value
from qcompiler.passes._rewire import nodes_by_name
from qcompiler.passes._weights import WeightTransformPass, weight_slot
from qcompiler.passes.base import PassError, PassResult
from qcompiler.plan import OnlineTransform

log = logging.getLogger(__name__)

_CORE = ("_online_MatMul", "_online_Conv", "_online_Mul")  # one per inserted op, whatever the layout

# ops whose output 0 is a normalised input times a per-channel gain input (plus a bias input): a diagonal
# online transform of that output is absorbed by scaling the gain and the bias (input indices)
NORM_GAINS = {"SimplifiedLayerNormalization": (1,), "SkipSimplifiedLayerNormalization": (2,),
              "RMSNormalization": (1,), "LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}


def _name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)


class OnlineTransformPass(WeightTransformPass):
    transforms: list[OnlineTransform]

    def __init__(self, transforms, sites, layout: str = "matmul", fold_scale: bool = False):
        super().__init__(transforms, sites)
        if layout not in ONLINE_LAYOUTS or layout == "auto":  # "auto" is resolved by the pipeline
            raise PassError(f"online layout must be matmul or conv, got {layout!r}")
        self.layout, self.fold_scale = layout, fold_scale
        self.folded = 0  # inputs whose scaling Mul was folded (after call)
        self.absorbed = 0  # diagonal transforms absorbed into the gain before them: no node (after call)

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
        outputs = {t.name for t in graph.outputs}
        for t in self.transforms:
            x = tensors[t.input]
            nb, b, _ = t.blocks.shape
            base = _name(t.id) + "_online"
            dtype = np.dtype(self.sites[t.sites[0]].dtype)
            members = {self.sites[sid].node for sid in t.sites}
            if b == 1:  # diagonal: x / t, absorbed into the gain (and bias) that made x where it can be
                d = 1.0 / t.blocks.reshape(nb).astype(np.float64)
                self._retarget(nodes, t, self._diagonal(graph, base, x, d, dtype, members, outputs))
                continue
            inv = np.linalg.inv(t.blocks.astype(np.float64))
            scale = _foldable_scale(x, nb * b, members, outputs) if self.fold_scale else None
            if scale is not None:
                x, s = scale
                inv = inv * s.reshape(nb, b, 1)  # diag(s) T^-1, block by block
                self.folded += 1
            out = self._insert(graph, base, x, inv.astype(dtype))
            self._retarget(nodes, t, out)
        if self.transforms:
            graph.cleanup().toposort()
            log.info("%d online transforms (%s layout), %d input scalings folded into them, %d diagonal ones "
                     "absorbed into the gain before them", len(self.transforms), self.layout, self.folded,
                     self.absorbed)
        return PassResult(graph, bool(self.transforms))

    def _retarget(self, nodes, t: OnlineTransform, out: gs.Tensor) -> None:
        """The group's sites read ``out`` (``x T^-1``) and store ``T W``."""
        for sid in t.sites:
            site = self.sites[sid]
            nodes[site.node].inputs[0] = out
            slot = weight_slot(nodes, site)
            slot.value = apply_blocks(t.blocks.astype(np.float64), slot.value)
            slot.write(f"{site.weight}_T")

    def _diagonal(self, graph: gs.Graph, base: str, x: gs.Tensor, d: np.ndarray, dtype: np.dtype,
                  members: set[str], outputs: set[str]) -> gs.Tensor:
        """``x * d``: no node at all where ``x`` is a gain's output read only by the group (the gain, and
        a norm's bias, take ``d``), else one ``Mul``."""
        slots = _gain_slots(x, d.size, members, outputs)
        if slots:
            for node, i, value in slots:
                scaled = value.astype(np.float64) * d.reshape((1,) * (value.ndim - 1) + (-1,))
                node.inputs[i] = gs.Constant(f"{base}_{node.inputs[i].name}_gain", scaled.astype(value.dtype))
            self.absorbed += 1
            return x
        out = gs.Variable(f"{base}_out", dtype=x.dtype)
        graph.nodes.append(gs.Node("Mul", f"{base}_Mul", inputs=[x, gs.Constant(f"{base}_T_inv", d.astype(dtype))],
                                   outputs=[out]))
        return out

    def _insert(self, graph: gs.Graph, base: str, x: gs.Tensor, inv: np.ndarray) -> gs.Variable:
        """The nodes of ``x -> x T^-1`` (``inv``: ``[K/b, b, b]``); returns their output. ``conv`` on a
        ``[B, S, K]`` input transposes around the Conv; otherwise ``x`` is reshaped to rows and back to its own
        shape, with the Conv or the batched MatMul between."""
        nb, b, _ = inv.shape
        flat, mixed, out = (gs.Variable(f"{base}_{s}", dtype=x.dtype) for s in ("flat", "mixed", "out"))
        weight = np.ascontiguousarray(inv.transpose(0, 2, 1).reshape(nb * b, b, 1))  # the Conv's: T^-1 transposed
        if self.layout == "conv" and x.shape is not None and len(x.shape) == 3:  # [B, S, K] <-> [B, K, S]
            graph.nodes += [
                gs.Node("Transpose", f"{base}_Transpose", attrs={"perm": [0, 2, 1]}, inputs=[x], outputs=[flat]),
                gs.Node("Conv", f"{base}_Conv", attrs={"group": nb, "kernel_shape": [1]},
                        inputs=[flat, gs.Constant(f"{base}_T_inv", weight)], outputs=[mixed]),
                gs.Node("Transpose", f"{base}_TransposeBack", attrs={"perm": [0, 2, 1]}, inputs=[mixed],
                        outputs=[out])]
            return out
        shape = gs.Variable(f"{base}_shape", dtype=np.int64)
        if self.layout == "conv":  # [M, K, 1] through a grouped 1x1 Conv (weight: each block's T^-1 transposed)
            split = [-1, nb * b, 1]
            core = [gs.Node("Conv", f"{base}_Conv", attrs={"group": nb, "kernel_shape": [1]},
                            inputs=[flat, gs.Constant(f"{base}_T_inv", weight)], outputs=[mixed])]
        else:  # [M, K/b, b] -> [K/b, M, b], one GEMM per block, and back
            split = [-1, nb, b]
            heads, prod = (gs.Variable(f"{base}_{s}", dtype=x.dtype) for s in ("blocks", "prod"))
            core = [gs.Node("Transpose", f"{base}_Transpose", attrs={"perm": [1, 0, 2]}, inputs=[flat],
                            outputs=[heads]),
                    gs.Node("MatMul", f"{base}_MatMul", inputs=[heads, gs.Constant(f"{base}_T_inv", inv)],
                            outputs=[prod]),
                    gs.Node("Transpose", f"{base}_TransposeBack", attrs={"perm": [1, 0, 2]}, inputs=[prod],
                            outputs=[mixed])]
        graph.nodes += [
            gs.Node("Shape", f"{base}_Shape", inputs=[x], outputs=[shape]),
            gs.Node("Reshape", f"{base}_Reshape", inputs=[x, gs.Constant(f"{base}_split", np.array(
                split, dtype=np.int64))], outputs=[flat]),
            *core,
            gs.Node("Reshape", f"{base}_ReshapeBack", inputs=[mixed, shape], outputs=[out]),
        ]
        return out

    def ensures(self, graph: gs.Graph) -> None:
        n = _count(graph) - self._before + self.absorbed
        if n != len(self.transforms):
            raise PassError(f"expected {len(self.transforms)} new online transforms, found {n}")


def _foldable_scale(x: gs.Tensor, k: int, members: set[str], outputs: set[str]) -> tuple[gs.Tensor, np.ndarray] | None:
    """``(a, s)`` when ``x = Mul(a, s)``, ``s`` a constant over the last axis (``[K]`` or ``[1, ..., K]``),
    ``a`` known to be ``K`` wide (not broadcast) and ``x`` read only by the group's ``members``; else None."""
    if len(x.inputs) != 1 or x.inputs[0].op != "Mul" or x.name in outputs:
        return None
    if any(c.name not in members for c in x.outputs):
        return None
    mul = x.inputs[0]
    for i in (0, 1):
        s, a = constant_value(mul.inputs[i]), mul.inputs[1 - i]
        if (s is not None and constant_value(a) is None and s.shape[-1:] == (k,) and s.size == k
                and a.shape is not None and len(a.shape) >= 1 and a.shape[-1] == k
                and np.issubdtype(s.dtype, np.floating) and np.all(np.isfinite(s))):
            return a, s.reshape(k).astype(np.float64)
    return None


def _gain_slots(x: gs.Tensor, k: int, members: set[str], outputs: set[str]) -> list[tuple[gs.Node, int, np.ndarray]]:
    """``(node, input index, value)`` of the constants that scale ``x`` channel by channel, when ``x`` is
    read only by the group's ``members``: the constant of ``Mul(a, s)`` (``_foldable_scale``'s
    conditions), or the gain (and bias) of a norm op whose first output is ``x``; else ``[]``."""
    if len(x.inputs) != 1 or x.name in outputs or any(c.name not in members for c in x.outputs):
        return []
    node = x.inputs[0]
    if node.op == "Reshape":  # rows for a Gemm (GPT-2): the last axis stays K
        a = node.inputs[0]
        if a.shape is None or len(a.shape) < 1 or a.shape[-1] != k or x.shape is None or x.shape[-1] != k:
            return []
        return _gain_slots(a, k, {node.name}, outputs)
    if node.op == "Mul":
        if _foldable_scale(x, k, members, outputs) is None:
            return []
        i = 0 if constant_value(node.inputs[0]) is not None else 1
        return [(node, i, constant_value(node.inputs[i]))]
    if node.op not in NORM_GAINS or node.outputs[0] is not x:
        return []
    slots = []
    for i in NORM_GAINS[node.op]:
        if i >= len(node.inputs) or node.inputs[i].name == "":
            continue
        value = constant_value(node.inputs[i])
        if value is None or value.size != k or not np.issubdtype(value.dtype, np.floating):
            return []
        slots.append((node, i, value))
    return slots if slots and slots[0][1] == NORM_GAINS[node.op][0] else []


def online_ops(model: onnx.ModelProto) -> int:
    """The online ops a compiled model runs (one core node each, whatever the layout; a diagonal
    absorbed into a gain has none)."""
    return sum(1 for n in model.graph.node if n.name.endswith(_CORE))


def _count(graph: gs.Graph) -> int:
    return sum(1 for node in graph.nodes if node.name.endswith(_CORE))
