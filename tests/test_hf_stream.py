"""Streaming export of Hugging Face folders: the graph is the in-memory export's, the weights stay in the
export's data file, sharded and bf16 checkpoints load, a streamed compile equals the whole-model one, and
broken checkpoints are refused in one line with nothing left behind."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qcompiler.config import CafeqConfig, CompileConfig, QuantConfig
from qcompiler.errors import ConfigError, ModelLoadError
from qcompiler.frontends import load_model
from qcompiler.frontends.safetensors_index import checkpoint_tensors, float_bytes_fp32, read_header
from qcompiler.kv_layout import is_past
from qcompiler.pipeline import compile_model
from qcompiler.runtime.inputs import session_past_feeds


def _feeds(session: ort.InferenceSession, vocab: int = 500) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (3, 11)).astype(np.int64)
    mask = np.ones((3, 11), np.int64)
    mask[-1, 7:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
             **session_past_feeds(session, len(ids))}  # a KV-cache graph: an empty past
    return {i.name: feeds[i.name] for i in session.get_inputs()}


def _run(path_or_model) -> tuple[np.ndarray, dict]:
    src = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    s = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    feeds = _feeds(s)
    return s.run(None, feeds)[0], feeds


def _torch_logits(folder: Path, feeds: dict) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items() if not is_past(k)},
                    use_cache=False).logits.numpy()
    return out[feeds["attention_mask"].astype(bool)]


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gemma3", "bert"])
def test_streamed_export_is_the_in_memory_export(tiny_checkpoints, tmp_path, family):
    folder = tiny_checkpoints[family]
    streamed = load_model(str(folder), cache_dir=tmp_path / "a", stream=True)
    whole = load_model(str(folder), cache_dir=tmp_path / "b", stream=False)
    assert streamed.data_dir is not None and whole.data_dir is None
    big = [t for t in streamed.model.graph.initializer if np.prod(t.dims) >= 64 * 64]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in big)
    assert _ops(streamed.model) == _ops(whole.model)
    dims = {t.name: list(t.dims) for t in whole.model.graph.initializer}
    assert {t.name: list(t.dims) for t in streamed.model.graph.initializer} == dims
    got, _ = _run(streamed.onnx_path)
    want, _ = _run(whole.model)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # a second load is a cache hit on the same entry
    again = load_model(str(folder), cache_dir=tmp_path / "a", stream=True)
    assert again.cached and again.onnx_path == streamed.onnx_path


@pytest.mark.parametrize("dtype,tied", [("float32", False), ("float32", True), ("bfloat16", False)])
def test_sharded_checkpoints_stream_and_match_torch(tmp_path, dtype, tied):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=500,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                   architectures=["LlamaForCausalLM"])
    model = transformers.LlamaForCausalLM(cfg).eval().to(getattr(torch, dtype))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 3
    stored = checkpoint_tensors(folder)
    assert {t.dtype for t in stored.values()} == {"F32" if dtype == "float32" else "BF16"}
    assert float_bytes_fp32(stored) == 4 * sum(p.numel() for p in model.parameters())
    loaded = load_model(str(folder), cache_dir=tmp_path / "cache", stream=True)
    got, feeds = _run(loaded.onnx_path)
    want = _torch_logits(folder, feeds)  # bf16 weights read as fp32, in torch and in the export alike
    got = got[feeds["attention_mask"].astype(bool)]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


@pytest.mark.parametrize("method", ["rtn", "cafeq"])
def test_streamed_hf_compile_equals_the_whole_model_compile(tiny_checkpoints, tmp_path, method):
    base = dict(quant=QuantConfig(bits=4, group_size=32), method=method, cafeq=CafeqConfig(steps=5, joint_rounds=1))
    folder = str(tiny_checkpoints["llama"])
    whole = compile_model(folder, tmp_path / "whole.onnx", CompileConfig(**base, stream=False),
                          cache_dir=tmp_path / "cache")
    streamed = compile_model(folder, tmp_path / "streamed.onnx", CompileConfig(**base, stream=True, stream_chunk_mb=1),
                             cache_dir=tmp_path / "cache")
    assert streamed.plan.released and not whole.plan.released
    assert (tmp_path / "streamed.onnx.data").is_file()
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "whole.onnx")).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "streamed.onnx")).graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert streamed.validation.max_rel_error == pytest.approx(whole.validation.max_rel_error, rel=1e-4, abs=1e-6)


def test_folders_stream_automatically_above_the_threshold(tiny_checkpoints, tmp_path, monkeypatch):
    import qcompiler.config

    monkeypatch.setattr(qcompiler.config, "STREAM_AUTO_BYTES", 0)
    res = compile_model(str(tiny_checkpoints["llama"]), tmp_path / "auto.onnx", CompileConfig(),
                        cache_dir=tmp_path / "cache")
    assert res.plan.released and res.validation is not None


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def _refused(folder: Path, tmp_path: Path, match: str, capsys) -> None:
    from qcompiler.cli import main

    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=match):
        load_model(str(folder), cache_dir=cache, stream=True)
    out = tmp_path / "out"
    out.mkdir(parents=True)
    code = main(["compile", str(folder), "-o", str(out / "q.onnx"), "--stream", "--cache-dir", str(cache), "-q"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and match.lower() in err.lower(), err
    assert list(out.iterdir()) == []
    exports = cache / "exports"
    assert not exports.exists() or list(exports.iterdir()) == []  # no half-written cache entry


def test_a_bin_only_checkpoint_is_refused(tmp_path, capsys):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, vocab_size=100,
                                   num_attention_heads=2, num_key_value_heads=1, architectures=["LlamaForCausalLM"])
    folder = tmp_path / "bin"
    model = transformers.LlamaForCausalLM(cfg)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    _refused(folder, tmp_path, "safetensors", capsys)


def test_a_missing_tensor_is_named(tiny_checkpoints, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    folder = _copy(tiny_checkpoints["llama"], tmp_path / "ckpt")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    _refused(folder, tmp_path, "model.layers.1.mlp.down_proj.weight", capsys)


def test_corrupt_and_truncated_shards_are_named(tiny_checkpoints, tmp_path, capsys):
    folder = _copy(tiny_checkpoints["llama"], tmp_path / "garbage")
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    _refused(folder, tmp_path / "a", "not a safetensors file", capsys)

    folder = _copy(tiny_checkpoints["llama"], tmp_path / "short")
    path = folder / "model.safetensors"
    header, start = read_header(path)
    assert header and start > 8
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _refused(folder, tmp_path / "b", "truncated", capsys)


def test_a_shape_mismatch_is_named(tiny_checkpoints, tmp_path, capsys):
    folder = _copy(tiny_checkpoints["llama"], tmp_path / "ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the stored MLP weights are 128 wide
    (folder / "config.json").write_text(json.dumps(cfg))
    _refused(folder, tmp_path, "shape", capsys)


def test_a_module_cannot_stream(tmp_path):
    import torch

    with pytest.raises(ConfigError, match="nn.Module"):
        compile_model(torch.nn.Linear(8, 8), tmp_path / "x.onnx", CompileConfig(stream=True),
                      example_inputs={"x": torch.zeros(2, 8)})
    assert list(tmp_path.iterdir()) == []


def test_the_export_holds_one_piece_of_a_tensor_at_a_time(tiny_checkpoints, tmp_path, monkeypatch):
    """Memory bound of the streamed export: tensors are read in pieces (here 1 KB, so every weight is
    several), each gone before the next is read; the export is still exact. No gc.collect() between
    reads: a piece must be freed by reference counting alone (a piece kept alive by a cycle counts as
    held), and collecting per piece made this the suite's slowest test."""
    import weakref

    import qcompiler.frontends.hf_stream as hf_stream
    import qcompiler.frontends.safetensors_index as index

    monkeypatch.setattr(index, "PIECE_BYTES", 1024)
    real, alive, live_at_read, sizes = hf_stream.read_fp32_pieces, [], [], []

    def tracked(t, transpose=False):
        for piece in real(t, transpose):
            live_at_read.append(sum(r() is not None for r in alive))
            alive.append(weakref.ref(piece))
            sizes.append(piece.nbytes)
            yield piece

    monkeypatch.setattr(hf_stream, "read_fp32_pieces", tracked)
    folder = str(tiny_checkpoints["llama"])
    streamed = load_model(folder, cache_dir=tmp_path / "a", stream=True)
    # a piece is 1 KB or one row if wider: the widest is a row of the transposed 512-token head, 2 KB
    assert len(sizes) > 100 and max(sizes) == 2048 and max(live_at_read) == 0, (max(sizes), max(live_at_read))
    assert sorted(sizes)[len(sizes) // 2] <= 1024
    got, _ = _run(streamed.onnx_path)
    want, _ = _run(load_model(folder, cache_dir=tmp_path / "b", stream=False).model)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
