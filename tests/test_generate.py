"""The token loop over a KV-cache graph: greedy tokens equal torch's ``generate``, a left-padded batch too;
text prompts through the tokenizer the model records; end tokens, sampling, streaming and timings."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch

from qcompiler.errors import QCompilerError
from qcompiler.frontends import load_model
from qcompiler.runtime.generate import choose, generate, text_streamer
from qcompiler.runtime.session import SessionOptions, make_session

EXACT = SessionOptions(device="cpu", optimize=False)


def _torch_generate(folder, ids: np.ndarray, mask: np.ndarray, new: int) -> np.ndarray:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


@pytest.fixture(scope="module")
def llama(tiny_checkpoints, cache_dir):
    return load_model(str(tiny_checkpoints["llama"]), cache_dir=cache_dir)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_tokens_are_torchs(family, tiny_checkpoints, cache_dir):
    loaded = load_model(str(tiny_checkpoints[family]), cache_dir=cache_dir)
    ids = np.random.default_rng(0).integers(5, 500, (1, 9)).astype(np.int64)
    result = generate(loaded.onnx_path, ids[0], max_new_tokens=16, eos_token_id=(), options=EXACT)
    assert result.tokens.shape == (1, 16) and result.lengths == (16,) and result.decode_steps == 15
    np.testing.assert_array_equal(result.tokens, _torch_generate(tiny_checkpoints[family], ids, np.ones_like(ids), 16))
    assert result.prompt_tokens == 9 and result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert result.texts is None


def test_left_padded_batch_is_torchs(llama, tiny_checkpoints):
    ids = np.random.default_rng(1).integers(5, 500, (3, 8)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    result = generate(make_session(llama.model, EXACT), ids, attention_mask=mask, max_new_tokens=8, eos_token_id=())
    np.testing.assert_array_equal(result.tokens, _torch_generate(tiny_checkpoints["llama"], ids, mask, 8))
    assert result.prompt_tokens == int(mask.sum())
    with pytest.raises(QCompilerError, match="left"):
        generate(llama.model, ids, attention_mask=mask[:, ::-1].copy(), max_new_tokens=2)


def test_end_tokens_stop_rows_and_the_rest_is_padding(llama):
    sess = make_session(llama.model, EXACT)
    ids = np.random.default_rng(2).integers(5, 500, (2, 6)).astype(np.int64)
    free = generate(sess, ids, max_new_tokens=10, eos_token_id=())
    end = int(free.tokens[0, 2])  # row 0's third token ends it; row 1 runs on unless it meets that id
    stopped = generate(sess, ids, max_new_tokens=10, eos_token_id=[end, 9999])
    n0 = stopped.lengths[0]
    assert n0 == 3 and list(stopped.tokens[0, :3]) == list(free.tokens[0, :3])
    assert (stopped.tokens[0, 3:] == end).all()  # padded with the first end id
    hit = np.flatnonzero(free.tokens[1] == end)
    assert stopped.lengths[1] == (hit[0] + 1 if len(hit) else 10)
    # the model's own end ids by default: a single row that meets one stops there
    one = generate(sess, ids[:1], max_new_tokens=10, eos_token_id=end)
    assert one.lengths == (3,) and one.tokens.shape == (1, 3) and one.decode_steps == 2


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(llama):
    sess = make_session(llama.model, EXACT)
    ids = np.arange(5, 15, dtype=np.int64)
    greedy = generate(sess, ids, max_new_tokens=8, eos_token_id=()).tokens
    a = generate(sess, ids, max_new_tokens=8, temperature=1.5, seed=7, eos_token_id=()).tokens
    b = generate(sess, ids, max_new_tokens=8, temperature=1.5, seed=7, eos_token_id=()).tokens
    c = generate(sess, ids, max_new_tokens=8, temperature=1.5, seed=8, eos_token_id=()).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    nucleus = generate(sess, ids, max_new_tokens=8, temperature=1.5, top_p=1e-9, seed=7, eos_token_id=()).tokens
    np.testing.assert_array_equal(nucleus, greedy)


def test_choose_draws_from_the_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.2, 1e-12]] * 20000))
    draws = choose(logits, temperature=1.0, rng=np.random.default_rng(0))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2, 0.0], atol=0.02)
    top = choose(logits, temperature=1.0, top_p=0.6, rng=np.random.default_rng(0))  # 0.5 + 0.3 hold 0.6
    assert set(np.unique(top)) == {0, 1}
    assert (choose(logits) == 0).all()


def _word_tokenizer(folder):
    """A word-level tokenizer over the tiny models' 512 ids: ``<unk> <s> </s>``, then ``w3`` .. ``w511``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 512)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def test_text_prompt_uses_the_recorded_tokenizer_and_streams(tiny_checkpoints, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_checkpoints["llama"], folder)
    tok = _word_tokenizer(folder)
    loaded = load_model(str(folder), cache_dir=tmp_path / "cache")
    shown: list[str] = []
    result = generate(loaded.onnx_path, "w10 w20 w30 w40", max_new_tokens=6, eos_token_id=(),
                      on_token=text_streamer(str(folder), shown.append))
    ids = np.array([[10, 20, 30, 40]], dtype=np.int64)
    want = generate(loaded.onnx_path, ids, max_new_tokens=6, eos_token_id=())
    np.testing.assert_array_equal(result.tokens, want.tokens)
    assert result.texts == (tok.decode(want.tokens[0].tolist(), skip_special_tokens=True),)
    assert "".join(shown) == result.texts[0]
    batch = generate(loaded.onnx_path, ["w10 w20 w30 w40", "w7"], max_new_tokens=3, eos_token_id=())
    np.testing.assert_array_equal(batch.tokens[0], want.tokens[0, :3])
    single = generate(loaded.onnx_path, np.array([7]), max_new_tokens=3, eos_token_id=())
    np.testing.assert_array_equal(batch.tokens[1], single.tokens[0])


def test_a_graph_without_a_cache_is_refused(tiny_checkpoints, cache_dir):
    plain = load_model(str(tiny_checkpoints["llama"]), cache_dir=cache_dir, kv_cache=False)
    with pytest.raises(QCompilerError, match="kv_cache=True"):
        generate(plain.model, np.arange(5, 9), max_new_tokens=2)
    # the tiny GPT-2 folder has no tokenizer files (transformers builds an empty tokenizer from its config)
    with pytest.raises(QCompilerError, match="no tokens"):
        generate(load_model(str(tiny_checkpoints["gpt2"]), cache_dir=cache_dir).model, "no tokenizer here")
    with pytest.raises(QCompilerError, match="generate with"):
        generate(onnx.TensorProto(), [1, 2])
