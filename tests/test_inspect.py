"""``qcompiler inspect``: JSON and text views, the diff, and the HTML page in a real headless browser."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest

from qcompiler.cli import main
from qcompiler.config import CompileConfig, QuantConfig
from qcompiler.inspect import inspect_model
from qcompiler.inspect.html import render_html
from qcompiler.inspect.layout import assign_blocks, block_of
from qcompiler.metadata import module_paths
from qcompiler.pipeline import compile_model


def _json(argv, capsys) -> dict:
    assert main(["inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def compiled_minilm(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "minilm.q.onnx"
    compile_model(minilm.onnx_path, out, CompileConfig(quant=QuantConfig(4, 32, False), validate=False))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_inspect_json_on_tiny_models(family, pair_checkpoints, cache_dir, capsys):
    j = _json([str(pair_checkpoints[family]), "--cache-dir", str(cache_dir)], capsys)
    assert {"sites", "pairs", "groups", "rejected"} <= set(j)
    vo = [p for p in j["pairs"] if p["kind"] == "attn_vo"]
    mlp = [p for p in j["pairs"] if p["kind"] == "mlp_up_down"]
    assert len(vo) == 2 and len(mlp) == 2
    want = [0, 0, 1, 1] if family == "llama" else [0, 1, 2, 3]
    assert all(p["kv_map"] == want and p["heads"] == 4 and p["head_dim"] == 16 for p in vo)
    assert all(p["producer"] and p["consumer"] for p in j["pairs"])


def test_inspect_compiled_model_reads_quantization_and_paths(compiled_minilm, capsys):
    j = _json([str(compiled_minilm)], capsys)
    assert len(j["sites"]) == 36
    s = j["sites"][0]
    assert s["state"] == "quantized" and s["op"] == "MatMulNBits" and s["bits"] == 4 and s["block_size"] == 32
    assert s["id"] == "encoder.layer.0.attention.self.query"  # module path carried through the compile
    assert 0 < s["rel_error"] < 0.2 and s["method"] == "rtn"
    assert sum(p["kind"] == "attn_vo" for p in j["pairs"]) == 6
    assert sum(p["kind"] == "mlp_up_down" for p in j["pairs"]) == 6


def test_inspect_qdq_compiled_model(pair_checkpoints, cache_dir, tmp_path, capsys):
    out = tmp_path / "llama.qdq.onnx"
    compile_model(str(pair_checkpoints["llama"]), out, CompileConfig(format="qdq", validate=False, kv_cache=False),
                  cache_dir=cache_dir)
    j = _json([str(out)], capsys)
    assert len(j["sites"]) == 14 and all(s["storage"] == "DequantizeLinear" for s in j["sites"])
    assert {s["bits"] for s in j["sites"]} == {4} and all(s["rel_error"] is not None for s in j["sites"])
    vo = [p for p in j["pairs"] if p["kind"] == "attn_vo"]
    assert len(vo) == 2 and all(p["kv_map"] == [0, 0, 1, 1] for p in vo)
    assert sum(p["kind"] == "mlp_up_down" for p in j["pairs"]) == 2


def test_inspect_diff_against_original(compiled_minilm, minilm, capsys):
    j = _json([str(compiled_minilm), "--against", minilm.onnx_path], capsys)
    d = j["diff"]
    assert {x["op"] for x in d["nodes_added"]} == {"MatMulNBits"} and len(d["nodes_added"]) == 36
    assert {x["op"] for x in d["nodes_removed"]} == {"MatMul"} and len(d["nodes_removed"]) == 36
    assert d["bytes_after"] < 0.65 * d["bytes_before"]
    new = [r for r in d["initializers"] if r["before"] == 0]
    assert len(new) >= 72 and all(r["after"] > 0 for r in new)  # packed weights + scales (+ zero points)
    assert all(r["site"] for r in new) and all(r["site"] for r in d["initializers"] if r["after"] == 0)


def test_inspect_text_shows_rejection_reasons(minilm, capsys):
    assert main(["inspect", minilm.onnx_path]) == 0
    out = capsys.readouterr().out
    assert "6 attn_vo + 6 mlp_up_down pairs" in out
    assert "weight computed at run time" in out and "embedding table" in out


def test_blocks_follow_module_paths(minilm):
    assert block_of("encoder.layer.3.attention.self.value") == "encoder.layer.3"
    assert block_of("model.layers.12.mlp") == "model.layers.12"
    assert block_of("transformer.h.0.attn") == "transformer.h.0"
    assert block_of("lm_head") is None
    blocks = assign_blocks(minilm.model, module_paths(minilm.model))
    assert [b for b in blocks if b.startswith("encoder")] == [f"encoder.layer.{i}" for i in range(6)]
    assert sum(len(v) for v in blocks.values()) == sum(n.op_type != "Constant" for n in minilm.model.graph.node)


def test_html_is_self_contained(compiled_minilm, minilm):
    ins = inspect_model(onnx.load(compiled_minilm), "compiled", against=minilm.model, with_graph=True)
    page = render_html(ins)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<link" not in page and "src=" not in page
    assert page.count('"name": "encoder.layer.') == 6
    assert "Diff against the original" in page


def _chromium() -> str | None:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.environ.get("QCOMPILER_REQUIRE_BROWSER"):
        pytest.fail("chromium is required (make setup installs it)")
    return path


def _browser(page: Path, *args: str) -> subprocess.CompletedProcess:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on this machine")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-background-networking", "--disable-extensions", "--hide-scrollbars", "--mute-audio"]
    return subprocess.run([chromium, *flags, *args, page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "HOME": str(page.parent)})


@pytest.mark.parametrize("which", ["original", "compiled"])
def test_html_renders_in_headless_chromium(which, compiled_minilm, minilm, tmp_path):
    page = tmp_path / f"{which}.html"
    argv = ["inspect", minilm.onnx_path, "--html", str(page)] if which == "original" else [
        "inspect", str(compiled_minilm), "--against", minilm.onnx_path, "--html", str(page)]
    assert main(argv) == 0
    dom = _browser(page, "--virtual-time-budget=5000", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-1000:]
    assert 'data-rendered="ok"' in dom.stdout, dom.stdout[:500]
    assert '<div id="errors"></div>' in dom.stdout
    assert dom.stdout.count('class="node') > 30  # the block's nodes were drawn as SVG
    if which == "compiled":
        assert 'class="node site-quant pair-vo quant-op added"' in dom.stdout
    shot = tmp_path / f"{which}.png"
    res = _browser(page, "--window-size=1400,1100", f"--screenshot={shot}")
    assert res.returncode == 0 and shot.stat().st_size > 30_000
    keep = os.environ.get("QCOMPILER_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / shot.name)


def test_inspect_verify_folds_random_transforms(pair_checkpoints, cache_dir, capsys):
    j = _json([str(pair_checkpoints["qwen2"]), "--cache-dir", str(cache_dir), "--verify"], capsys)
    assert j["verify"]["pairs_folded"] == 4
    assert j["verify"]["max_rel_change"] < 1e-5


def test_inspect_lists_ops_with_weights_that_are_not_sites():
    """A Conv / ConvTranspose with a constant weight shows in the text, JSON and HTML views, with a reason."""
    from qcompiler.inspect.text import render_page_written, render_text
    from tests.graphs import conv_model

    ins = inspect_model(conv_model(), "conv.onnx", with_graph=True)
    text = render_text(ins)
    assert "patch_embed (Conv): not a MatMul/Gemm site: constant weight [16, 3, 4, 4] kept in float" in text
    assert "deconv (ConvTranspose): not a MatMul/Gemm site" in text
    rejected = {r["node"]: r for r in ins.to_json()["rejected"]}
    assert rejected["patch_embed"]["op_type"] == "Conv" and "MatMul/Gemm" in rejected["deconv"]["reason"]
    page = render_html(ins)
    assert "patch_embed" in page and "ConvTranspose" in page
    assert render_page_written(ins, "p.html").splitlines() == [
        "conv.onnx: 0 float sites, 0 quantized, 0 attn_vo + 0 mlp_up_down pairs, 0 sibling groups, 3 rejected",
        "page written: p.html"]
