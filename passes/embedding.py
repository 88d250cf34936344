"""Quantized embedding tables: ``Gather(table)`` -> ``Gather(DequantizeLinear(codes, scales[, zp]))``.

The table ``[V, H]`` is quantized in blocks along H (the plan holds it as ``W = table^T``, K = H).
Every reader of the table (a tied output head's Transpose too) reads the dequantized table, so the
float copy disappears from the file.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.algorithms.packing import pack_qdq
from qcompiler.graphio import redirect_consumers
from qcompiler.passes._rewire import weight_dtype
from qcompiler.passes.base import Pass, PassResult
from qcompiler.passes.qdq import int_tensor
from qcompiler.plan import QuantPlan


class EmbeddingPass(Pass):
    def __init__(self, plan: QuantPlan):
        self.sites = [p for p in plan.sites if p.site.role == "embedding"]

    def call(self, graph: gs.Graph) -> PassResult:
        tensors = graph.tensors()
        for sp in self.sites:
            site = sp.site
            table = tensors[site.weight]
            dtype = weight_dtype(graph, site)
            t = pack_qdq(sp.weight)  # codes [H, V], scales [nb, V]
            base = f"{site.weight}_dq{sp.weight.bits}"
            inputs: list[gs.Tensor] = [
                int_tensor(f"{base}_codes", np.ascontiguousarray(t.codes.T), t.bits, t.signed),
                gs.Constant(f"{base}_scales", np.ascontiguousarray(t.scales.T).astype(dtype)),
            ]
            if t.zero_points is not None:
                inputs.append(int_tensor(f"{base}_zero_points", np.ascontiguousarray(t.zero_points.T),
                                         t.bits, t.signed))
            deq = gs.Variable(f"{base}_table", dtype=dtype, shape=list(table.shape))
            graph.nodes.append(gs.Node("DequantizeLinear", name=f"{site.node}_DequantizeLinear",
                                       attrs={"axis": 1, "block_size": t.block_size}, inputs=inputs, outputs=[deq]))
            redirect_consumers(table, deq)
        if self.sites:
            graph.cleanup().toposort()
        return PassResult(graph, bool(self.sites))
