"""Bad input: one line naming the problem, exit code 2, no traceback, no output file."""

import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler.cli import main
from tests.graphs import mixed_model


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _nothing_model(path):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), str(path))


@pytest.fixture()
def good_onnx(tmp_path):
    p = tmp_path / "good.onnx"
    onnx.save_model(mixed_model(), str(p))
    return p


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, good_onnx):
    out = tmp_path / "out.onnx"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(good_onnx.read_bytes()[:500])
    text = tmp_path / "text.onnx"
    text.write_text("hello, I am not a model\n" * 20)
    nothing = tmp_path / "nothing.onnx"
    _nothing_model(nothing)
    cases = {
        "missing": ([str(tmp_path / "nope.onnx")], "not found"),
        "corrupt": ([str(corrupt)], "ONNX"),
        "not onnx": ([str(text)], "ONNX"),
        "nothing to quantize": ([str(nothing)], "nothing to quantize"),
        "bits": ([str(good_onnx), "--bits", "5"], "--bits"),
        "block": ([str(good_onnx), "--group-size", "48"], "--group-size"),
        "block text": ([str(good_onnx), "--group-size", "big"], "group size"),
        "no folder": ([str(good_onnx), "-o", str(tmp_path / "no" / "dir" / "x.onnx")], "does not exist"),
        "dir output": ([str(good_onnx), "-o", str(tmp_path)], "directory"),
        "format": ([str(good_onnx), "--format", "gguf"], "invalid choice"),
    }
    for name, (args, needle) in cases.items():
        argv = ["compile", *args] if "-o" in args else ["compile", *args, "-o", str(out)]
        code, err = _run(argv, capsys)
        assert code == 2, name
        assert err.count("\n") == 1 and err.startswith("qcompiler: error:"), (name, err)
        assert needle in err, (name, err)
        assert "Traceback" not in err
        assert not out.exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["good.onnx", "corrupt.onnx", "text.onnx", "nothing.onnx"])  # no temporary files left


def test_unwritable_output_leaves_nothing(tmp_path, capsys, good_onnx):
    code, err = _run(["compile", str(good_onnx), "-o", "/proc/qcompiler-test.onnx", "--no-validate"], capsys)
    assert code == 2 and "not writable" in err and err.count("\n") == 1
    assert "rtn" not in err  # refused before any work


def test_compile_and_report_on_an_onnx_file(tmp_path, capsys, good_onnx):
    import json

    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main(["compile", str(good_onnx), "-o", str(out), "--report", str(rep), "--bits", "3",
                 "--group-size", "channel", "--sym"])
    stdout = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "3 quantized" in stdout and "validation" in stdout
    report = json.loads(rep.read_text())
    assert len(report["sites"]) == 3 and report["config"]["quant"]["bits"] == 3
    assert {r["node"] for r in report["skipped"]} == {"mm_dyn", "head"}
    assert report["validation"]["max_rel_error"] < 0.5
    assert report["size"]["quantized_weights_true_bytes"] < report["size"]["quantized_weights_fp32_bytes"] / 8


def test_subprocess_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qcompiler", "compile", str(tmp_path / "x.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr


def test_bare_qcompiler_prints_help_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    assert "compile" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_a_mistyped_command_is_named(tmp_path, capsys, good_onnx):
    code, err = _run(["inpsect", str(good_onnx)], capsys)
    assert code == 2 and err.count("\n") == 1 and "'inpsect'" in err and "did you mean inspect" in err


def test_the_command_line_and_the_python_api_share_every_default():
    from qcompiler.cli import build_parser
    from qcompiler.cli.options import compile_config
    from qcompiler.config import CompileConfig

    args = build_parser().parse_args(["compile", "m.onnx"])
    assert compile_config(args) == CompileConfig()
    args = build_parser().parse_args(["compile", "m.onnx", "--no-joint-rounding", "--steps", "7", "--calib", "c.txt",
                                      "--group-size", "channel", "--sym", "--no-stream", "--transforms", "vo"])
    cfg = compile_config(args)
    assert (cfg.cafeq.steps, cfg.calib.source, cfg.quant.group_size, cfg.quant.symmetric, cfg.stream,
            cfg.cafeq.transforms) == (7, "c.txt", 0, True, False, ("vo",))


