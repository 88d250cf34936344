"""End to end on tiny random models of every family: HF folder -> dynamo export -> quantized ONNX
that a separate interpreter with plain onnxruntime loads and runs."""

import dataclasses

import numpy as np
import pytest

from qcompiler.config import CompileConfig, MatchConfig, QuantConfig
from qcompiler.pipeline import compile_model
from qcompiler.runtime.inputs import sample_inputs
from tests.conftest import FAMILIES, run_plain_onnxruntime

# sites per tiny 2-layer model: (q,k,v,o,up,down[,gate]) x 2; GPT-2 has fused c_attn; the causal LMs (KV-cache
# decoders) also their output head, on its own 8-bit grid by default (qdq; MatMulNBits only at accuracy level 4,
# and these compile at level 1)
EXPECTED_SITES = {"gpt2": 9, "llama": 15, "qwen2": 15, "gemma2": 15, "gemma3": 15, "bert": 12}
HEADS = {"gpt2": 1, "llama": 1, "qwen2": 1, "gemma2": 1, "gemma3": 1, "bert": 0}
# embedding tables a KV-cache decoder quantizes by default with --format matmulnbits: none where a table is tied to
# the head, which stays float at the default --accuracy-level 1 (GPT-2's positions stay float with its tokens)
TABLES = {"gpt2": 0, "llama": 1, "qwen2": 1, "gemma2": 0, "gemma3": 0, "bert": 0}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_family_compiles_and_runs_in_plain_onnxruntime(family, fmt, tiny_checkpoints, cache_dir, tmp_path):
    out = tmp_path / f"{family}.onnx"
    cfg = CompileConfig(quant=QuantConfig(4, 32, False), format=fmt)
    result = compile_model(str(tiny_checkpoints[family]), out, cfg, cache_dir=cache_dir)
    assert out.is_file()
    mnb = fmt == "matmulnbits"
    assert len(result.plan.sites) == EXPECTED_SITES[family] - (HEADS[family] - TABLES[family] if mnb else 0)
    # tiny random models have small, noisy weights: the budget is loose but not vacuous
    assert result.validation.max_rel_error < 0.25, result.validation
    assert result.validation.min_cosine > 0.97
    assert result.size_after < result.size_before
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, **sample_inputs(result.model, batch=1, seq=7))
    proc = run_plain_onnxruntime(out, feeds)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")


def test_lm_head_switch(tiny_checkpoints, cache_dir):
    """A KV-cache decoder's head is quantized on its own 8-bit grid by default at accuracy level 4 (it is read
    every token) and kept float below it (an 8-bit MatMulNBits is slow there), unless asked or 4-bit; off with
    quantize_lm_head=False; a scoring graph without a cache keeps it float unless asked; head_bits=None puts it
    on --bits' grid."""
    src = str(tiny_checkpoints["llama"])
    base = compile_model(src, None, CompileConfig(accuracy_level=4), cache_dir=cache_dir)
    (head,) = [s for s in base.plan.sites if s.site.role == "head"]
    assert (head.weight.bits, head.weight.block_size, head.weight.symmetric) == (8, 32, False)
    level1 = compile_model(src, None, CompileConfig(), cache_dir=cache_dir)
    assert len(level1.plan.sites) == len(base.plan.sites) - 1
    assert any("slow at --accuracy-level 1" in r.reason for r in level1.match.rejected)
    asked = compile_model(src, None, CompileConfig(match=MatchConfig(quantize_lm_head=True)), cache_dir=cache_dir)
    assert [s.weight.bits for s in asked.plan.sites if s.site.role == "head"] == [8]
    four_bit = compile_model(src, None, CompileConfig(match=MatchConfig(head_bits=4)), cache_dir=cache_dir)
    assert [s.weight.bits for s in four_bit.plan.sites if s.site.role == "head"] == [4]  # fast at any level
    off = compile_model(src, None, CompileConfig(accuracy_level=4, match=MatchConfig(quantize_lm_head=False)),
                        cache_dir=cache_dir)
    assert len(off.plan.sites) == len(base.plan.sites) - 1
    assert any("--no-quantize-lm-head" in r.reason for r in off.match.rejected)
    scoring = compile_model(src, None, CompileConfig(kv_cache=False), cache_dir=cache_dir)
    assert not [s for s in scoring.plan.sites if s.site.role == "head"]
    assert any("not a KV-cache decoder" in r.reason for r in scoring.match.rejected)
    four = compile_model(src, None, CompileConfig(match=MatchConfig(head_bits=None)), cache_dir=cache_dir)
    assert [s.weight.bits for s in four.plan.sites if s.site.role == "head"] == [4]


def test_tied_head_is_reported_not_duplicated(tiny_checkpoints, cache_dir):
    cfg = CompileConfig(match=MatchConfig(quantize_lm_head=False))
    result = compile_model(str(tiny_checkpoints["gpt2"]), None, cfg, cache_dir=cache_dir)
    reasons = " ".join(r.reason for r in result.match.rejected)
    assert "tied" in reasons or "head" in reasons


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # RMSNorm and LayerNorm before the head
def test_a_4bit_head_is_balanced_by_scales_folded_into_the_norm_before_it(family, tiny_checkpoints, cache_dir,
                                                                           tmp_path):
    """``--head-bits 4 --head-group-size 16 --head-asym``: the head on its own grid, balanced by SINQ's scales
    (kept only where they lower its error); on RMSNorm/LayerNorm models the input scale sits in the final norm's
    gain (no node). With float weights the scaled model computes what the model did, through the cache."""
    import torch
    from transformers import AutoModelForCausalLM

    from qcompiler.passes.online_transform import online_ops
    from tests.helpers import outputs, rel

    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoints[family]), dtype=torch.float32)
    with torch.no_grad():  # input channels of unequal size (a trained head's are; a random one's are not)
        head = model.get_output_embeddings().weight
        head.mul_(torch.exp(torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))))
    src = str(tmp_path / family)
    model.save_pretrained(src)
    match = MatchConfig(quantize_lm_head=True, head_bits=4, head_group_size=16, head_symmetric=False)
    res = compile_model(src, None, CompileConfig(match=match), cache_dir=cache_dir)
    heads = [s for s in res.plan.sites if s.site.role == "head"]
    if not heads:
        pytest.skip(f"{family}: its head is tied and not offered")
    (head,) = heads
    assert (head.weight.bits, head.weight.block_size, head.weight.symmetric) == (4, 16, False)
    plain = compile_model(src, None, CompileConfig(match=dataclasses.replace(match, head_scales=False)),
                          cache_dir=cache_dir)
    (plain_head,) = [s for s in plain.plan.sites if s.site.role == "head"]
    scales = [t for t in res.plan.online if head.site.id in t.sites]
    assert not [t for t in plain.plan.online if head.site.id in t.sites]
    assert len(scales) == 1 and scales[0].blocks.shape[1:] == (1, 1)
    assert head.stats.rel_error < plain_head.stats.rel_error
    assert online_ops(res.model) == 0  # absorbed into the final norm's gain
    exact = compile_model(src, None, CompileConfig(match=match, quantize_weights=False, validate=False),
                          cache_dir=cache_dir)
    from qcompiler.frontends import load_model

    original = load_model(src, cache_dir=cache_dir)
    assert [t for t in exact.plan.online if head.site.id in t.sites]
    feeds = sample_inputs(exact.model, batch=2, seq=9)
    ref, got = outputs(original.model, feeds), outputs(exact.model, feeds)
    assert max(rel(got[k], ref[k]) for k in ref) <= 1e-4
