"""KV-cache export of causal LMs: the graph contract, ONNX Runtime against torch over a prefill and decode
steps (a left-padded batch too), perplexity equal to the no-cache graph's, the runtime helpers' empty past,
and the export cache keeping the two graphs apart."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from qcompiler.frontends import load_model
from qcompiler.frontends.kv_cache import CacheLayout, CacheWrapper, check_cache_export, export_cache_program
from qcompiler.metadata import EOS_TOKEN_IDS, KV_CACHE, SCOPE_PREFIX, model_properties
from qcompiler.runtime.calib_data import calibration_feeds
from qcompiler.runtime.evaluate import perplexity, session_feeds
from qcompiler.runtime.inputs import past_feeds, sample_inputs
from qcompiler.runtime.session import SessionOptions, make_session
from qcompiler.runtime.validate import validate

LMS = ("llama", "qwen2", "gemma2", "gemma3", "gpt2")
EXACT = SessionOptions(device="cpu", optimize=False)


def _torch_model(folder):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _full_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """torch without a cache, on the whole sequence so far (positions from the mask, as the graph's)."""
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    pos = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos, use_cache=False).logits.numpy()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _decode_against_torch(onnx_model, model, ids: np.ndarray, mask: np.ndarray, steps: int = 3) -> list[float]:
    """Prefill ``ids`` (left padded by ``mask``) from an empty past, then ``steps`` greedy one-token steps feeding
    present -> past; each step's logits at real positions against torch recomputing the whole sequence."""
    sess = make_session(onnx_model, EXACT)
    past = past_feeds(onnx_model, len(ids))
    new, seq_ids, errors = ids, ids, []
    for _ in range(steps + 1):
        out = sess.run(None, {"input_ids": new, "attention_mask": mask, **past})
        ref = _full_logits(model, seq_ids, mask)[:, -new.shape[1]:]
        real = mask[:, -new.shape[1]:].astype(bool)
        errors.append(_rel(out[0][real], ref[real]))
        past = dict(zip([i.name for i in sess.get_inputs()][2:], out[1:], strict=True))
        new = ref[:, -1].argmax(-1)[:, None].astype(np.int64)
        seq_ids = np.concatenate([seq_ids, new], axis=1)
        mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    return errors


@pytest.mark.parametrize("family", LMS)
def test_cache_graph_contract(family, tiny_checkpoints, cache_dir):
    loaded = load_model(str(tiny_checkpoints[family]), cache_dir=cache_dir)
    model = loaded.model
    config = _torch_model(tiny_checkpoints[family]).config
    layout = CacheLayout.from_config(config)
    props = model_properties(model)
    assert CacheLayout.from_json(props[KV_CACHE]) == layout
    assert props[SCOPE_PREFIX] == "inner."
    assert json.loads(props[EOS_TOKEN_IDS]) == ([] if config.eos_token_id is None else [config.eos_token_id])
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", *layout.past_names()]
    assert [o.name for o in model.graph.output] == ["logits", *layout.present_names()]

    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]

    ins = {i.name: dims(i) for i in model.graph.input}
    outs = {o.name: dims(o) for o in model.graph.output}
    batch, seq = ins["input_ids"]
    assert isinstance(batch, str) and isinstance(seq, str) and ins["attention_mask"][0] == batch
    for name in layout.past_names():
        assert ins[name][0] == batch and isinstance(ins[name][2], str)
        assert ins[name][1::2] == [layout.kv_heads, layout.head_dim]
    for name in layout.present_names():
        assert outs[name][1::2] == [layout.kv_heads, layout.head_dim]
    assert outs["logits"][2] == config.vocab_size


