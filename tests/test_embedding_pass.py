"""EmbeddingPass three ways: structure, checker, numeric equivalence with the dequantized table."""

import collections
import dataclasses

import numpy as np
import onnx
import pytest

from qcompiler.config import CompileConfig, MatchConfig, QuantConfig
from qcompiler.emit import emit_model
from qcompiler.graphio import import_graph
from qcompiler.match.sites import find_linear_sites, site_weight
from qcompiler.methods.rtn import plan_rtn
from qcompiler.passes import EmbeddingPass, PassManager
from qcompiler.pipeline import compile_model
from tests.graphs import shared_weight_model
from tests.helpers import outputs, rel

FEEDS = {"ids": np.random.default_rng(0).integers(0, 50, (2, 7)).astype(np.int64)}


@pytest.mark.parametrize("bits,group,sym", [(4, 16, False), (8, 32, True), (3, 0, False)])
def test_embedding_pass_three_ways(bits, group, sym):
    model = shared_weight_model()
    graph = import_graph(model)
    match = find_linear_sites(graph, MatchConfig(quantize_embeddings=True))
    assert [s.role for s in match.sites] == ["embedding"]
    site = match.sites[0]
    assert (site.k, site.n) == (32, 50)
    plan = plan_rtn(match.sites, lambda s: site_weight(graph, s), QuantConfig(bits, group, sym))
    result = PassManager([EmbeddingPass(plan)])(graph)
    assert result.modified
    out = emit_model(result.graph, model, {})
    ops = collections.Counter(n.op_type for n in out.graph.node)
    assert ops["DequantizeLinear"] == 1 and ops["Gather"] == 1
    assert "table" not in {t.name for t in out.graph.initializer}
    onnx.checker.check_model(out)
    ref_q = onnx.ModelProto.FromString(model.SerializeToString())
    for t in ref_q.graph.initializer:
        if t.name == "table":
            t.CopyFrom(onnx.numpy_helper.from_array(plan.sites[0].weight.dequantize().T.copy(), "table"))
    np.testing.assert_allclose(outputs(out, FEEDS)["y"], outputs(ref_q, FEEDS)["y"], rtol=1e-4, atol=1e-4)
    assert rel(outputs(out, FEEDS)["y"], outputs(model, FEEDS)["y"]) < {8: 0.02, 4: 0.25, 3: 0.45}[bits]


def test_no_embedding_sites_is_a_no_op():
    graph = import_graph(shared_weight_model())
    match = find_linear_sites(graph, MatchConfig())
    plan = plan_rtn(match.sites, lambda s: site_weight(graph, s), QuantConfig())
    n = len(graph.nodes)
    assert not EmbeddingPass(plan)(graph).modified and len(graph.nodes) == n


def test_tied_embedding_model_end_to_end(tiny_checkpoints, cache_dir):
    """GPT-2 ties its head to the table: both read the dequantized table; the float table is gone."""
    cfg = CompileConfig(quant=QuantConfig(8, 32, False), match=MatchConfig(quantize_embeddings=True))
    result = compile_model(str(tiny_checkpoints["gpt2"]), None, cfg, cache_dir=cache_dir)
    roles = collections.Counter(p.site.role for p in result.plan.sites)
    assert roles["embedding"] == 2  # token and position tables
    assert result.validation.max_rel_error < 0.05
    assert result.size_after < result.size_before / 3


