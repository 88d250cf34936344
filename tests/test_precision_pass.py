"""PrecisionPass three ways (structure, ONNX checker, ONNX Runtime CPU against the float32 model before the
pass), on a tiny Llama KV-cache graph (prefill and a decode step) and a tiny BERT; ``--dtype float16`` end to
end through the command line; bfloat16's refusal on the CPU.

Budget: relative output error of the float16 model against the float32 one <= 2e-3 on ONNX Runtime CPU
(measured 3.6e-4 BERT ... 9.4e-4 Gemma2). ONNX Runtime's CPU provider runs most float16 ops through
float32 kernels between Casts it inserts, so ``fp16_storage`` (tools/fp16_check.py) also emulates what a
GPU's fp16 kernels compute (every fp16 tensor rounded to fp16, each op in fp32): <= 3e-3 there (measured
<= 1.4e-3). In that emulation the float32 islands matter: a residual stream past |x| = 256 breaks RMSNorm
without them (rel. error 0.69 against 4.6e-4), and rotary angles at position 3000 lose 12x more without them.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from qcompiler.cli import main
from qcompiler.cli.compile import default_output
from qcompiler.config import CompileConfig, MatchConfig, QuantConfig
from qcompiler.emit import emit_model
from qcompiler.errors import ConfigError
from qcompiler.frontends import load_model
from qcompiler.graphio import import_graph
from qcompiler.match.sites import find_linear_sites, site_weight
from qcompiler.methods.rtn import plan_rtn
from qcompiler.passes import MatMulNBitsPass, PassManager, PrecisionPass, QDQPass
from qcompiler.runtime.generate import generate
from qcompiler.runtime.inputs import sample_inputs
from tests.graphs import mixed_model
from tests.helpers import EXACT, outputs, rel
from tools.fp16_check import fp16_storage

BUDGET = 2e-3  # fp16 model vs fp32 model, ONNX Runtime CPU
EMULATED_BUDGET = 3e-3  # the same with every fp16 tensor rounded (GPU-like)
F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def convert(model: onnx.ModelProto, dtype: str = "float16", keep_fp32: bool = True):
    graph = import_graph(model)
    p = PrecisionPass(dtype, keep_fp32=keep_fp32)
    result = PassManager([p])(graph)
    return p, result, emit_model(result.graph, model, {})


def _types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def assert_only_islands_in_float32(model: onnx.ModelProto, kept: tuple[str, ...]) -> None:
    """Every float32 tensor is read or written by a node kept on purpose (or by a Cast at an island's edge)."""
    types, kept = _types(model), set(kept)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    for n in model.graph.node:
        if n.name in kept:
            continue
        to = next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None
        if to == F32:  # widening into an island
            assert all(c.name in kept for c in consumers[n.output[0]]), n.name
            continue
        if to == F16 and types.get(n.input[0]) == F32:  # narrowing out of one
            assert producer[n.input[0]].name in kept, n.name
            continue
        float32 = [t for t in [*n.input, *n.output] if types.get(t) == F32]
        assert not float32, f"{n.name} ({n.op_type}) has float32 tensors {float32}"
    for v in [*model.graph.input, *model.graph.output]:
        assert v.type.tensor_type.elem_type != F32, v.name


@pytest.fixture(scope="module")
def llama(tiny_checkpoints, cache_dir):
    return load_model(str(tiny_checkpoints["llama"]), cache_dir=cache_dir).model


@pytest.fixture(scope="module")
def bert(tiny_checkpoints, cache_dir):
    return load_model(str(tiny_checkpoints["bert"]), cache_dir=cache_dir).model


def _real(y: np.ndarray, feeds: dict) -> np.ndarray:
    """The values at real (unpadded) positions: logits [batch, seq, vocab] or a cache [batch, heads, seq, dim].
    Padded positions' outputs mean nothing, and differ: the fp32 mask fill -3.4e38 is -65504 in fp16."""
    mask = feeds["attention_mask"].astype(bool)
    if y.ndim == 3:
        return y[mask[:, -y.shape[1]:]]
    return np.concatenate([y[b][:, mask[b, -y.shape[2]:]].ravel() for b in range(len(y))])


def _decode_feeds(prefill: dict, present: dict, batch: int) -> dict:
    mask = np.concatenate([prefill["attention_mask"], np.ones((batch, 1), np.int64)], axis=1)
    feeds = {"input_ids": np.full((batch, 1), 7, np.int64), "attention_mask": mask}
    feeds.update({k.replace("present.", "past_key_values."): v for k, v in present.items() if k.startswith("present.")})
    return feeds


def test_llama_kv_cache_graph_three_ways(llama):
    before = llama.SerializeToString()
    p, result, out = convert(llama)
    assert llama.SerializeToString() == before

    # structure: the KV cache and logits in fp16; RMSNorm statistics and the rotary angles kept in fp32
    assert result.modified
    types = _types(out)
    assert {v.name: types[v.name] for v in out.graph.input} == {
        "input_ids": TensorProto.INT64, "attention_mask": TensorProto.INT64,
        **{v.name: F16 for v in out.graph.input if v.name.startswith("past_key_values.")}}
    assert all(v.type.tensor_type.elem_type == F16 for v in out.graph.output)
    ops = {n.name: n.op_type for n in out.graph.node}
    kept = collections.Counter(ops[name] for name in p.kept)
    norms = 2 * 2 + 1  # two per layer and the final one
    assert kept == {"Pow": norms, "ReduceMean": norms, "Add": norms, "Sqrt": norms, "Reciprocal": norms,
                    "Cast": 1, "Mul": 1, "Concat": 1, "Cos": 1, "Sin": 1}
    assert p.casts == 2 * norms + 2  # into and out of each norm; Cos and Sin out
    assert_only_islands_in_float32(out, p.kept)
    init = {t.name: t for t in out.graph.initializer}
    eps = [init[n.input[1]] for n in out.graph.node if n.name in p.kept and n.op_type == "Add"]
    assert all(t.data_type == F32 for t in eps)  # 1e-6 stays exact

    # checker
    onnx.checker.check_model(out, full_check=True)

    # numeric: a left-padded prefill, then a decode step from each model's own cache
    feeds = sample_inputs(llama, batch=2, seq=12)
    feeds["attention_mask"][1, :3] = 0
    feeds["attention_mask"][1, 3:] = 1
    ref, got = outputs(llama, feeds), outputs(out, feeds)
    assert got["logits"].dtype == np.float16 and got["present.0.key"].dtype == np.float16
    for name in ref:
        assert rel(_real(got[name], feeds), _real(ref[name], feeds)) < BUDGET, name
    decode = _decode_feeds(feeds, ref, 2)
    ref2, got2 = outputs(llama, decode), outputs(out, _decode_feeds(feeds, got, 2))
    for name in ref2:
        assert rel(_real(got2[name], decode), _real(ref2[name], decode)) < BUDGET, name
    emulated = outputs(fp16_storage(out), feeds)
    assert rel(emulated["logits"], ref["logits"]) < EMULATED_BUDGET


def test_bert_three_ways(bert):
    p, result, out = convert(bert)
    assert result.modified and p.kept == () and p.casts == 0  # LayerNormalization: no norm statistics to keep
    types = _types(out)
    assert F32 not in types.values()
    assert [v.type.tensor_type.elem_type for v in out.graph.output] == [F16]
    onnx.checker.check_model(out, full_check=True)
    feeds = sample_inputs(bert, batch=2, seq=16)
    ref, got = outputs(bert, feeds), outputs(out, feeds)
    assert rel(got["last_hidden_state"], ref["last_hidden_state"]) < BUDGET
    assert rel(outputs(fp16_storage(out), feeds)["last_hidden_state"], ref["last_hidden_state"]) < EMULATED_BUDGET


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt2"])
def test_other_families_within_budget(family, tiny_checkpoints, cache_dir):
    model = load_model(str(tiny_checkpoints[family]), cache_dir=cache_dir).model
    p, _, out = convert(model)
    assert_only_islands_in_float32(out, p.kept)
    feeds = sample_inputs(model, batch=2, seq=12)
    ref, got = outputs(model, feeds), outputs(out, feeds)
    for name in ref:
        assert rel(got[name], ref[name]) < BUDGET, name


def _scaled_embedding(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    table = next(t for t in m.graph.initializer if "embed_tokens" in t.name)
    table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table) * np.float32(factor), table.name))
    return m