@pytest.mark.parametrize("family", LMS)
def test_prefill_and_decode_steps_match_torch(family, tiny_checkpoints, cache_dir):
    """Against torch *without* a cache (the whole sequence recomputed each step): one unpadded row, then a
    batch left-padded by 0, 3 and 6 tokens."""
    onnx_model = load_model(str(tiny_checkpoints[family]), cache_dir=cache_dir).model
    model = _torch_model(tiny_checkpoints[family])
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 500, (1, 6)).astype(np.int64)
    assert max(_decode_against_torch(onnx_model, model, ids, np.ones_like(ids))) < 1e-4
    ids = rng.integers(5, 500, (3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    errors = _decode_against_torch(onnx_model, model, ids, mask)
    assert len(errors) == 4 and max(errors) < 1e-4, errors


def test_sliding_window_layers_keep_their_window(tmp_path, cache_dir):
    """Gemma 2 with a window of 4: the cache keeps the whole past and the mask applies the window, so decode
    steps past the window still equal torch on the whole sequence."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma2Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=512,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                          architectures=["Gemma2ForCausalLM"])
    tf.Gemma2ForCausalLM(cfg).eval().save_pretrained(tmp_path / "g")
    onnx_model = load_model(str(tmp_path / "g"), cache_dir=cache_dir).model
    model = _torch_model(tmp_path / "g")
    ids = np.random.default_rng(1).integers(5, 500, (2, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    errors = _decode_against_torch(onnx_model, model, ids, mask, steps=4)
    assert max(errors) < 1e-4, errors


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_perplexity_of_the_cache_graph_is_the_no_cache_graphs(family, tiny_checkpoints, cache_dir):
    folder = str(tiny_checkpoints[family])
    with_cache = load_model(folder, cache_dir=cache_dir)
    without = load_model(folder, cache_dir=cache_dir, kv_cache=False)
    assert [i.name for i in without.model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in without.model.graph.output] == ["logits"]
    assert KV_CACHE not in model_properties(without.model)
    windows = np.random.default_rng(2).integers(5, 500, (3, 48)).astype(np.int64)
    a = perplexity(with_cache.model, windows, EXACT)
    b = perplexity(without.model, windows, EXACT)
    assert a.tokens == b.tokens == 3 * 47
    assert abs(a.perplexity - b.perplexity) / b.perplexity < 1e-3, (a, b)


def test_cache_and_no_cache_exports_are_cached_apart(tiny_checkpoints, tmp_path):
    folder = str(tiny_checkpoints["qwen2"])
    a = load_model(folder, cache_dir=tmp_path / "c")
    b = load_model(folder, cache_dir=tmp_path / "c", kv_cache=False)
    assert not a.cached and not b.cached and a.onnx_path != b.onnx_path
    again_a = load_model(folder, cache_dir=tmp_path / "c")
    again_b = load_model(folder, cache_dir=tmp_path / "c", kv_cache=False)
    assert again_a.cached and again_a.onnx_path == a.onnx_path
    assert again_b.cached and again_b.onnx_path == b.onnx_path
    assert len(again_a.model.graph.input) > 2 and len(again_b.model.graph.input) == 2


def test_streamed_cache_export_equals_the_in_memory_one(tiny_checkpoints, tmp_path, cache_dir):
    folder = str(tiny_checkpoints["llama"])
    streamed = load_model(folder, cache_dir=tmp_path / "s", stream=True)
    streamed_plain = load_model(folder, cache_dir=tmp_path / "s", stream=True, kv_cache=False)
    whole = load_model(folder, cache_dir=cache_dir)
    assert streamed.onnx_path != streamed_plain.onnx_path
    assert [o.name for o in streamed_plain.model.graph.output] == ["logits"]
    props = model_properties(streamed.model)
    assert props[KV_CACHE] == model_properties(whole.model)[KV_CACHE]
    feeds = sample_inputs(whole.model, batch=2, seq=7)
    a = make_session(streamed.onnx_path, EXACT).run(None, feeds)
    b = make_session(whole.model, EXACT).run(None, feeds)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_runtime_helpers_feed_an_empty_past(tiny_checkpoints, cache_dir):
    model = load_model(str(tiny_checkpoints["llama"]), cache_dir=cache_dir).model
    layout = CacheLayout.from_json(model_properties(model)[KV_CACHE])
    feeds = sample_inputs(model, batch=2, seq=5)
    assert feeds["past_key_values.0.key"].shape == (2, layout.kv_heads, 0, layout.head_dim)
    assert feeds["attention_mask"].shape == (2, 5)
    ids = np.random.default_rng(0).integers(5, 500, (3, 8)).astype(np.int64)
    calib = calibration_feeds(model, ids)
    assert set(calib) == {i.name for i in model.graph.input}
    assert calib["past_key_values.1.value"].shape == (3, layout.kv_heads, 0, layout.head_dim)
    sess = make_session(model, EXACT)
    fed = session_feeds(sess, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, fed), strict=True))
    assert out["logits"].shape == (3, 8, 512) and out["present.1.key"].shape[2] == 8
    result = validate(model, model, options=EXACT)
    assert result.max_rel_error == 0.0 and {o.name for o in result.outputs} >= {"logits", "present.0.key"}


def test_empty_past_comes_from_the_metadata_when_the_shape_is_symbolic(tiny_checkpoints, cache_dir):
    model = onnx.ModelProto()
    model.CopyFrom(load_model(str(tiny_checkpoints["gpt2"]), cache_dir=cache_dir).model)
    for inp in model.graph.input[2:]:
        for d in inp.type.tensor_type.shape.dim:
            d.dim_param = "n"
    layout = CacheLayout.from_json(model_properties(model)[KV_CACHE])
    assert past_feeds(model, 4)["past_key_values.1.key"].shape == (4, layout.kv_heads, 0, layout.head_dim)
    del model.metadata_props[:]
    with pytest.raises(ValueError, match="layout"):
        past_feeds(model, 4)


def test_the_export_check_catches_a_wrong_graph(tiny_checkpoints):
    """The check runs the graph against the torch model it is given: a graph of other weights fails it."""
    import transformers as tf

    model = _torch_model(tiny_checkpoints["llama"])
    program, layout, wrapper = export_cache_program(model, 512)
    proto = program.model_proto
    assert check_cache_export(proto, wrapper, layout, 512) < 1e-5
    torch.manual_seed(1)
    other = tf.LlamaForCausalLM(model.config).eval()
    assert check_cache_export(proto, CacheWrapper(other, layout.layers), layout, 512) > 1e-2
