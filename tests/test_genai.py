"""onnxruntime-genai: a model of its builder as our input, and folders its generator loads as they are.

onnxruntime-genai needs plain ``onnxruntime``, which clashes with the project's onnxruntime-gpu: the builder
and the generator run in the venv of ``tools/genai_env.sh`` (created on first use, about 5 s), by subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from qcompiler.analyze import analyze
from qcompiler.config import CafeqConfig, CompileConfig, QuantConfig
from qcompiler.errors import ConfigError
from qcompiler.frontends import load_model
from qcompiler.frontends.base import LoadedModel
from qcompiler.frontends.tiny import make_tiny_checkpoint
from qcompiler.inspect.verify import fold_check, random_transforms
from qcompiler.metadata import EOS_TOKEN_IDS, KV_CACHE_TRANSFORMED, model_properties
from qcompiler.package import GENAI_CONFIG, check_genai_source, write_genai_folder
from qcompiler.passes.online_transform import online_ops
from qcompiler.pipeline import compile_model
from qcompiler.runtime.generate import generate
from qcompiler.runtime.inputs import past_feeds
from qcompiler.runtime.session import SessionOptions
from qcompiler.runtime.validate import run

sys.path.insert(0, str(Path(__file__).parent))
from test_generate import _word_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [10, 20, 30, 40, 50]
NEW = 6


@pytest.fixture(scope="module")
def genai_python() -> str:
    done = subprocess.run([str(ROOT / "tools" / "genai_env.sh")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"tools/genai_env.sh failed (CI must create the venv): {done.stderr[-500:]}"
    return str(ROOT / done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    folder = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("genai") / "llama")
    _word_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def builder_model(genai_python, llama_folder, tmp_path_factory) -> Path:
    """The builder's fp32 model of the tiny Llama (GroupQueryAttention, packed QKV, SkipSimplifiedLayerNorm)."""
    return _build(genai_python, llama_folder, tmp_path_factory.mktemp("builder") / "fp32")


def _build(genai_python: str, hf_folder: Path, out: Path) -> Path:
    cmd = [genai_python, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_folder), "-i", str(hf_folder),
           "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "hf_cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0 or not (out / "model.onnx").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"onnxruntime-genai's model builder cannot run offline on a tiny Llama config: {tail[0]}")
    return out / "model.onnx"


@pytest.fixture(scope="module")
def tied_builder_model(genai_python, llama_folder, tmp_path_factory) -> Path:
    """The builder's fp32 model of the tiny Llama with its head tied to the table: ``Gather(Transpose(W))`` and
    ``MatMul(x, W)``, one initializer."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("tied") / "llama"
    model = tf.AutoModelForCausalLM.from_pretrained(llama_folder)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(folder)
    _word_tokenizer(folder)
    return _build(genai_python, folder, folder.parent / "fp32")


def genai_tokens(python: str, folder: Path, prompt=PROMPT, new: int = NEW) -> list[int]:
    """Greedy tokens of onnxruntime-genai's generator on ``folder`` (tools/genai_generate.py, in the venv); it
    stops at an end token, which it does not return."""
    cmd = [python, str(ROOT / "tools" / "genai_generate.py"), str(folder), "--ids", *map(str, prompt), "-n",
           str(new), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)["tokens"]


def our_tokens(model_path, prompt=PROMPT, new: int = NEW) -> list[int]:
    """Our loop's greedy tokens, up to the end token the model records (dropped, as genai drops it)."""
    eos = json.loads(model_properties(onnx.load(str(model_path), load_external_data=False))[EOS_TOKEN_IDS])
    result = generate(str(model_path), np.array(prompt), max_new_tokens=new)
    tokens = result.tokens[0, :result.lengths[0]].tolist()
    return tokens[:-1] if tokens[-1] in eos else tokens


