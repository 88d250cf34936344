"""The pair matcher (attn_vo, mlp_up_down) and sibling groups on every family, dynamo and legacy exports,
the real MiniLM and SmolLM2, with the exactness check that proves the head maps right."""

from collections import Counter

import numpy as np
import onnx
import pytest

from qcompiler.analyze import analyze
from qcompiler.frontends import load_model
from qcompiler.plan import PairTransform
from tests.conftest import PAIR_FAMILIES
from tests.pairfold import fold_and_compare, random_transforms

# tiny models: 4 query heads of size 16; GQA families have 2 KV heads, gemma3 one
KV_MAP = {"gpt2": (0, 1, 2, 3), "bert": (0, 1, 2, 3), "llama": (0, 0, 1, 1), "qwen2": (0, 0, 1, 1),
          "gemma2": (0, 0, 1, 1), "gemma3": (0, 0, 0, 0), "phi3": (0, 0, 1, 1)}
V_COLS = {"gpt2": (128, 192), "phi3": (96, 128)}  # V's slice of a fused QKV weight
GATED = {"llama", "qwen2", "gemma2", "gemma3", "phi3"}
FOLD_BUDGET = 1e-4


def _check_tiny(analysis, family):
    kinds = Counter(p.kind for p in analysis.pairs)
    assert kinds == {"attn_vo": 2, "mlp_up_down": 2}, (kinds, analysis.pair_rejections)
    for p in analysis.pairs_of("attn_vo"):
        assert p.kv_map == KV_MAP[family]
        assert p.head_dim == 16 and p.num_heads == 4 and p.num_kv_heads == len(set(KV_MAP[family]))
        assert p.producer_cols == V_COLS.get(family, (0, 16 * p.num_kv_heads))
    for p in analysis.pairs_of("mlp_up_down"):
        assert (p.gate is not None) == (family in GATED)
        assert ("diagonal" in p.exact) == (family in GATED)
        assert "permutation" in p.exact
    assert not analysis.pair_rejections


@pytest.mark.parametrize("family", PAIR_FAMILIES)
def test_tiny_dynamo_pairs_and_fold_exact(family, pair_checkpoints, cache_dir):
    model = load_model(str(pair_checkpoints[family]), cache_dir=cache_dir, kv_cache=False).model
    err, analysis, _ = fold_and_compare(model)
    _check_tiny(analysis, family)
    assert err <= FOLD_BUDGET, err


@pytest.mark.parametrize("family", PAIR_FAMILIES)
def test_tiny_legacy_pairs_and_fold_exact(family, legacy_models):
    model = onnx.load(legacy_models[family])
    err, analysis, _ = fold_and_compare(model)
    _check_tiny(analysis, family)
    assert err <= FOLD_BUDGET, err
    # the legacy exporter's scoped node names give module-path ids
    assert any(p.producer.endswith(("v_proj", "value", "c_attn", "qkv_proj")) for p in analysis.pairs)


def test_fused_gate_up_is_two_slices_of_one_weight(pair_checkpoints, cache_dir):
    a = analyze(load_model(str(pair_checkpoints["phi3"]), cache_dir=cache_dir, kv_cache=False).model)
    p = a.pairs_of("mlp_up_down")[0]
    assert p.gate == p.producer and p.producer.endswith("gate_up_proj")
    assert p.gate_cols == (0, 128) and p.producer_cols == (128, 256)


def test_sibling_groups(pair_checkpoints, cache_dir):
    a = analyze(load_model(str(pair_checkpoints["llama"]), cache_dir=cache_dir, kv_cache=False).model)
    ids = [g.id for g in a.groups]
    assert ids == ["model.layers.0.self_attn:q_proj+k_proj+v_proj", "model.layers.0.mlp:gate_proj+up_proj",
                   "model.layers.1.self_attn:q_proj+k_proj+v_proj", "model.layers.1.mlp:gate_proj+up_proj"]
    assert all(len({s.input for s in a.sites if s.id in g.members}) == 1 for g in a.groups)


def test_wrong_head_map_is_detected(pair_checkpoints, cache_dir):
    """The fold check is sensitive: the same transforms with a wrong KV map change the outputs."""
    model = load_model(str(pair_checkpoints["llama"]), cache_dir=cache_dir, kv_cache=False).model

    def wrong(analysis):
        good = random_transforms(analysis)
        out = []
        for t in good:
            if t.pair.kind == "attn_vo":
                pair = type(t.pair)(**{**t.pair.__dict__, "kv_map": (0, 1, 0, 1)})
                t = PairTransform(pair, matrices=t.matrices)
            out.append(t)
        return out

    err, _, _ = fold_and_compare(model, wrong)
    assert err > 1e-2


def test_minilm_pairs(minilm):
    err, a, _ = fold_and_compare(minilm.model)
    kinds = Counter(p.kind for p in a.pairs)
    assert kinds == {"attn_vo": 6, "mlp_up_down": 6}
    assert all(p.num_heads == 12 and p.head_dim == 32 and p.kv_map == tuple(range(12))
               for p in a.pairs_of("attn_vo"))
    assert all(p.exact == ("permutation",) and p.activation == "Gelu" for p in a.pairs_of("mlp_up_down"))
    assert len(a.groups) == 6  # query/key/value per layer
    assert err <= FOLD_BUDGET, err


def test_smollm2_pairs(smollm2):
    err, a, _ = fold_and_compare(smollm2.model)
    kinds = Counter(p.kind for p in a.pairs)
    assert kinds == {"attn_vo": 30, "mlp_up_down": 30}
    for p in a.pairs_of("attn_vo"):
        assert (p.num_heads, p.num_kv_heads, p.head_dim) == (9, 3, 64)
        assert p.kv_map == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    assert len(a.groups) == 60
    assert err <= FOLD_BUDGET, err


def test_pair_transform_check_refuses_inexact_scale(minilm):
    a = analyze(minilm.model)
    p = a.pairs_of("mlp_up_down")[0]
    width = p.producer_cols[1] - p.producer_cols[0]
    with pytest.raises(ValueError, match="not exact through the activation"):
        PairTransform(p, scale=np.full(width, 2.0)).check()
    with pytest.raises(ValueError, match="not a permutation"):
        PairTransform(p, perm=np.zeros(width, dtype=int)).check()
    v = a.pairs_of("attn_vo")[0]
    with pytest.raises(ValueError, match="singular"):
        PairTransform(v, matrices=np.zeros((12, 32, 32))).check()


def test_mqa_one_kv_head(tmp_path, cache_dir):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, vocab_size=512,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, architectures=["LlamaForCausalLM"])
    tf.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(tmp_path / "mqa")
    err, a, _ = fold_and_compare(load_model(str(tmp_path / "mqa"), cache_dir=cache_dir, kv_cache=False).model)
    (vo,) = a.pairs_of("attn_vo")
    assert vo.kv_map == (0, 0, 0, 0) and vo.num_kv_heads == 1 and vo.producer_cols == (0, 16)
    assert err <= FOLD_BUDGET, err
