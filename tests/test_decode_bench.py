"""tools/decode_bench.py: files built once and reused (stamps), other accuracy levels derived; on a tiny Llama in
our loop (no genai venv): rounds and quality measured, ratios to fp32, the table written between its markers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from qcompiler.config import CompileConfig, QuantConfig
from qcompiler.frontends import load_model
from qcompiler.pipeline import compile_model
from tools import decode_bench as db


def _word_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 512)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)


def _fake_model(path: Path, level: int = 4) -> None:
    node = onnx.helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=32, N=8, bits=4,
                                 block_size=32, accuracy_level=level)
    graph = onnx.helper.make_graph([node], "g", [], [])
    onnx.save(onnx.helper.make_model(graph), str(path))


def test_build_reuses_stamped_files_and_derives_levels(tmp_path, monkeypatch, caplog):
    ran: list[list[str]] = []

    def fake_run(cmd, log_path):
        ran.append(cmd)
        _fake_model(Path(cmd[cmd.index("-o") + 1]))
        return 1.0

    monkeypatch.setattr(db, "_run", fake_run)
    args = db.parse_args(["--variants", "fp32,rtn", "--no-genai"])
    entries, commands = db.build(args, tmp_path / "hf", tmp_path, None)
    assert [(e.name, e.level) for e in entries] == [("fp32", None), ("rtn", 4), ("rtn", 1)]
    assert [c[3] for c in ran] == ["export", "compile"] and "--accuracy-level" in ran[1]
    assert commands["rtn acc1"] == {"derived": "rtn-w4-b128-sym-acc4.onnx with accuracy_level=1"}
    level1 = onnx.load(str(tmp_path / "rtn-w4-b128-sym-acc1.onnx")).graph.node[0]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in level1.attribute}["accuracy_level"] == 1
    db.build(args, tmp_path / "hf", tmp_path, None)
    assert len(ran) == 2  # stamps match: nothing rebuilt
    db.build(db.parse_args(["--variants", "fp32,rtn", "--no-genai", "--bits", "8"]), tmp_path / "hf", tmp_path, None)
    assert len(ran) == 3 and "8" in ran[2]  # a new setting: a new file
    # files built by other code are kept, with a warning naming the option that refreshes them
    monkeypatch.setattr(db, "code_version", lambda: "abc1234")
    with caplog.at_level("WARNING", logger="decode_bench"):
        db.build(args, tmp_path / "hf", tmp_path, None)
    assert len(ran) == 3 and "--rebuild rtn builds it again" in caplog.text
    db.build(db.parse_args(["--variants", "fp32,rtn", "--no-genai", "--rebuild", "rtn"]), tmp_path / "hf", tmp_path,
             None)
    assert len(ran) == 4 and ran[3][3] == "compile"  # only rtn, built again
    assert json.loads(db._stamp(tmp_path / "rtn-w4-b128-sym-acc4.onnx").read_text())["code"] == "abc1234"
    with pytest.raises(SystemExit):
        db.parse_args(["--variants", "nope"])


def test_measures_a_tiny_llama_in_our_loop(tiny_checkpoints, cache_dir, tmp_path):
    loaded = load_model(str(tiny_checkpoints["llama"]), cache_dir=cache_dir)
    rtn = tmp_path / "rtn.onnx"
    compile_model(loaded.onnx_path, rtn, CompileConfig(quant=QuantConfig(group_size=32), validate=False))
    entries = [db.Entry("fp32", None, Path(loaded.onnx_path), "qc"), db.Entry("rtn", 1, rtn, "qc")]
    _word_tokenizer(tmp_path / "tok")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(3, 512, 400)))
    args = argparse.Namespace(windows=2, window_length=16, prompt_tokens=8, new_tokens=5, prompts=2, rounds=2)
    tokens = db.token_sets(str(tmp_path / "tok"), text, args)
    assert tokens["windows"].shape == (2, 16) and tokens["speed"].shape == (8,) and tokens["prompts"].shape == (2, 8)
    loops = {"qc": db.OurLoop(entries)}
    rounds = db.measure_speed(loops, entries, tokens, args)
    quality = db.measure_quality(loops, entries, tokens, args, tmp_path / "q")
    assert db.measure_quality(loops, entries, tokens, args, tmp_path / "q") == quality  # cached per file
    rows = {r["model"]: r for r in db.summarize(entries, rounds, quality, args.prompt_tokens, "rtn")}
    assert rows["rtn"]["ratio_to_relative"] == 1.0 and rows["fp32"]["ratio_to_relative"] is None
    assert rows["fp32"]["ratio_to_fp32"] == 1.0 and rows["fp32"]["agreement_mean"] == 5.0
    for r in rows.values():
        assert r["rounds"] == 2 and r["decode_tokens_per_s"] > 0 and np.isfinite(r["perplexity"])
        assert 0 <= r["agreement_mean"] <= 5 and r["ratio_to_fp32"] > 0
    # teacher-forced top-1 agreement over the perplexity windows' 2 x 15 scored positions
    assert np.asarray(quality["fp32 @qc"]["top1"]).shape == (2, 15)
    assert rows["fp32"]["top1_match"] == 1.0 and 0 <= rows["rtn"]["top1_match"] <= 1
    assert rows["rtn"]["top1_match"] == db.top1_match(quality["rtn acc1 @qc"]["top1"], quality["fp32 @qc"]["top1"])
    assert db.top1_match([[1, 2], [3, 4]], [[1, 0], [3, 4]]) == 0.75 and db.top1_match(None, [[1]]) is None
    result = {"command": "python tools/decode_bench.py", "date": "d", "machine": "m", "versions": {"qc": "x"},
              "model": "tiny", "setting": "4-bit block 32 sym", "rows": list(rows.values()),
              "protocol": {**vars(args), "levels": [1]}, "commands": {"rtn acc1": {"derived": "rtn acc4"}}}
    page = tmp_path / "serving.md"
    begin, end = (db.MARK.format(block="main", end=e) for e in ("begin", "end"))
    page.write_text(f"# Serving\n\nprose\n\n{begin}\nold\n{end}\n\nafter\n")
    db.write_markdown(page, db.markdown(result))
    db.write_markdown(page, "second\n", "other")
    text = page.read_text()
    assert text.startswith("# Serving\n\nprose") and "old" not in text
    assert "| rtn | 1 | ours |" in text and text.count(begin) == 1 and "| x rtn |" in text
    assert text.endswith("after\n\n<!-- decode_bench:other:begin -->\nsecond\n<!-- decode_bench:other:end -->\n")


def test_common_prefix():
    assert db.common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert db.common_prefix([5], [6]) == 0
    assert db.common_prefix([1, 2], [1, 2]) == 2


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_relevel_turns_the_8bit_head_float_below_level_4(tiny_checkpoints, cache_dir, tmp_path):
    """A KV-cache compile at level 4 rounds its head to 8 bits; the level-1 copy computes with the same values in
    a float MatMul (no slow 8-bit kernel), every other node at level 1: its logits are the 8-bit node's at level 1,
    in a file and in a genai folder (external data) alike."""
    from qcompiler.runtime.evaluate import session_feeds
    from qcompiler.runtime.session import make_session

    loaded = load_model(str(tiny_checkpoints["llama"]), cache_dir=cache_dir)
    src = tmp_path / "rtn.onnx"
    compile_model(loaded.onnx_path, src, CompileConfig(quant=QuantConfig(group_size=32), accuracy_level=4,
                                                       validate=False))
    heads = [n for n in onnx.load(str(src)).graph.node if n.op_type == "MatMulNBits" and _attrs(n)["bits"] == 8]
    assert len(heads) == 1
    reference = onnx.load(str(src))  # the same file at level 1, the 8-bit node kept
    for node in reference.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {**_attrs(node), "accuracy_level": 1}
            del node.attribute[:]
            node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in attrs.items())
    folder = tmp_path / "genai"
    folder.mkdir()
    onnx.save(onnx.load(str(src)), str(folder / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    (folder / "genai_config.json").write_text("{}")
    db.relevel(src, tmp_path / "rtn1.onnx", 1)
    db.relevel(folder, tmp_path / "genai1", 1)
    assert (tmp_path / "genai1" / "genai_config.json").exists() and (tmp_path / "genai1" / "model.onnx.data").exists()
    ids = np.array([[1, 5, 9, 3, 7, 2]], dtype=np.int64)
    ref_sess = make_session(reference)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    want = ref_sess.run(["logits"], session_feeds(ref_sess, feeds))[0]
    for path in (tmp_path / "rtn1.onnx", tmp_path / "genai1" / "model.onnx"):
        model = onnx.load(str(path))
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert nbits and all(_attrs(n)["accuracy_level"] == 1 and _attrs(n)["bits"] != 8 for n in nbits)
        assert heads[0].input[1] not in {t.name for t in model.graph.initializer}  # the packed head is gone
        sess = make_session(str(path))
        got = sess.run(["logits"], session_feeds(sess, feeds))[0]
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_relative_speed_is_taken_in_the_rows_own_loop():
    """cafeq@builder in the generator is divided by rtn@builder in the generator, not by our loop's run."""
    e = lambda name, runtime: db.Entry(name, 4, Path(f"/x/{name}-{runtime}"), runtime)  # noqa: E731
    entries = [e("rtn@builder", "genai"), e("rtn@builder", "qc"), e("cafeq@builder", "genai"), e("cafeq", "genai")]
    speeds = {"rtn@builder acc4 @genai": 80.0, "rtn@builder acc4 @qc": 100.0, "cafeq@builder acc4 @genai": 60.0,
              "cafeq acc4 @genai": 50.0}
    rounds = {k: [{"round": 0, "decode_tokens_per_s": v, "prefill_s": 1.0}] for k, v in speeds.items()}
    rows = {(r["model"], r["runtime"]): r for r in db.summarize(entries, rounds, {}, 128, "rtn@builder")}
    assert rows[("cafeq@builder", "genai")]["ratio_to_relative"] == 0.75
    assert rows[("rtn@builder", "qc")]["ratio_to_relative"] == 1.0
    del rounds["rtn@builder acc4 @genai"]
    rows = {(r["model"], r["runtime"]): r for r in db.summarize(entries[1:], rounds, {}, 128, "rtn@builder")}
    assert rows[("cafeq", "genai")]["ratio_to_relative"] == 0.5  # no generator run of rtn@builder: ours
