"""The peers' quantizers, called as their documentation shows, on the fp32 ONNX file the bench exported.

ONNX Runtime: ``MatMulNBitsQuantizer`` with DEFAULT, HQQ, k_quant and GPTQ configs, and
``quantize_dynamic`` (int8 weights and activations, the stock reference). onnxsim 0.8: block-32
symmetric int4 ``DequantizeLinear`` weights (``quantize_weight_only_int4``) refined by ``apply_gptq``,
``apply_gptaq`` or ``apply_awq``; ``quantize_weight_only_int4_hqq``; ``apply_quarot_fused``. onnxsim
needs opset 21 (the model is converted first) and leaves the replaced float weights in the graph,
unused: they are dropped before saving, so the file size is what the quantized model needs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from tools.qbench.grid import Setting

Feeds = list[dict[str, np.ndarray]]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


def _nbits(model: onnx.ModelProto, cfg) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(_copy(model), algo_config=cfg)
    q.process()
    return q.model.model


def ort_default(model, s: Setting, feeds: Feeds) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    return _nbits(model, DefaultWeightOnlyQuantConfig(block_size=s.block, is_symmetric=s.sym, bits=s.bits))


def ort_hqq(model, s: Setting, feeds: Feeds) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    return _nbits(model, HQQWeightOnlyQuantConfig(block_size=s.block, bits=s.bits))


def _int4_algo(model, s: Setting, cfg) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # k_quant and GPTQ take block size and symmetry from the quantizer, not from their config
    q = MatMulNBitsQuantizer(_copy(model), block_size=s.block, is_symmetric=s.sym, algo_config=cfg)
    q.process()
    return q.model.model


def ort_kquant(model, s: Setting, feeds: Feeds) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig

    return _int4_algo(model, s, KQuantWeightOnlyQuantConfig())


def ort_gptq(model, s: Setting, feeds: Feeds) -> onnx.ModelProto:
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            self.i += 1
            return feeds[self.i - 1] if self.i <= len(feeds) else None

    cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), percdamp=0.01, block_size=128)
    return _int4_algo(model, s, cfg)


def ort_int8_dynamic(model, s: Setting | None, feeds: Feeds) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        onnx.save(model, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        return onnx.load(str(dst))


def _opset21(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnx import version_converter

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return model if opset >= 21 else version_converter.convert_version(model, 21)


def drop_unused_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}

    def walk(g):  # names read inside subgraphs count as used
        for n in g.node:
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    used.update(i for m in sub.node for i in m.input)
                    walk(sub)
    walk(model.graph)
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def _onnxsim_int4(model) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    import onnxsim

    float21 = _opset21(model)
    return float21, onnxsim.quantize_weight_only_int4(float21)


def onnxsim_int4(model, s: Setting, feeds: Feeds) -> onnx.ModelProto:
    return drop_unused_initializers(_onnxsim_int4(model)[1])


def _onnxsim_refined(fn_name: str) -> Callable:
    def run(model, s: Setting, feeds: Feeds) -> onnx.ModelProto:
        import onnxsim

        float21, q = _onnxsim_int4(model)
        return drop_unused_initializers(getattr(onnxsim, fn_name)(float21, q, calibration_data=feeds))
    return run


def onnxsim_hqq(model, s: Setting, feeds: Feeds) -> onnx.ModelProto:
    import onnxsim

    return drop_unused_initializers(onnxsim.quantize_weight_only_int4_hqq(_opset21(model), block_size=s.block))


def onnxsim_quarot(model, s: Setting, feeds: Feeds) -> onnx.ModelProto:
    import onnxsim

    return drop_unused_initializers(onnxsim.apply_quarot_fused(_opset21(model), block_size=s.block))


PEERS: dict[str, Callable] = {
    "ort-default": ort_default, "ort-hqq": ort_hqq, "ort-kquant": ort_kquant, "ort-gptq": ort_gptq,
    "ort-int8-dynamic": ort_int8_dynamic, "onnxsim-int4": onnxsim_int4, "onnxsim-hqq": onnxsim_hqq,
    "onnxsim-quarot": onnxsim_quarot, "onnxsim-gptq": _onnxsim_refined("apply_gptq"),
    "onnxsim-gptaq": _onnxsim_refined("apply_gptaq"), "onnxsim-awq": _onnxsim_refined("apply_awq"),
}


def versions() -> dict[str, str]:
    import onnxruntime

    out = {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}
    try:
        import onnxsim

        out["onnxsim"] = getattr(onnxsim, "__version__", "?")
    except ImportError:
        out["onnxsim"] = "not installed"
    return out

