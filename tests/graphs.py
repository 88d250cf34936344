"""Small hand-built ONNX graphs covering every weight form the matcher knows."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def mixed_model(seed: int = 0, k: int = 64, dtype=np.float32) -> onnx.ModelProto:
    """x[B,S,K] -> MatMul(W1)+b1 -> Relu -> MatMul(Transpose(W2t)) -> Reshape 2-D -> Gemm(W3, b3, transB)
    -> Relu -> y; plus a run-time "weight" MatMul (x x^T) -> z, and a head MatMul on a graph output."""
    rng = np.random.default_rng(seed)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    w1 = rng.standard_normal((k, 96)).astype(dtype) * dtype(0.2)
    b1 = rng.standard_normal(96).astype(dtype) * dtype(0.1)
    w2t = rng.standard_normal((k, 96)).astype(dtype) * dtype(0.2)  # W2 = w2t.T : [96, K]
    w3 = rng.standard_normal((48, k)).astype(dtype) * dtype(0.2)  # Gemm transB: W = w3.T : [K, 48]
    b3 = rng.standard_normal(48).astype(dtype) * dtype(0.1)
    wh = rng.standard_normal((48, 40)).astype(dtype) * dtype(0.2)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Transpose", ["W2t"], ["W2"], name="tr2", perm=[1, 0]),
        helper.make_node("MatMul", ["r1", "W2"], ["m2"], name="mm2"),
        helper.make_node("Reshape", ["m2", "shape2d"], ["m2_2d"], name="rs"),
        helper.make_node("Gemm", ["m2_2d", "W3", "b3"], ["g3"], name="gemm3", transB=1),
        helper.make_node("Relu", ["g3"], ["y"], name="relu3"),
        helper.make_node("Transpose", ["x"], ["xt"], name="trx", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xt"], ["z"], name="mm_dyn"),
        helper.make_node("MatMul", ["y", "Wh"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("x", elem, ["B", "S", k])],
        [helper.make_tensor_value_info("y", elem, ["M", 48]), helper.make_tensor_value_info("z", elem, ["B", "S", "S"]),
         helper.make_tensor_value_info("logits", elem, ["M", 40])],
        [_init("W1", w1), _init("b1", b1), _init("W2t", w2t), _init("W3", w3), _init("b3", b3),
         _init("Wh", wh), _init("shape2d", np.array([-1, k], dtype=np.int64))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def shared_weight_model() -> onnx.ModelProto:
    """Two MatMuls reading one initializer, and a Gather over a table."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    table = rng.standard_normal((50, 32)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "W"], ["h1"], name="mmA"),
        helper.make_node("MatMul", ["h1", "W"], ["h2"], name="mmB"),
        helper.make_node("Relu", ["h2"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 32])],
        [_init("W", w), _init("table", table)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def conv_model() -> onnx.ModelProto:
    """A ViT-like stem: x[B,3,8,8] -> Conv(Wc, patch 4) -> Reshape [B, 16, 4] -> MatMul(Wp) -> y, plus a
    ConvTranspose head with a constant weight (-> up) and an Einsum between activations (no weight)."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["x", "Wc", "bc"], ["patches"], name="patch_embed", kernel_shape=[4, 4],
                         strides=[4, 4]),
        helper.make_node("Reshape", ["patches", "shape3d"], ["tokens"], name="rs"),
        helper.make_node("MatMul", ["tokens", "Wp"], ["y"], name="proj"),
        helper.make_node("ConvTranspose", ["patches", "Wt"], ["up"], name="deconv", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Einsum", ["tokens", "tokens"], ["gram"], name="gram", equation="bij,bkj->bik"),
    ]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 16, 32]),
         helper.make_tensor_value_info("up", TensorProto.FLOAT, ["B", 2, 4, 4]),
         helper.make_tensor_value_info("gram", TensorProto.FLOAT, ["B", 16, 16])],
        [_init("Wc", rng.standard_normal((16, 3, 4, 4)).astype(np.float32)),
         _init("bc", np.zeros(16, np.float32)), _init("shape3d", np.array([0, 16, 4], dtype=np.int64)),
         _init("Wp", rng.standard_normal((4, 32)).astype(np.float32)),
         _init("Wt", rng.standard_normal((16, 2, 2, 2)).astype(np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(model)
    return model
