"""End to end on tiny random models of every family: HF folder -> dynamo export -> quantized ONNX
that a separate interpreter with plain onnxruntime loads and runs."""

import numpy as np
import pytest

from qcompiler.config import CompileConfig, MatchConfig, QuantConfig
from qcompiler.pipeline import compile_model
from qcompiler.runtime.inputs import sample_inputs
from tests.conftest import FAMILIES, run_plain_onnxruntime

# sites per tiny 2-layer model: (q,k,v,o,up,down[,gate]) x 2; GPT-2 has fused c_attn
EXPECTED_SITES = {"gpt2": 8, "llama": 14, "qwen2": 14, "gemma2": 14, "bert": 12}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_family_compiles_and_runs_in_plain_onnxruntime(family, fmt, tiny_checkpoints, cache_dir, tmp_path):
    out = tmp_path / f"{family}.onnx"
    cfg = CompileConfig(quant=QuantConfig(4, 32, False), format=fmt)
    result = compile_model(str(tiny_checkpoints[family]), out, cfg, cache_dir=cache_dir)
    assert out.is_file()
    assert len(result.plan.sites) == EXPECTED_SITES[family]
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
    src = str(tiny_checkpoints["llama"])
    base = compile_model(src, None, CompileConfig(), cache_dir=cache_dir)
    head = compile_model(src, None, CompileConfig(match=MatchConfig(quantize_lm_head=True)), cache_dir=cache_dir)
    assert len(head.plan.sites) == len(base.plan.sites) + 1
    assert [s for s in head.plan.sites if s.site.role == "head"]
    assert any("head" in r.reason for r in base.match.rejected)


def test_tied_head_is_reported_not_duplicated(tiny_checkpoints, cache_dir):
    result = compile_model(str(tiny_checkpoints["gpt2"]), None, CompileConfig(), cache_dir=cache_dir)
    reasons = " ".join(r.reason for r in result.match.rejected)
    assert "tied" in reasons or "head" in reasons
