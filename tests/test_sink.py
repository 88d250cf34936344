"""The attention sink's state (runtime/sink.py) and a pair's output there (algorithms/sink.py): the one-token
BOS run matches a whole-model run and a streamed one, and the pair formulas reproduce the model's own outputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qcompiler.algorithms.joint import Heads
from qcompiler.algorithms.sink import activation_factor, pair_sink_output, sink_ratio
from qcompiler.analyze import analyze
from qcompiler.frontends import load_model
from qcompiler.graphio import import_graph
from qcompiler.match.sites import weight_reader
from qcompiler.runtime.session import SessionOptions, make_session
from qcompiler.runtime.sink import bos_token_id, noise_feeds, noise_power, one_token_feeds, sink_states
from qcompiler.sites import ATTN_VO

DECODERS = ("llama", "qwen2", "gemma2", "gemma3", "phi3")


def test_bos_token_id_from_the_folder(tmp_path):
    assert bos_token_id(None) is None and bos_token_id(tmp_path) is None
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"bos_token_id": 7}}))
    assert bos_token_id(tmp_path) == 7
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": [5, 6]}))
    assert bos_token_id(tmp_path) == 5


def _loaded(path, cache_dir):
    return load_model(str(path), cache_dir=cache_dir, kv_cache=True)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_sink_states_equal_a_whole_run_and_a_streamed_run(family, pair_checkpoints, cache_dir, tmp_path):
    model = _loaded(pair_checkpoints[family], cache_dir).model
    tensors = sorted({n.input[0] for n in model.graph.node if n.op_type == "MatMul"})
    got = sink_states(model, tensors, token=1)
    assert set(got) == set(tensors) and all(v.ndim == 1 for v in got.values())
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    have = {o.name for o in whole.graph.output}
    whole.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in have)
    feeds = one_token_feeds(model, 1)
    assert int(feeds["input_ids"].ravel()[0]) == 1 and feeds["input_ids"].shape == (1, 1)
    ref = dict(zip(tensors, make_session(whole, SessionOptions(device="cpu")).run(tensors, feeds), strict=True))
    for t in tensors:
        np.testing.assert_allclose(got[t], ref[t].reshape(-1, ref[t].shape[-1])[0], rtol=1e-5, atol=1e-6)
    # a streamed model (weights left in their file) gives the same state, a stretch at a time
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    lazy = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    streamed = sink_states(lazy, tensors, token=1, data_dir=tmp_path)
    for t in tensors:
        np.testing.assert_allclose(streamed[t], got[t], rtol=1e-5, atol=1e-6)


def test_noise_power_is_the_mean_square_of_a_whole_run_past_position_0(pair_checkpoints, cache_dir):
    model = _loaded(pair_checkpoints["llama"], cache_dir).model
    weights = {t.name for t in model.graph.initializer}
    tensors = sorted({n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights})
    got = noise_power(model, tensors, sequences=2, length=8, seed=3)
    feeds = noise_feeds(model, 2, 8, seed=3)
    ids = feeds["input_ids"]
    assert ids.shape == (2, 8) and ids.max() > 400 and (feeds["attention_mask"] == 1).all()  # the whole vocabulary
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    whole.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    ref = dict(zip(tensors, make_session(whole, SessionOptions(device="cpu")).run(tensors, feeds), strict=True))
    for t in tensors:
        x = ref[t].astype(np.float64).reshape(2, 8, -1)[:, 1:]
        np.testing.assert_allclose(got[t], (x ** 2).mean(axis=(0, 1)), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("family", DECODERS)
def test_pair_formulas_reproduce_the_models_outputs_at_the_sink(family, pair_checkpoints, cache_dir):
    """V·O: one token attends to itself alone, so the heads' ``x A_kv(j) B_j`` sum to O's output; up·down: the
    activation's factor read off the run is the gate's SiLU/GELU of ``x G``, and gives down's output."""
    model = _loaded(pair_checkpoints[family], cache_dir).model
    analysis = analyze(model)
    sites = {s.id: s for s in analysis.sites}
    weight = weight_reader(import_graph(model))
    vo = [p for p in analysis.pairs if p.kind == ATTN_VO]
    mlp = [p for p in analysis.pairs if p.kind != ATTN_VO]
    assert vo and mlp
    tensors = {sites[i].input for p in analysis.pairs for i in (p.producer, p.consumer)}
    tensors |= {sites[p.consumer].output for p in analysis.pairs}
    state = sink_states(model, sorted(tensors), token=1)
    for p in analysis.pairs:
        x = state[sites[p.producer].input]
        a = weight(sites[p.producer])[:, slice(*p.producer_cols)].astype(np.float64)
        b = weight(sites[p.consumer]).astype(np.float64)
        out = state[sites[p.consumer].output]
        if p.kind == ATTN_VO:
            got = pair_sink_output(x, a, b, Heads(p.head_dim, p.kv_map)).sum(axis=0)
        else:
            g = activation_factor(state[sites[p.consumer].input], x @ a)
            z = x @ weight(sites[p.gate])[:, slice(*p.gate_cols)].astype(np.float64)
            silu, gelu = z / (1 + np.exp(-z)), 0.5 * z * (1 + np.tanh(0.7978845608 * (z + 0.044715 * z ** 3)))
            assert min(np.abs(g - silu).max(), np.abs(g - gelu).max()) < 1e-4 * max(1.0, np.abs(g).max())
            got = pair_sink_output(x, a, b, None, g)
        np.testing.assert_allclose(got, out, rtol=1e-4, atol=1e-5 * np.abs(out).max())


def test_sink_ratio_compares_joint_with_plain():
    rng = np.random.default_rng(0)
    x, a, b = rng.standard_normal(8), rng.standard_normal((8, 4)), rng.standard_normal((4, 6))
    heads = Heads(2, (0, 0, 1))  # three query heads on two KV heads of 2
    b3 = rng.standard_normal((6, 6))
    small, big = 1e-3 * rng.standard_normal((8, 4)), 1e-1 * rng.standard_normal((8, 4))
    assert sink_ratio(x, (a, b3), (a + big, b3), (a + small, b3), heads) < 1e-2
    assert sink_ratio(x, (a, b3), (a + small, b3), (a + big, b3), heads) > 1e2
    g = rng.standard_normal(4)
    assert sink_ratio(x, (a, b), (a, b), (a, b), None, g) == 0.0  # no error either way: not worse
    np.testing.assert_allclose(activation_factor(g * (x @ a), x @ a), g)
