import os

import numpy as np
import onnx
import pytest
import torch

from qcompiler.errors import ModelLoadError
from qcompiler.frontends import load_model
from qcompiler.frontends.cache import content_key
from qcompiler.graphio import load_onnx
from qcompiler.metadata import module_paths
from tests.graphs import mixed_model
from tests.helpers import outputs


def test_hf_export_is_cached_by_content(tiny_checkpoints, cache_dir, tmp_path):
    import shutil

    folder = tmp_path / "llama"
    shutil.copytree(tiny_checkpoints["llama"], folder)
    first = load_model(str(folder), cache_dir=tmp_path / "c")
    second = load_model(str(folder), cache_dir=tmp_path / "c")
    assert not first.cached and second.cached
    assert first.kind == "causal_lm" and first.tokenizer_dir == str(folder.resolve())
    key = content_key(folder, {})
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")
    assert content_key(folder, {}) != key  # any byte change misses the cache
    # by_stat (the streamed export): the config's bytes, and the weight files' sizes and times
    key = content_key(folder, {}, by_stat=True)
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")
    assert content_key(folder, {}, by_stat=True) != key
    key = content_key(folder, {}, by_stat=True)
    weights = folder / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert content_key(folder, {}, by_stat=True) != key


def test_export_has_dynamic_batch_and_sequence(tiny_checkpoints, cache_dir):
    loaded = load_model(str(tiny_checkpoints["bert"]), cache_dir=cache_dir)
    assert [i.name for i in loaded.model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for inp in loaded.model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert not dims[0].HasField("dim_value") and not dims[1].HasField("dim_value")


def test_module_paths_give_stable_site_ids(tiny_checkpoints, cache_dir):
    loaded = load_model(str(tiny_checkpoints["llama"]), cache_dir=cache_dir)
    paths = set(module_paths(loaded.model).values())
    assert "model.layers.0.self_attn.q_proj" in paths and "lm_head" in paths


def test_nn_module_frontend_matches_torch():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = module

        def forward(self, x):
            return self.net(x)

    loaded = load_model(Wrap(), example_inputs={"x": torch.randn(2, 5, 32)})
    x = np.random.default_rng(0).standard_normal((3, 7, 32)).astype(np.float32)
    got = outputs(loaded.model, {"x": x})["output"]
    np.testing.assert_allclose(got, Wrap()(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_module_frontend_rejects_aliased_inputs():
    t = torch.ones(2, 4, dtype=torch.int64)
    with pytest.raises(ModelLoadError, match="distinct"):
        load_model(torch.nn.Identity(), example_inputs={"a": t, "b": t})


def test_onnx_file_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "missing.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    with pytest.raises(ModelLoadError, match="ONNX"):
        load_model(str(bad))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="ONNX"):
        load_model(str(empty))
    folder = tmp_path / "nofolder"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(folder))


def test_external_data_roundtrip_and_escape_refused(tmp_path):
    model = mixed_model()
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    loaded = load_onnx(path)
    assert {t.name for t in loaded.graph.initializer} >= {"W1", "W2t"}
    # a location pointing outside the model's folder is refused
    evil = onnx.load(str(path), load_external_data=False)
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.data"
    bad = tmp_path / "evil.onnx"
    onnx.save_model(evil, str(bad))
    with pytest.raises(ModelLoadError, match="outside"):
        load_onnx(bad)


def test_skipping_the_slow_slice_rewrite_leaves_the_export_unchanged(tiny_checkpoints, tmp_path, monkeypatch):
    """The exporter runs without onnxscript's ``SlicesSplit`` rule (quadratic in Slice nodes: 51 s of SmolLM2's
    export), and the graph is the one the full rule set gives: a RoPE family with a KV cache, whose rotate-half
    Slices are the rule's pattern."""
    from onnxscript import rewriter

    import qcompiler.frontends.export as export

    before = rewriter._DEFAULT_REWRITE_RULES
    with export._skip_slow_rewrites():
        names = {r.name for r in rewriter._DEFAULT_REWRITE_RULES}
        assert "SlicesSplit" not in names and len(names) > 10
    assert rewriter._DEFAULT_REWRITE_RULES is before
    graphs = []
    for i, skipped in enumerate((export.SKIPPED_REWRITES, frozenset())):
        monkeypatch.setattr(export, "SKIPPED_REWRITES", skipped)
        model = load_model(str(tiny_checkpoints["llama"]), cache_dir=tmp_path / str(i), kv_cache=True).model
        graphs.append(model.graph)
    assert graphs[0].SerializeToString() == graphs[1].SerializeToString()
