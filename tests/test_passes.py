"""Every pass three ways: structure, ONNX checker, numeric equivalence on ONNX Runtime."""

import collections

import numpy as np
import onnx
import pytest

from qcompiler.config import MatchConfig, QuantConfig
from qcompiler.emit import emit_model
from qcompiler.graphio import import_graph
from qcompiler.match.sites import find_linear_sites, site_weight
from qcompiler.methods.rtn import plan_rtn
from qcompiler.passes import MatMulNBitsPass, PassError, PassManager, QDQPass
from qcompiler.plan import QuantPlan
from tests.graphs import mixed_model
from tests.helpers import outputs, rel, with_dequantized_weights

FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)}
SETTINGS = [(4, 32, False), (4, 16, True), (3, 32, False), (3, 64, True), (2, 32, False), (8, 128, True),
            (4, 0, False)]
# relative output error vs the float model allowed per bit width (three chained random layers;
# measured worst cases: 8-bit 0.012, 4-bit 0.18, 3-bit 0.32, 2-bit 0.83)
BUDGET = {8: 0.02, 4: 0.25, 3: 0.45, 2: 1.0}


def _compile(model, quant, fmt):
    graph = import_graph(model)
    match = find_linear_sites(graph, MatchConfig())
    plan = plan_rtn(match.sites, lambda s: site_weight(graph, s), quant)
    p = MatMulNBitsPass(plan) if fmt == "matmulnbits" else QDQPass(plan)
    result = PassManager([p])(graph)
    return plan, result, emit_model(result.graph, model, {})


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("bits,group,sym", SETTINGS)
def test_quantizing_pass_three_ways(fmt, bits, group, sym):
    model = mixed_model()
    before = model.SerializeToString()
    plan, result, out = _compile(model, QuantConfig(bits, group, sym), fmt)
    assert model.SerializeToString() == before  # the input proto is untouched

    # structure
    assert result.modified
    ops = collections.Counter(n.op_type for n in out.graph.node)
    inits = {t.name for t in out.graph.initializer}
    if fmt == "matmulnbits":
        assert ops["MatMulNBits"] == 3
        assert ops["MatMul"] == 2  # the run-time product and the float head
        assert {"W1", "W2t", "W3"}.isdisjoint(inits)
        shapes = {t.name: list(t.dims) for t in out.graph.initializer}
        for node in (n for n in out.graph.node if n.op_type == "MatMulNBits"):
            attrs = {a.name: a.i for a in node.attribute}
            blocks = -(-attrs["K"] // attrs["block_size"])
            assert shapes[node.input[1]] == [attrs["N"], blocks, attrs["block_size"] * attrs["bits"] // 8]
            if len(node.input) > 3:  # [N, bytes], as ONNX Runtime's own quantizer writes them (test_minilm)
                assert not sym and shapes[node.input[3]] == [attrs["N"], -(-blocks * attrs["bits"] // 8)]
    else:
        assert ops["DequantizeLinear"] == 3 and ops["MatMul"] == 5
    assert ops["Gemm"] == 0 and ops["Transpose"] == 1  # W2's Transpose is gone; x's stays
    assert "Wh" in inits  # the head stays float

    # checker
    onnx.checker.check_model(out, full_check=False)

    # numeric: equal to the pre-pass model carrying W_hat, and within budget of the float one
    ref_q = outputs(with_dequantized_weights(model, plan), FEEDS)
    ref = outputs(model, FEEDS)
    got = outputs(out, FEEDS)
    for name in ref:
        np.testing.assert_allclose(got[name], ref_q[name], rtol=1e-4, atol=1e-5)
        assert rel(got[name], ref[name]) < BUDGET[bits]


def test_float16_weights_get_float16_scales():
    model = mixed_model(dtype=np.float16)
    plan, _, out = _compile(model, QuantConfig(4, 32, False), "matmulnbits")
    scales = [t for t in out.graph.initializer if t.name.endswith("_scales")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)
    feeds = {"x": FEEDS["x"].astype(np.float16)}
    got = outputs(out, feeds)["y"]
    ref = outputs(with_dequantized_weights(model, plan), feeds)["y"]
    assert rel(got, ref) < 5e-3


@pytest.mark.parametrize("pass_cls", [MatMulNBitsPass, QDQPass])
def test_empty_plan_is_a_no_op(pass_cls):
    model = mixed_model()
    graph = import_graph(model)
    n_before = len(graph.nodes)
    result = pass_cls(QuantPlan("rtn", QuantConfig(), ()))(graph)
    assert not result.modified
    assert len(result.graph.nodes) == n_before


def test_pass_manager_names_the_failing_pass():
    model = mixed_model()
    graph = import_graph(model)
    match = find_linear_sites(graph, MatchConfig())
    plan = plan_rtn(match.sites, lambda s: site_weight(graph, s), QuantConfig())
    other = import_graph(mixed_model(seed=1))
    for n in other.nodes:
        n.name = "renamed_" + n.name
    with pytest.raises(PassError, match="MatMulNBitsPass"):
        PassManager([MatMulNBitsPass(plan)])(other)


def test_emitted_opsets_and_ir_version():
    _, _, nb = _compile(mixed_model(), QuantConfig(4, 32, False), "matmulnbits")
    ops = {o.domain: o.version for o in nb.opset_import}
    assert ops["com.microsoft"] == 1 and nb.ir_version <= 10
    _, _, dq = _compile(mixed_model(), QuantConfig(4, 32, True), "qdq")
    ops = {o.domain: o.version for o in dq.opset_import}
    assert ops[""] >= 21 and dq.ir_version == 10
    assert any(t.data_type == onnx.TensorProto.INT4 for t in dq.graph.initializer)


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_k_not_a_multiple_of_the_block(fmt):
    """K = 100 with blocks of 32: MatMulNBits pads the last block, DequantizeLinear takes a short one."""
    model = mixed_model(k=100)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 100)).astype(np.float32)}
    plan, _, out = _compile(model, QuantConfig(4, 32, False), fmt)
    assert {(p.site.k, p.weight.n_blocks) for p in plan.sites} >= {(100, 4)}
    onnx.checker.check_model(out)
    got, ref_q = outputs(out, feeds), outputs(with_dequantized_weights(model, plan), feeds)
    for name in got:
        np.testing.assert_allclose(got[name], ref_q[name], rtol=1e-4, atol=1e-5)