def test_islands_keep_large_activations_and_long_positions(llama):
    """What the fp32 islands buy, in the GPU-like emulation (ONNX Runtime CPU hides both failures)."""
    big = _scaled_embedding(llama, 5000.0)  # the residual stream reaches |x| ~ 425: x^2 overflows fp16
    feeds = sample_inputs(big, batch=2, seq=12)
    ref = outputs(big, feeds)["logits"]
    kept = outputs(fp16_storage(convert(big)[2]), feeds)["logits"]
    plain = outputs(fp16_storage(convert(big, keep_fp32=False)[2]), feeds)["logits"]
    assert rel(kept, ref) < EMULATED_BUDGET
    assert not np.isfinite(plain).all() or rel(plain, ref) > 0.1

    past = 3000  # positions past 2048: fp16 no longer holds them exactly
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[5, 6, 7, 8]]), "attention_mask": np.ones((1, past + 4), np.int64)}
    feeds.update({v.name: rng.standard_normal((1, 2, past, 16)).astype(np.float32)
                  for v in llama.graph.input if v.name.startswith("past_key_values.")})
    ref = outputs(llama, feeds)["logits"]
    kept = rel(outputs(fp16_storage(convert(llama)[2]), feeds)["logits"], ref)
    plain = rel(outputs(fp16_storage(convert(llama, keep_fp32=False)[2]), feeds)["logits"], ref)
    assert kept < EMULATED_BUDGET and plain > 3 * kept


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_quantized_graph_scales_follow(fmt):
    model = mixed_model()
    graph = import_graph(model)
    plan = plan_rtn(find_linear_sites(graph, MatchConfig()).sites, lambda s: site_weight(graph, s), QuantConfig(4, 32))
    quantize = MatMulNBitsPass(plan) if fmt == "matmulnbits" else QDQPass(plan)
    quantized = emit_model(PassManager([quantize])(graph).graph, model, {})
    p, _, out = convert(quantized)
    scales = [t for t in out.graph.initializer if t.name.endswith("_scales")]
    assert len(scales) == 3 and all(t.data_type == F16 for t in scales)
    assert_only_islands_in_float32(out, p.kept)
    onnx.checker.check_model(out)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)}
    ref, got = outputs(quantized, feeds), outputs(out, feeds)
    for name in ref:
        assert rel(got[name], ref[name]) < BUDGET, name