@pytest.mark.parametrize("bits,group,sym", [(4, 16, False), (8, 32, True), (4, 32, True)])
def test_gather_block_quantized_reads_only_the_rows(bits, group, sym):
    """gather=True: the Gather becomes GatherBlockQuantized over MatMulNBits-packed codes; no whole-table
    DequantizeLinear, no float table; ONNX Runtime gives the dequantized table's rows."""
    model = shared_weight_model()
    graph = import_graph(model)
    match = find_linear_sites(graph, MatchConfig(quantize_embeddings=True))
    plan = plan_rtn(match.sites, lambda s: site_weight(graph, s), QuantConfig(bits, group, sym))
    p = EmbeddingPass(plan, gather=True)
    assert PassManager([p])(graph).modified and p.gathers == 1
    out = emit_model(graph, model, {})
    ops = collections.Counter(n.op_type for n in out.graph.node)
    assert ops["GatherBlockQuantized"] == 1 and ops["DequantizeLinear"] == 0 and ops["Gather"] == 0
    assert "table" not in {t.name for t in out.graph.initializer}
    ref_q = onnx.ModelProto.FromString(model.SerializeToString())
    for t in ref_q.graph.initializer:
        if t.name == "table":
            t.CopyFrom(onnx.numpy_helper.from_array(plan.sites[0].weight.dequantize().T.copy(), "table"))
    np.testing.assert_allclose(outputs(out, FEEDS)["y"], outputs(ref_q, FEEDS)["y"], rtol=1e-4, atol=1e-4)


def test_gather_falls_back_to_dequantize_where_blocks_do_not_fit():
    """2-bit codes (no GatherBlockQuantized container here) keep the whole-table DequantizeLinear."""
    model = shared_weight_model()
    graph = import_graph(model)
    match = find_linear_sites(graph, MatchConfig(quantize_embeddings=True))
    plan = plan_rtn(match.sites, lambda s: site_weight(graph, s), QuantConfig(2, 16, False))
    p = EmbeddingPass(plan, gather=True)
    PassManager([p])(graph)
    ops = collections.Counter(n.op_type for n in emit_model(graph, model, {}).graph.node)
    assert p.gathers == 0 and ops["DequantizeLinear"] == 1 and ops["Gather"] == 1