def assert_same_greedy(got: list[int], model_path, prompt=PROMPT, new: int = NEW) -> None:
    """genai's greedy tokens (``got``) are our loop's on the same file, up to a near tie: the two run different
    onnxruntime builds (the venv's CPU 1.32, ours), so where the first token differs it must be within 1e-4 of
    the logit range of our choice at that position (after it the continuations may part)."""
    ours = our_tokens(model_path, prompt, new)
    k = next((i for i, (a, b) in enumerate(zip(got, ours, strict=False)) if a != b), None)
    if k is None:
        assert len(got) == len(ours), (got, ours)
        return
    model = onnx.load(str(model_path))
    ids = np.array([list(prompt) + ours[:k]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **past_feeds(model, 1)}
    logits = run(model, feeds, SessionOptions(device="cpu"))["logits"][0, -1].astype(np.float64)
    gap = logits[ours[k]] - logits[got[k]]
    assert gap <= 1e-4 * (logits.max() - logits.min()), f"genai {got} != ours {ours} at {k} (logit gap {gap:.3g})"


def _decode_logits(model: onnx.ModelProto, steps: int = 3) -> np.ndarray:
    """Last-position logits of a prefill and ``steps`` greedy decode steps, each feeding its own present."""
    exact = SessionOptions(device="cpu", optimize=False)
    ids = np.array([PROMPT], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **past_feeds(model, 1)}
    out = []
    for _ in range(steps + 1):
        o = run(model, feeds, exact)
        out.append(o["logits"][:, -1])
        feeds = {"input_ids": o["logits"][:, -1].argmax(-1)[:, None].astype(np.int64),
                 "attention_mask": np.ones((1, feeds["attention_mask"].shape[1] + 1), np.int64),
                 **{"past_key_values." + k[len("present."):]: v for k, v in o.items() if k.startswith("present.")}}
    return np.stack(out)


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_builder_model_sites_pairs_and_exact_folds(builder_model):
    loaded = load_model(str(builder_model))
    assert loaded.kind == "causal_lm" and loaded.tokenizer_dir == str(builder_model.parent)
    a = analyze(loaded.model)
    ids = [s.id for s in a.sites]
    assert ids == [f"model.layers.{i}.{m}" for i in range(2) for m in
                   ("attn.qkv_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]
    assert a.sites[-1].role == "head"  # a KV-cache decoder's head is offered (8-bit by default)
    vo = a.pairs_of("attn_vo")
    assert [(p.producer, p.consumer) for p in vo] == [
        (f"model.layers.{i}.attn.qkv_proj", f"model.layers.{i}.attn.o_proj") for i in range(2)]
    # V: the last 2 KV heads x 16 of the packed [Q 4x16 | K 2x16 | V 2x16] columns, read from GQA's attributes
    assert {(p.producer_cols, p.head_dim, p.num_heads, p.num_kv_heads, p.kv_map) for p in vo} == \
        {((96, 128), 16, 4, 2, (0, 0, 1, 1))}
    assert [p.cache for p in vo] == [("present.0.value",), ("present.1.value",)]
    mlp = a.pairs_of("mlp_up_down")  # through SkipSimplifiedLayerNormalization's neighbours
    assert [(p.producer, p.gate, p.consumer) for p in mlp] == [
        (f"model.layers.{i}.mlp.up_proj", f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.down_proj")
        for i in range(2)]
    assert not a.pair_rejections

    # exact: random transforms folded into every pair leave the logits of a prefill and decode steps unchanged
    # (the cache then holds V M_h, written and read by the same model); a wrong head map does not
    reference = _decode_logits(loaded.model)
    checked, _ = fold_check(loaded.model, a)
    assert checked.pairs == 4
    assert _rel(_decode_logits(checked.folded), reference) < 1e-5
    wrong = [t if t.pair.kind != "attn_vo" else type(t)(
        type(t.pair)(**{**t.pair.__dict__, "kv_map": (1, 1, 0, 0)}), matrices=t.matrices)
        for t in random_transforms(a)]
    bad, _ = fold_check(loaded.model, a, wrong)
    assert _rel(_decode_logits(bad.folded), reference) > 1e-2


def test_builder_pair_rejections_say_why(builder_model):
    model = load_model(str(builder_model)).model
    leaky = onnx.ModelProto()
    leaky.CopyFrom(model)
    qkv = next(n for n in leaky.graph.node if n.name == "/model/layers.0/attn/qkv_proj/MatMul").output[0]
    leaky.graph.node.append(onnx.helper.make_node("Neg", [qkv], ["leak"], name="leak"))
    leaky.graph.output.append(onnx.helper.make_tensor_value_info("leak", onnx.TensorProto.FLOAT, None))
    a = analyze(leaky, probe=False)
    (r,) = a.pair_rejections
    assert r.producer == "model.layers.0.attn.qkv_proj" and "also flow into Neg node leak" in r.reason
    assert len(a.pairs_of("attn_vo")) == 1

    other = onnx.ModelProto()
    other.CopyFrom(model)
    for n in other.graph.node:
        if n.op_type == "GroupQueryAttention" and n.name.startswith("/model/layers.1/"):
            n.op_type = "SparseAttention"
    b = analyze(other, probe=False)
    (r,) = b.pair_rejections
    assert r.producer == "model.layers.1.attn.qkv_proj" and "SparseAttention" in r.reason and "not read" in r.reason


@pytest.mark.parametrize("method", ["rtn", "cafeq", "sinq"])
def test_builder_model_compiled_runs_in_genai(method, builder_model, genai_python, tmp_path):
    config = CompileConfig(method=method, validate=False, cafeq=CafeqConfig(steps=4, joint_rounds=1))
    out = tmp_path / "compiled.onnx"
    source = builder_model.parent if method == "rtn" else builder_model  # the builder's folder is an input too
    result = compile_model(str(source), out, config)
    folder = write_genai_folder(result.output, load_model(str(builder_model)), tmp_path / "genai")
    assert {"model.onnx", GENAI_CONFIG, "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / GENAI_CONFIG).read_text()) == {
        **json.loads((builder_model.parent / GENAI_CONFIG).read_text())}  # the builder's config, as it was
    if method != "rtn":  # V·O folded through GroupQueryAttention: the cache holds V M_h
        assert json.loads(model_properties(result.model)[KV_CACHE_TRANSFORMED]) == ["present.0.value",
                                                                                    "present.1.value"]
    if method == "sinq":  # q/k/v's and gate/up's scales sit in SkipSimplifiedLayerNormalization's gamma
        assert len(result.plan.online) == 4 and online_ops(result.model) == 0
    assert_same_greedy(genai_tokens(genai_python, folder), out)


def test_a_tied_builder_head_and_its_table_store_their_codes_once(tied_builder_model, genai_python, tmp_path):
    """The builder reads a tied table through a Transpose of the head's weight; at ``--accuracy-level 4`` the table
    and the 8-bit head are quantized, GatherBlockQuantized reads the head MatMulNBits' own codes (one initializer,
    where the float weight stayed for the table before), and onnxruntime-genai generates with the folder."""
    config = CompileConfig(quant=QuantConfig(4, 32, True), accuracy_level=4)  # symmetric: codes alone
    out = tmp_path / "compiled.onnx"
    result = compile_model(str(tied_builder_model.parent), out, config)
    roles = sorted(p.site.role for p in result.plan.sites if p.site.role != "linear")
    assert roles == ["embedding", "head"]
    nodes = result.model.graph.node
    (gbq,) = [n for n in nodes if n.op_type == "GatherBlockQuantized"]
    assert sorted(n.op_type for n in nodes if gbq.input[0] in n.input) == ["GatherBlockQuantized", "MatMulNBits"]
    assert not [t for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                and list(t.dims) in ([64, 512], [512, 64])]  # no float table or head left
    assert result.validation.max_rel_error < 0.3
    folder = write_genai_folder(result.output, load_model(str(tied_builder_model)), tmp_path / "genai")
    assert_same_greedy(genai_tokens(genai_python, folder), out)


def test_hf_folder_compiled_to_a_genai_folder(llama_folder, genai_python, cache_dir, tmp_path, capsys):
    """``qcompiler compile HF --package genai -o DIR``: the folder onnxruntime-genai loads, written whole or not
    at all (a folder that is not empty is refused before any work)."""
    from qcompiler.cli import main

    folder = tmp_path / "genai"
    assert main(["compile", str(llama_folder), "--package", "genai", "-o", str(folder), "--cache-dir",
                 str(cache_dir), "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genai"]  # no staging folder left behind
    assert main(["compile", str(llama_folder), "--package", "genai", "-o", str(folder), "-q"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["compile", str(llama_folder), "--package", "genai", "--no-kv-cache", "-o", str(tmp_path / "x"),
                 "-q"]) == 2
    config = json.loads((folder / GENAI_CONFIG).read_text())
    d = config["model"]["decoder"]
    assert (d["num_hidden_layers"], d["num_attention_heads"], d["num_key_value_heads"], d["head_size"]) == (2, 4, 2, 16)
    assert config["search"]["past_present_share_buffer"] is False  # our cache grows by Concat
    assert config["model"]["type"] == "decoder"  # genai's generic decoder (GPT-2, Qwen2, Gemma 2, Phi-3 load too)
    assert (folder / "tokenizer.json").is_file()
    assert_same_greedy(genai_tokens(genai_python, folder), folder / "model.onnx")


def test_a_model_without_a_cache_is_refused_before_compiling(builder_model, tmp_path):
    check_genai_source(load_model(str(builder_model)))  # a builder model: its folder has what is needed
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])
    w = onnx.numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    plain = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
                                                          "plain", [x], [y], [w]))
    with pytest.raises(ConfigError, match="not a KV-cache decoder"):
        check_genai_source(LoadedModel(plain, "plain.onnx", "onnx", onnx_path=str(tmp_path / "plain.onnx")))


def test_builder_folder_runs_in_generate_and_eval_as_it_is(builder_model, tmp_path, capsys):
    """``qcompiler generate FOLDER`` and ``eval FOLDER --perplexity`` on the builder's folder: the cache layout,
    end ids and tokenizer come from the folder (its graph records none); a folder that is no model is refused."""
    from qcompiler.cli import main
    from qcompiler.frontends.onnx_file import runnable_model

    folder = builder_model.parent
    model = runnable_model(folder)
    assert isinstance(model, onnx.ModelProto) and json.loads(model_properties(model)[EOS_TOKEN_IDS])
    tokens = generate(model, np.array(PROMPT), max_new_tokens=4, eos_token_id=()).tokens
    assert tokens.shape == (1, 4)
    capsys.readouterr()
    assert main(["generate", str(folder), "--prompt", "hello world", "--max-new-tokens", "4"]) == 0
    assert "prefill: " in capsys.readouterr().err
    text = tmp_path / "words.txt"
    text.write_text(" ".join(["the jargon file describes hacker words and programs"] * 200))
    assert main(["eval", str(folder), "--perplexity", "--text", str(text), "--windows", "1", "--window-length",
                 "32", "-q", "--json", str(tmp_path / "ppl.json")]) == 0
    assert np.isfinite(json.loads((tmp_path / "ppl.json").read_text())["perplexity"]["perplexity"])
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    assert "genai_config.json" in capsys.readouterr().err
