"""Emit standard ONNX: DequantizeLinear (int4/uint4/int8/uint8, blocked, opset 21) then MatMul."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from qcompiler.passes._rewire import nodes_by_name, rewrite_site, weight_dtype
from qcompiler.passes.base import Pass, PassError, PassResult

from qcompiler.algorithms.packing import pack_along_last, pack_qdq
from qcompiler.plan import QuantPlan

_TYPES = {(4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4,
          (8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8}


def int_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> gs.Constant:
    """A constant of (u)int4 or (u)int8; 4-bit values are packed two per byte, low nibble first."""
    dtype = _TYPES[(bits, signed)]
    if bits == 8:
        arr = values.astype(np.int8 if signed else np.uint8)
        return gs.Constant(name, arr)
    flat = (values.astype(np.int16) & 0xF).astype(np.uint8).reshape(-1)
    raw = pack_along_last(flat, 4, 0).tobytes()
    proto = onnx.helper.make_tensor(name, dtype, list(values.shape), raw, raw=True)
    return gs.Constant(name, gs.ir.tensor.LazyValues(proto))


class QDQPass(Pass):
    def __init__(self, plan: QuantPlan):
        self.plan = plan

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
            dtype = weight_dtype(graph, site)
            t = pack_qdq(sp.weight)
            base = f"{site.weight}_dq{sp.weight.bits}"
            dq_inputs: list[gs.Tensor] = [
                int_tensor(f"{base}_codes", t.codes, t.bits, t.signed),
                gs.Constant(f"{base}_scales", t.scales.astype(dtype)),
            ]
            if t.zero_points is not None:
                dq_inputs.append(int_tensor(f"{base}_zero_points", t.zero_points, t.bits, t.signed))
            w_hat = gs.Variable(f"{base}_weight", dtype=dtype, shape=[site.k, site.n])
            dq = gs.Node("DequantizeLinear", name=f"{site.node}_DequantizeLinear",
                         attrs={"axis": 0, "block_size": t.block_size}, inputs=dq_inputs, outputs=[w_hat])

            def build(a, y, dq=dq, w_hat=w_hat, name=f"{site.node}_MatMul"):
                return [dq, gs.Node("MatMul", name=name, inputs=[a, w_hat], outputs=[y])]

            rewrite_site(graph, names[site.node], build)
        graph.cleanup()
        return PassResult(graph, bool(self.plan.sites))

    def ensures(self, graph: gs.Graph) -> None:
        n = sum(1 for node in graph.nodes if node.op == "DequantizeLinear")
        if n < len(self.plan.sites):  # embedding sites bring their own DequantizeLinear
            raise PassError(f"expected at least {len(self.plan.sites)} DequantizeLinear nodes, found {n}")