def test_tied_float_head_keeps_reading_the_dequantized_table(tiny_checkpoints, cache_dir):
    """Llama ties nothing, GPT-2 ties its head: with gather=True the Gathers read rows, the float head's
    Transpose reads the dequantized table, and the model still matches within the 8-bit budget."""
    from qcompiler.frontends import load_model
    from qcompiler.passes import MatMulNBitsPass

    loaded = load_model(str(tiny_checkpoints["gpt2"]), cache_dir=cache_dir, kv_cache=False)
    model = loaded.model
    graph = import_graph(model)
    match = find_linear_sites(graph, MatchConfig(quantize_embeddings=True))
    plan = plan_rtn(match.sites, lambda s: site_weight(graph, s), QuantConfig(8, 32, True))
    p = EmbeddingPass(plan, gather=True)
    PassManager([p, MatMulNBitsPass(plan)])(graph)
    out = emit_model(graph, model, {})
    ops = collections.Counter(n.op_type for n in out.graph.node)
    assert p.gathers == 2 and ops["GatherBlockQuantized"] == 2 and ops["DequantizeLinear"] == 1
    ids = np.random.default_rng(0).integers(0, 500, (1, 9)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    assert rel(outputs(out, feeds)["logits"], outputs(model, feeds)["logits"]) < 0.05


def test_a_kv_cache_decoder_stores_its_tables_on_the_head_grid_by_default(tiny_checkpoints, cache_dir):
    """A KV-cache decoder (MatMulNBits format) quantizes its embedding table by default, rounded to nearest on
    the head's 8-bit grid, and reads it with GatherBlockQuantized: no float table is left, and the outputs
    stay within the 4-bit model's error; ``quantize_embeddings=False``, a graph without a cache, and
    ``--format qdq`` keep the float table."""
    src = str(tiny_checkpoints["llama"])
    cfg = CompileConfig(quant=QuantConfig(4, 32, True))
    on = compile_model(src, None, cfg, cache_dir=cache_dir)
    (table,) = [s for s in on.plan.sites if s.site.role == "embedding"]
    assert (table.weight.bits, table.weight.block_size, table.weight.symmetric) == (8, 32, True)
    ops = collections.Counter(n.op_type for n in on.model.graph.node)
    assert ops["GatherBlockQuantized"] == 1 and ops["Gather"] == 0
    off = compile_model(src, None, dataclasses.replace(cfg, match=MatchConfig(quantize_embeddings=False)),
                        cache_dir=cache_dir)
    assert not [s for s in off.plan.sites if s.site.role == "embedding"]
    assert on.size_after < off.size_after - 0.6 * 512 * 64 * 4  # the float table (vocab x hidden) is gone
    assert on.validation.max_rel_error < off.validation.max_rel_error + 0.01
    for other in (dataclasses.replace(cfg, kv_cache=False), dataclasses.replace(cfg, format="qdq")):
        res = compile_model(src, None, other, cache_dir=cache_dir)
        assert not [s for s in res.plan.sites if s.site.role == "embedding"]


def test_a_tied_head_and_its_table_store_their_codes_once(tiny_checkpoints, cache_dir):
    """Gemma 2 ties its head to the table: both on the head's 8-bit grid, the GatherBlockQuantized reads the
    head MatMulNBits' own codes tensor ``[V, H / block, blob]`` (one initializer), and gives exactly the rows of
    the table the plan rounded; the model stays within the 4-bit budget."""
    src = str(tiny_checkpoints["gemma2"])
    cfg = CompileConfig(quant=QuantConfig(4, 32, True), accuracy_level=4)
    res = compile_model(src, None, cfg, cache_dir=cache_dir)
    model = res.model
    (gbq,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    readers = [n for n in model.graph.node if gbq.input[0] in n.input]
    assert sorted(n.op_type for n in readers) == ["GatherBlockQuantized", "MatMulNBits"]  # one codes tensor for both
    assert "lm_head" in gbq.input[0]
    inits = {t.name: t for t in model.graph.initializer}
    assert [t.name for t in model.graph.initializer].count(gbq.input[0]) == 1
    (table,) = [p for p in res.plan.sites if p.site.role == "embedding"]
    (head_plan,) = [p for p in res.plan.sites if p.site.role == "head"]
    assert table.site.weight == head_plan.site.weight and table.weight.bits == head_plan.weight.bits == 8
    # the rows the GatherBlockQuantized (and its Reshape) give are the rounded table's
    (reshape,) = [n for n in model.graph.node if n.input and n.input[0] == gbq.output[0]]
    sub = onnx.helper.make_model(onnx.helper.make_graph(
        [gbq, reshape], "rows", [onnx.helper.make_tensor_value_info(gbq.input[1], onnx.TensorProto.INT64, ["B", "S"])],
        [onnx.helper.make_tensor_value_info(reshape.output[0], onnx.TensorProto.FLOAT, None)],
        [inits[n] for n in (*gbq.input, *reshape.input) if n in inits]), opset_imports=model.opset_import)
    sub.ir_version = model.ir_version
    ids = np.array([[0, 5, 511, 7]], dtype=np.int64)
    got = outputs(sub, {gbq.input[1]: ids})[reshape.output[0]]
    np.testing.assert_allclose(got[0], table.weight.dequantize().T[ids[0]], rtol=1e-6, atol=1e-6)
    assert res.validation.max_rel_error < 0.3


def test_a_tied_head_kept_float_keeps_its_table_float_by_default(tiny_checkpoints, cache_dir):
    """At ``--accuracy-level 1`` an 8-bit head stays float; a table tied to it stays float too by default, so
    the head reads the one float table rather than a whole-table DequantizeLinear on every token step (what
    a quantized table gave it); ``--quantize-embeddings`` still quantizes it."""
    src = str(tiny_checkpoints["gemma2"])
    cfg = CompileConfig(quant=QuantConfig(4, 32, True))
    res = compile_model(src, None, cfg, cache_dir=cache_dir)
    ops = collections.Counter(n.op_type for n in res.model.graph.node)
    assert not [s for s in res.plan.sites if s.site.role in ("embedding", "head")]
    assert ops["DequantizeLinear"] == 0 and ops["GatherBlockQuantized"] == 0 and ops["Gather"] >= 1
    forced = compile_model(src, None, dataclasses.replace(cfg, match=MatchConfig(quantize_embeddings=True)),
                           cache_dir=cache_dir)
    assert [s for s in forced.plan.sites if s.site.role == "embedding"]
