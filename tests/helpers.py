"""Test helpers: run models on ONNX Runtime CPU with graph optimisations off, substitute weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from qcompiler.plan import QuantPlan
from qcompiler.runtime.session import SessionOptions
from qcompiler.runtime.validate import run

EXACT = SessionOptions(device="cpu", optimize=False)


def outputs(model, feeds):
    return run(model, feeds, EXACT)


def with_dequantized_weights(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """The model before the pass, with each site's weight replaced by W_hat (same layout)."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in m.graph.initializer}
    for sp in plan.sites:
        w_hat = sp.weight.dequantize()
        if sp.site.transposed:
            w_hat = w_hat.T
        t = inits[sp.site.weight]
        dtype = numpy_helper.to_array(t).dtype
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w_hat.astype(dtype)), t.name))
    return m


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
