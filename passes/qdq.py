"""Emit standard ONNX: DequantizeLinear (int4/uint4/int8/uint8, blocked, opset 21) then MatMul."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.algorithms.packing import pack_along_last, pack_qdq
from qcompiler.passes._rewire import LinearSitePass, rewrite_site, weight_dtype
from qcompiler.plan import SitePlan

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


class QDQPass(LinearSitePass):
    emitted_op = "DequantizeLinear"

    def rewrite(self, graph: gs.Graph, node: gs.Node, sp: SitePlan) -> None:
        site = sp.site
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

        def build(a: gs.Tensor, y: gs.Variable) -> list[gs.Node]:
            return [dq, gs.Node("MatMul", name=f"{site.node}_MatMul", inputs=[a, w_hat], outputs=[y])]

        rewrite_site(graph, node, build)
