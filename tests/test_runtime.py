import numpy as np
import pytest

from qcompiler.runtime.evaluate import fidelity, perplexity, spearman, token_windows
from qcompiler.runtime.inputs import sample_inputs, vocab_size
from qcompiler.runtime.session import SessionOptions, make_session
from qcompiler.runtime.text import paragraphs
from qcompiler.runtime.validate import compare, validate
from tests.graphs import mixed_model, shared_weight_model


def test_session_falls_back_to_cpu_and_reports_it():
    sess = make_session(mixed_model(), SessionOptions(device="auto"))
    assert sess.get_providers()[0] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert make_session(mixed_model(), SessionOptions(device="cpu")).get_providers() == ["CPUExecutionProvider"]


def test_sample_inputs_follow_the_signature():
    feeds = sample_inputs(shared_weight_model(), batch=3, seq=9)
    assert feeds["ids"].shape == (3, 9) and feeds["ids"].dtype == np.int64
    assert feeds["ids"].max() < 50 == vocab_size(shared_weight_model(), "ids")
    x = sample_inputs(mixed_model())["x"]
    assert x.shape == (2, 16, 64) and x.dtype == np.float32


def test_compare_and_validate_identity():
    a = np.arange(10, dtype=np.float32)
    e = compare(a, a, "a")
    assert e.rel_error == 0 and e.max_abs == 0 and e.cosine == pytest.approx(1.0)
    res = validate(mixed_model(), mixed_model())
    assert res.max_rel_error == 0 and res.min_cosine == pytest.approx(1.0)
    e2 = compare(a * 1.1, a)
    assert e2.rel_error == pytest.approx(0.1, rel=1e-5)


def test_fidelity_metrics():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 16))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    same = fidelity(ref, ref)
    assert same.mean_cosine == pytest.approx(1.0) and same.spearman == pytest.approx(1.0)
    assert same.nn_agreement == 1.0
    noisy = ref + 0.3 * rng.standard_normal(ref.shape)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    f = fidelity(noisy, ref)
    assert 0.5 < f.mean_cosine < 0.99 and f.min_cosine < f.mean_cosine and f.spearman < 1.0
    assert spearman(np.arange(10.0), -np.arange(10.0)) == pytest.approx(-1.0)


def test_paragraphs_are_prose_and_evenly_spread():
    prose = "The quick brown fox jumps over the lazy dog again and again. " * 5
    text = "\n\n".join([prose + str(i) for i in range(50)] + ["│ ─ ┼ │" * 60, "short"])
    paras = paragraphs(text, count=10)
    assert len(paras) == 10 and paras[0].endswith("0") and paras[1].endswith("5")
    assert all("│" not in p for p in paras)


def test_perplexity_of_a_tiny_lm(tmp_path, minilm_dir, cache_dir):
    """A random tiny Llama with MiniLM's vocabulary: perplexity is finite and near the vocab size."""
    import torch
    import transformers as tf

    from qcompiler.frontends import load_model

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=30522, architectures=["LlamaForCausalLM"])
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "lm")
    model = load_model(str(tmp_path / "lm"), cache_dir=cache_dir).model
    text = " ".join(["hackers write programs and the jargon file describes their words"] * 60)
    windows = token_windows(str(minilm_dir), text, windows=2, length=64)
    assert windows.shape == (2, 64)
    res = perplexity(model, windows)
    assert res.tokens == 126 and np.isfinite(res.perplexity)
    assert 1000 < res.perplexity < 100000  # untrained: about uniform over 30522 tokens
    with pytest.raises(ValueError):
        token_windows(str(minilm_dir), "too short", windows=2, length=64)
