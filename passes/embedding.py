"""Quantized embedding tables: ``Gather(table)`` -> ``Gather(DequantizeLinear(codes, scales[, zp]))``, or,
with ``gather=True``, ``GatherBlockQuantized(codes, ids, scales[, zp])`` (com.microsoft, ONNX Runtime).

The table ``[V, H]`` is quantized in blocks along H (the plan holds it as ``W = table^T``, K = H).
DequantizeLinear rebuilds the whole float table on every run; GatherBlockQuantized reads only the rows
asked for (what a decoder's token step wants), from the MatMulNBits byte layout (row v's codes along H,
low bits first; 4- and 8-bit containers, blocks dividing H; other grids keep DequantizeLinear). Every other
reader of the table (a tied output head's Transpose, when the head stays in float) reads the dequantized
table, so the float copy disappears from the file.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.algorithms.packing import container_bits, pack_matmulnbits, pack_qdq
from qcompiler.graphio import redirect_consumers
from qcompiler.passes._rewire import weight_dtype
from qcompiler.passes.base import Pass, PassResult
from qcompiler.passes.qdq import int_tensor
from qcompiler.plan import QuantPlan, SitePlan


class EmbeddingPass(Pass):
    def __init__(self, plan: QuantPlan, gather: bool = False):
        self.sites = [p for p in plan.sites if p.site.role == "embedding"]
        self.heads = {p.site.weight: p for p in plan.sites if p.site.role == "head"}
        self.gather = gather
        self.gathers = 0  # Gathers made GatherBlockQuantized (after call)
        self.shared: list[gs.Constant] = []  # codes tensors equal to a tied head's MatMulNBits codes (after call)

    def call(self, graph: gs.Graph) -> PassResult:
        tensors = graph.tensors()
        for sp in self.sites:
            table = tensors[sp.site.weight]
            dtype = weight_dtype(graph, sp.site)
            if self.gather and _gatherable(sp):
                for node in [c for c in table.outputs if c.op == "Gather" and c.inputs[0] is table]:
                    self._gather(graph, node, sp, dtype)
            if table.outputs:  # readers that want the whole table
                redirect_consumers(table, _dequantized(graph, sp, dtype, list(table.shape)))
        if self.sites:
            graph.cleanup().toposort()
        return PassResult(graph, bool(self.sites))

    def _gather(self, graph: gs.Graph, node: gs.Node, sp: SitePlan, dtype) -> None:
        """``node`` becomes GatherBlockQuantized over the table's codes ``[V, H]`` (scales ``[V, H / block]``).
        A table tied to a head stored as the same codes reads them as the head's MatMulNBits stores them,
        ``[V, H / block, blob]`` (scales ``[V, H / block, 1]``), then a Reshape merges the last two axes: the
        same bytes in the same shape, which ``graphio.share_constants`` keeps once after the quantizing pass."""
        t = pack_matmulnbits(sp.weight)  # b [V, n_blocks, blob]: row v's codes along H
        base = f"{sp.site.weight}_gbq{sp.weight.bits}"
        ids = node.inputs[1]
        tied = self._ties_head(sp) and ids.shape is not None
        data, scales = (t.b, t.scales[..., None]) if tied else (t.b.reshape(t.n, -1), t.scales)
        codes = gs.Constant(f"{base}_data", data)
        inputs: list[gs.Tensor] = [codes, ids, gs.Constant(f"{base}_scales", scales.astype(dtype))]
        if t.zero_points is not None:
            inputs.append(gs.Constant(f"{base}_zero_points", t.zero_points))
        outputs = list(node.outputs)
        node.inputs.clear()
        node.outputs.clear()
        attrs = {"bits": t.bits, "block_size": t.block_size, "gather_axis": 0, "quantize_axis": data.ndim - 1}
        name = f"{node.name}_GatherBlockQuantized"
        if tied:
            rows = gs.Variable(f"{base}_rows", dtype=outputs[0].dtype)
            shape = gs.Constant(f"{base}_row_shape", np.array([0] * len(ids.shape) + [-1], dtype=np.int64))
            graph.nodes += [gs.Node("GatherBlockQuantized", name=name, domain="com.microsoft", inputs=inputs,
                                    outputs=[rows], attrs=attrs),
                            gs.Node("Reshape", name=f"{name}_rows", inputs=[rows, shape], outputs=outputs)]
            self.shared.append(codes)
        else:
            graph.nodes.append(gs.Node("GatherBlockQuantized", name=name, domain="com.microsoft", inputs=inputs,
                                       outputs=outputs, attrs=attrs))
        self.gathers += 1

    def _ties_head(self, sp: SitePlan) -> bool:
        """A head reads the same table and is stored on the same symmetric grid with the same codes and
        scales (no zero points: MatMulNBits packs them along the blocks, GatherBlockQuantized cannot)."""
        head = self.heads.get(sp.site.weight)
        if head is None:
            return False
        a, b = sp.weight, head.weight
        return (a.symmetric and b.symmetric and (a.bits, a.block_size) == (b.bits, b.block_size)
                and a.codes.shape == b.codes.shape and np.array_equal(a.codes, b.codes)
                and np.array_equal(a.scales, b.scales))


def gatherable(bits: int, block: int, width: int) -> bool:
    """GatherBlockQuantized reads 4- and 8-bit containers in whole blocks (a power of two >= 16) along H."""
    return container_bits(bits) in (4, 8) and block >= 16 and block & (block - 1) == 0 and width % block == 0


def gather_block(block: int, width: int) -> int | None:
    """The largest power of two <= ``block`` (0: per channel, ``width``) that is >= 16 and divides ``width``:
    the block a table ``width`` wide is stored in for GatherBlockQuantized (SmolLM2's 576 in blocks of 64 where
    the model's grid has 128); None if there is none."""
    b = 1 << (min(block or width, width).bit_length() - 1)
    while b >= 16 and width % b:
        b //= 2
    return b if b >= 16 else None


def _gatherable(sp: SitePlan) -> bool:
    return gatherable(sp.weight.bits, sp.weight.block_size, sp.site.k)


def _dequantized(graph: gs.Graph, sp: SitePlan, dtype, shape: list) -> gs.Variable:
    t = pack_qdq(sp.weight)  # codes [H, V], scales [nb, V]
    base = f"{sp.site.weight}_dq{sp.weight.bits}"
    inputs: list[gs.Tensor] = [
        int_tensor(f"{base}_codes", np.ascontiguousarray(t.codes.T), t.bits, t.signed),
        gs.Constant(f"{base}_scales", np.ascontiguousarray(t.scales.T).astype(dtype)),
    ]
    if t.zero_points is not None:
        inputs.append(int_tensor(f"{base}_zero_points", np.ascontiguousarray(t.zero_points.T), t.bits, t.signed))
    deq = gs.Variable(f"{base}_table", dtype=dtype, shape=shape)
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{sp.site.node}_DequantizeLinear",
                               attrs={"axis": 1, "block_size": t.block_size}, inputs=inputs, outputs=[deq]))
    return deq
