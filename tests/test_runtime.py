import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.errors import QCompilerError
from qcompiler.runtime.evaluate import (
    embedding_fidelity,
    fidelity,
    perplexity,
    pooled_embeddings,
    spearman,
    token_windows,
)
from qcompiler.runtime.inputs import sample_inputs, vocab_size
from qcompiler.runtime.session import SessionOptions, make_session
from qcompiler.runtime.text import JARGON_FILE, paragraphs
from qcompiler.runtime.text_inputs import SampleInputs, real_sample_inputs, validation_inputs
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


def _passthrough_encoder(vocab: int = 30522, hidden: int = 4, with_hidden: bool = True,
                         hidden_name: str = "last_hidden_state") -> onnx.ModelProto:
    """A sentence encoder we did not export: output 0 is the int64 ``input_ids`` passed through, then a
    pooled [B, H] float, then (``with_hidden``) the [B, S, H] hidden states (an embedding lookup)."""
    table = np.random.default_rng(0).standard_normal((vocab, hidden)).astype(np.float32)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])
    nodes = [helper.make_node("Identity", ["input_ids"], ["ids_out"]),
             helper.make_node("Gather", ["E", "input_ids"], ["h"]),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
             helper.make_node("Mul", ["h", "mask3"], [hidden_name] if with_hidden else ["hm"]),
             helper.make_node("ReduceMean", [hidden_name if with_hidden else "hm", "axis1"], ["pooled"], keepdims=0)]
    outputs = [helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["B", "S"]),
               helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["B", hidden])]
    if with_hidden:
        outputs.append(helper.make_tensor_value_info(hidden_name, TensorProto.FLOAT, ["B", "S", hidden]))
    graph = helper.make_graph(nodes, "enc", [ids, mask], outputs,
                              [numpy_helper.from_array(table, "E"),
                               numpy_helper.from_array(np.array([2], np.int64), "axis2"),
                               numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("hidden_name", ["last_hidden_state", "h2"])
def test_pooling_reads_the_hidden_state_not_output_0(hidden_name):
    model = _passthrough_encoder(vocab=50, hidden_name=hidden_name)
    table = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    ids = np.array([[1, 2, 3, 0], [4, 5, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.int64)
    emb = pooled_embeddings(model, [{"input_ids": ids, "attention_mask": mask}])
    want = np.stack([table[ids[i, :mask[i].sum()]].mean(0) for i in range(2)])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, want, rtol=1e-5)


def test_fidelity_of_a_foreign_encoder_against_itself(minilm_dir):
    """``eval --reference`` on an encoder whose output 0 is int64 ``input_ids`` (it used to die in a broadcast)."""
    model = _passthrough_encoder()
    texts = ["hackers write programs", "the jargon file describes their words", "a kludge works, barely"]
    res = embedding_fidelity(model, model, str(minilm_dir), texts)
    assert res.mean_cosine == pytest.approx(1.0) and res.paragraphs == 3


def test_pooling_refuses_a_model_without_hidden_states():
    model = _passthrough_encoder(vocab=50, with_hidden=False)
    batch = {"input_ids": np.ones((1, 3), np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    with pytest.raises(QCompilerError) as e:
        pooled_embeddings(model, [batch], name="the reference")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the reference has no float [batch, sequence, hidden] output")
    assert "ids_out int64 [B, S]" in msg and "pooled float [B, 4]" in msg


def test_perplexity_reads_the_logits_output():
    """Output 0 is the ids passed through; ``logits`` (a lookup in a [V, V] table) is read instead."""
    vocab = 8
    table = np.random.default_rng(1).standard_normal((vocab, vocab)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["ids_out"]),
         helper.make_node("Gather", ["E", "input_ids"], ["logits"])], "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", vocab])],
        [numpy_helper.from_array(table, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    windows = np.array([[1, 2, 3, 4, 5]], dtype=np.int64)
    res = perplexity(model, windows)
    logp = table - np.log(np.exp(table.astype(np.float64)).sum(-1, keepdims=True))
    nll = -np.mean([logp[a, b] for a, b in zip(windows[0, :-1], windows[0, 1:], strict=True)])
    assert res.nll == pytest.approx(nll, rel=1e-5) and res.tokens == 4


_PROSE = ("Hackers write programs, and the Jargon File describes the words they use for them: a kludge is a "
          "clever but clumsy fix, a hack is a quick job that produces what is needed, and cruft is excess code. ")


def test_validation_inputs_are_real_text_when_the_tokenizer_is_known(minilm_dir, tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(f"{i} " + _PROSE * 2 for i in range(10)))
    model = _passthrough_encoder()
    real = real_sample_inputs(model, minilm_dir, text, samples=3, seq=24)
    assert real is not None and real.label == "text (3 samples of prose.txt, 24 tokens each)"
    ids, mask = real.feeds["input_ids"], real.feeds["attention_mask"]
    assert ids.shape == mask.shape == (3, 24) and ids.dtype == np.int64 and np.all(mask == 1)
    assert np.all(ids[:, 0] == 101) and len(np.unique(ids)) > 20  # [CLS] then real word pieces
    res = validate(model, model, real)
    assert res.inputs == real.label and res.max_rel_error == 0
    assert validation_inputs(model, minilm_dir, text, samples=3, seq=24).label == real.label


def test_validation_inputs_fall_back_to_random_token_ids(minilm_dir, tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join([_PROSE] * 5))
    model = _passthrough_encoder()
    assert real_sample_inputs(model, None, text) is None  # no tokenizer recorded
    assert real_sample_inputs(model, tmp_path / "gone", text) is None
    assert real_sample_inputs(model, minilm_dir, tmp_path / "missing.txt") is None  # no text
    assert real_sample_inputs(_passthrough_encoder(vocab=50), minilm_dir, text) is None  # ids beyond the vocabulary
    assert real_sample_inputs(mixed_model(), minilm_dir, text) is None  # no token-id input
    fallback = validation_inputs(model, None, text)
    assert fallback.label == "random token ids" and fallback.feeds["input_ids"].shape == (2, 16)
    assert validate(model, model).inputs == "random token ids"
    assert validate(mixed_model(), mixed_model()).inputs == "random inputs"
    feeds = fallback.feeds
    assert validate(model, model, feeds).inputs == "given inputs"
    assert validate(model, model, SampleInputs(feeds, "mine"), label="theirs").inputs == "theirs"


@pytest.mark.skipif(not JARGON_FILE.is_file(), reason="the Jargon File (apt jargon-text) is not installed")
def test_validation_inputs_default_to_the_jargon_file(minilm_dir):
    real = real_sample_inputs(_passthrough_encoder(), minilm_dir)
    assert real is not None and real.label.startswith("text (4 samples of the Jargon File")


def _word_tokenizer(path, bos: bool):
    """A word-level tokenizer saved as a Hugging Face folder; ``bos``: it puts <s> before every text, as
    Llama's and Gemma's tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "hackers write programs and the jargon file describes their words hello".split()
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", unk_token="<unk>").save_pretrained(path)
    return str(path)


def test_windows_begin_as_the_tokenizer_begins_a_text(tmp_path):
    """BOS where the tokenizer adds one (Llama, Gemma), then text tokens; none where it adds none (SmolLM2's,
    GPT-2's); ``bos=False`` gives text tokens only either way."""
    from qcompiler.runtime.evaluate import window_prefix

    text = " ".join(["hackers write programs and the jargon file describes their words"] * 20)
    with_bos = _word_tokenizer(tmp_path / "bos", bos=True)
    without = _word_tokenizer(tmp_path / "plain", bos=False)
    assert window_prefix(with_bos) == [1] and window_prefix(without) == []
    w = token_windows(with_bos, text, windows=3, length=12)
    assert w.shape == (3, 12) and (w[:, 0] == 1).all() and (w[:, 1:] > 1).all()
    plain = token_windows(without, text, windows=3, length=11)
    np.testing.assert_array_equal(w[:, 1:], plain)  # the same text tokens after the BOS
    np.testing.assert_array_equal(token_windows(with_bos, text, windows=3, length=11, bos=False), plain)
    with pytest.raises(ValueError, match="no room"):
        token_windows(with_bos, text, windows=1, length=2)


def test_eval_perplexity_says_how_windows_begin(tmp_path, capsys, cache_dir):
    """``qcompiler eval --perplexity``: BOS-led windows where the tokenizer adds BOS, said in the output (and the
    JSON); ``--no-bos`` scores text tokens only."""
    import json

    import torch
    import transformers as tf

    from qcompiler.cli import main
    from qcompiler.frontends import load_model
    from qcompiler.graphio import save_onnx_atomic

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=16, architectures=["LlamaForCausalLM"])
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "lm")
    model = load_model(str(tmp_path / "lm"), cache_dir=cache_dir, kv_cache=False).model
    save_onnx_atomic(model, tmp_path / "lm.onnx")
    tok = _word_tokenizer(tmp_path / "tok", bos=True)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["hackers write programs and the jargon file describes their words"] * 20))
    common = ["eval", str(tmp_path / "lm.onnx"), "--perplexity", "--tokenizer", tok, "--text", str(text),
              "--windows", "2", "--window-length", "16"]
    assert main([*common, "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "over 30 tokens (2 windows; each window starts with the tokenizer's 1 prefix token(s) [1] (BOS))" in out
    assert json.loads((tmp_path / "a.json").read_text())["window_prefix"] == [1]
    assert main([*common, "--no-bos"]) == 0
    assert "(2 windows; windows of text tokens only)" in capsys.readouterr().out