def test_compile_model_and_the_command_line_write_identical_files(tmp_path, good_onnx, capsys):
    from qcompiler.pipeline import compile_model

    compile_model(str(good_onnx), tmp_path / "api.onnx")
    assert main(["compile", str(good_onnx), "-o", str(tmp_path / "cli.onnx"), "-q"]) == 0
    assert (tmp_path / "api.onnx").read_bytes() == (tmp_path / "cli.onnx").read_bytes()


def test_default_output_names_the_setting(tmp_path, good_onnx, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compile", str(good_onnx), "--bits", "3", "--group-size", "128", "-q"]) == 0
    assert main(["compile", str(good_onnx), "--bits", "3", "--group-size", "64", "-q"]) == 0
    assert {"good.rtn-w3-b128-asym.onnx", "good.rtn-w3-b64-asym.onnx"} <= {p.name for p in tmp_path.iterdir()}


def test_compile_then_generate_and_export_from_the_command_line(tiny_checkpoints, tmp_path, capsys):
    """A causal LM compiles to a KV-cache graph by default; ``generate`` streams its greedy tokens (the same
    as the Python loop's) and reports speed; ``export`` writes the fp32 graph the compile started from."""
    import shutil

    import numpy as np

    from qcompiler.runtime.generate import generate
    from tests.test_generate import _word_tokenizer

    folder = tmp_path / "llama"
    shutil.copytree(tiny_checkpoints["llama"], folder)
    tok = _word_tokenizer(folder)
    q, fp32 = tmp_path / "q.onnx", tmp_path / "fp32.onnx"
    assert main(["compile", str(folder), "-o", str(q), "--cache-dir", str(tmp_path / "c"), "-q"]) == 0
    assert main(["export", str(folder), "-o", str(fp32), "--cache-dir", str(tmp_path / "c"), "-q"]) == 0
    assert {i.name for i in onnx.load(str(fp32)).graph.input} >= {"input_ids", "past_key_values.0.value"}
    capsys.readouterr()
    assert main(["generate", str(q), "--prompt", "w10 w20 w30", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    want = generate(str(q), np.array([[10, 20, 30]]), max_new_tokens=5)
    assert out.strip() == tok.decode(want.tokens[0, :want.lengths[0]].tolist(), skip_special_tokens=True).strip()
    assert "prefill:" in err and "decode:" in err
    code, err = _run(["generate", str(q), "--prompt", "w1", "--top-p", "0"], capsys)
    assert code == 2 and "--top-p" in err


def test_an_eight_bit_head_and_gathered_embeddings_from_the_command_line(tiny_checkpoints, tmp_path, capsys):
    """``--head-bits 8``: the output head on its own 8-bit grid in a 4-bit model; ``--gather-embeddings``: the
    quantized table read by GatherBlockQuantized. Both run and stay close to the model without them."""
    import json

    import numpy as np

    from qcompiler.runtime.generate import generate

    outs = {}
    for name, extra in {"plain": [], "head8": ["--head-bits", "8", "--gather-embeddings"]}.items():
        outs[name] = tmp_path / f"{name}.onnx"
        assert main(["compile", str(tiny_checkpoints["llama"]), "-o", str(outs[name]), "--quantize-lm-head",
                     "--quantize-embeddings", "--cache-dir", str(tmp_path / "c"), "-q", *extra]) == 0
    model = onnx.load(str(outs["head8"]))
    sites = {s["id"]: s for s in json.loads({p.key: p.value for p in model.metadata_props}["qcompiler.sites"])}
    assert sites["lm_head"]["bits"] == 8 and sites["model.layers.0.mlp.down_proj"]["bits"] == 4
    assert any(n.op_type == "GatherBlockQuantized" for n in model.graph.node)
    ids = np.array([[10, 20, 30]])
    a, b = (generate(str(outs[k]), ids, max_new_tokens=3, eos_token_id=()) for k in ("plain", "head8"))
    assert a.tokens.shape == b.tokens.shape == (1, 3)