def test_a_float16_graph_is_left_alone():
    model = mixed_model(dtype=np.float16)
    graph = import_graph(model)
    before = emit_model(graph, model, {}).SerializeToString()
    result = PrecisionPass("float16")(graph)
    assert not result.modified
    assert emit_model(result.graph, model, {}).SerializeToString() == before


def test_constants_are_clipped_not_overflowed():
    from qcompiler.passes.precision import convert_values

    v = convert_values(np.array([-3.4028235e38, 1e-9, -1e-9, 0.0, np.inf, 1.5], np.float32), np.dtype(np.float16))
    assert v.dtype == np.float16 and v[0] == -65504 and v[1] > 0 > v[2] and v[3] == 0 and np.isinf(v[4])
    assert v[5] == 1.5


def test_bfloat16_graph_is_valid_but_not_run_on_cpu(llama):
    p, _, out = convert(llama, "bfloat16")
    onnx.checker.check_model(out, full_check=True)
    assert all(v.type.tensor_type.elem_type == TensorProto.BFLOAT16 for v in out.graph.output)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):  # ONNX Runtime CPU: no bfloat16 Add/Mul/MatMul
        ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])


def test_dtype_config_refusals():
    with pytest.raises(ConfigError, match="CPU provider has no bfloat16 kernels"):
        CompileConfig(dtype="bfloat16")
    CompileConfig(dtype="bfloat16", validate=False)  # written for a GPU, not run here
    with pytest.raises(ConfigError, match="streamed"):
        CompileConfig(dtype="float16", stream=True)
    with pytest.raises(ConfigError, match="dtype"):
        CompileConfig(dtype="float8")
    assert default_output("m.onnx", "rtn", QuantConfig(), "float16") == "m.rtn-w4-b32-asym-fp16.onnx"


def test_compile_float16_from_the_command_line(tiny_checkpoints, cache_dir, tmp_path, capsys):
    folder = str(tiny_checkpoints["llama"])
    out16, out32 = tmp_path / "fp16.onnx", tmp_path / "fp32.onnx"
    common = ["--method", "rtn", "--cache-dir", str(cache_dir), "-q"]
    assert main(["compile", folder, "--dtype", "float16", "-o", str(out16), *common]) == 0
    assert main(["compile", folder, "-o", str(out32), *common]) == 0
    model = onnx.load(out16)
    assert {p.key: p.value for p in model.metadata_props}["qcompiler.dtype"] == "float16"
    assert all(v.type.tensor_type.elem_type == F16 for v in model.graph.output)
    assert out16.stat().st_size < 0.75 * out32.stat().st_size  # float weights (embedding, head) halved too
    original = load_model(folder, cache_dir=cache_dir).model
    feeds = sample_inputs(original, batch=2, seq=12)
    ref, q32, q16 = outputs(original, feeds), outputs(onnx.load(out32), feeds), outputs(model, feeds)
    assert rel(q16["logits"], q32["logits"]) < BUDGET  # fp16 adds little to 4-bit rounding's own error
    assert abs(rel(q16["logits"], ref["logits"]) - rel(q32["logits"], ref["logits"])) < BUDGET
    result = generate(str(out16), [5, 6, 7, 8], max_new_tokens=6, eos_token_id=(), options=EXACT)
    assert result.tokens.shape == (1, 6)

    assert main(["compile", folder, "--dtype", "bfloat16", "-o", str(tmp_path / "bf16.onnx"), *common]) != 0
    assert "no bfloat16 kernels" in capsys.readouterr().err
