"""Packing; the layout test is parity with ONNX Runtime's own quantizer kernels, bit for bit."""

import numpy as np
import pytest
from onnxruntime.capi import _pybind_state as ortc

from qcompiler.algorithms.grid import quantize
from qcompiler.algorithms.packing import (
    nbits_block_size,
    pack_along_last,
    pack_matmulnbits,
    pack_qdq,
    unpack_along_last,
    unpack_matmulnbits,
)

_ORT = {2: ortc.quantize_matmul_2bits, 4: ortc.quantize_matmul_4bits, 8: ortc.quantize_matmul_8bits}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    v = np.random.default_rng(0).integers(0, 2 ** bits, size=(3, 37)).astype(np.uint8)
    assert np.array_equal(unpack_along_last(pack_along_last(v, bits, 0), bits, 37), v)


def _ort_quantize(w, bits, bs, sym):
    k, n = w.shape
    kb = (k + bs - 1) // bs
    kpack = 8 // bits
    packed = np.zeros((n, kb, bs * bits // 8), np.uint8)
    zp = np.zeros((n, (kb + kpack - 1) // kpack), np.uint8)
    sc = np.zeros((n, kb), np.float32)
    _ORT[bits](packed, np.pad(w, ((0, kb * bs - k), (0, 0))), sc, zp, bs, n, k, sym)
    return packed, sc, zp


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("bs", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("shape", [(384, 40), (100, 33)])
def test_matmulnbits_layout_matches_onnxruntime(bits, bs, sym, shape):
    rng = np.random.default_rng(bits * 1000 + bs)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 1.0, (1, shape[1]))).astype(np.float32)
    w[3, 5] = 9.0  # an outlier
    packed, sc, zp = _ort_quantize(w, bits, bs, sym)
    t = pack_matmulnbits(quantize(w, bits, bs, sym))
    assert t.bits == bits and t.block_size == bs and (t.k, t.n) == shape
    assert np.array_equal(t.b, packed)
    assert np.array_equal(t.scales, sc)
    if sym:
        assert t.zero_points is None
    else:
        assert np.array_equal(t.zero_points, zp)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_unpack_gives_the_weight_onnxruntime_computes_with(bits, sym):
    """What MatMulNBits computes with, recovered from its packed inputs: x @ unpacked equals the node's
    output on ONNX Runtime (K not a multiple of the block: the padding is cut)."""
    import onnx
    from onnx import TensorProto, helper

    from qcompiler.runtime.session import make_session

    rng = np.random.default_rng(bits + 10 * sym)
    k, n, bs = 100, 24, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    qw = quantize(w, bits, bs, sym)
    t = pack_matmulnbits(qw)
    got = unpack_matmulnbits(t.b, t.scales, t.zero_points, t.bits, t.block_size, k, n)
    assert got.shape == (k, n) and np.allclose(got, qw.dequantize(), atol=0)
    inits = [onnx.numpy_helper.from_array(t.b, "B"), onnx.numpy_helper.from_array(t.scales.reshape(-1), "S")]
    ins = ["x", "B", "S"]
    if t.zero_points is not None:
        inits.append(onnx.numpy_helper.from_array(t.zero_points.reshape(-1), "Z"))
        ins.append("Z")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=k, N=n, bits=t.bits,
                            block_size=bs, accuracy_level=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits)
    m = helper.make_model(g, ir_version=9,
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = make_session(m).run(None, {"x": x})[0]
    assert np.allclose(y, x @ got, rtol=1e-4, atol=1e-4)


def test_three_bit_uses_four_bit_container():
    w = np.random.default_rng(3).standard_normal((64, 8)).astype(np.float32)
    for sym in (False, True):
        qw = quantize(w, 3, 32, sym)
        t = pack_matmulnbits(qw)
        assert t.bits == 4
        codes = unpack_along_last(t.b, 4, 32).reshape(8, 64).T
        if sym:  # shifted to the container's implicit zero point 8
            assert t.zero_points is None
            assert np.array_equal(codes.astype(int) - 8, qw.codes.astype(int) - 4)
        else:
            assert np.array_equal(codes, qw.codes)
            assert codes.max() <= 7


def test_per_channel_widens_to_one_power_of_two_block():
    w = np.random.default_rng(4).standard_normal((100, 8)).astype(np.float32)
    qw = quantize(w, 4, 0, False)
    assert nbits_block_size(qw) == 128
    t = pack_matmulnbits(qw)
    assert t.b.shape == (8, 1, 64) and t.scales.shape == (8, 1)


def test_qdq_symmetric_codes_are_signed():
    w = np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32)
    q = pack_qdq(quantize(w, 4, 32, True))
    assert q.signed and q.zero_points is None and q.codes.min() >= -8 and q.codes.max() <= 7
    q8 = pack_qdq(quantize(w, 8, 32, False))
    assert not q8.signed and q8.bits == 8 and q8.zero_points.shape == (2, 8)
