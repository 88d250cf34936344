"""The bench harness: grid, results page, worker failures, and the whole --quick run end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tools.qbench import report, runner
from tools.qbench.grid import BY_NAME, METHODS, REFERENCE, SETTINGS, RowSpec, Setting, plan_rows
from tools.qbench.store import ResultStore
from tools.qbench.worker import WorkerSpec
from tools.qbench.worker import main as worker_main

ROOT = Path(__file__).resolve().parents[1]


def test_setting_keys_round_trip_and_bad_keys_are_refused():
    for s in SETTINGS:
        assert Setting.parse(s.key) == s
    assert Setting.parse("w3-b128-sym").label == "3-bit block 128 sym"
    for bad in ("w4-b128", "4-128-sym", "w4-b128-both", "wx-b1-sym"):
        with pytest.raises(ValueError, match="bad setting"):
            Setting.parse(bad)


def test_plan_runs_each_method_only_where_it_is_supported():
    rows = plan_rows(["m"], list(SETTINGS), [m.name for m in METHODS] + ["fp32", "ort-int8-dynamic"])
    by = {}
    for r in rows:
        by.setdefault(r.method, set()).add(r.setting)
    assert by["fp32"] == by["ort-int8-dynamic"] == {REFERENCE}
    assert by["rtn"] == by["cafeq+gptaq"] == {s.key for s in SETTINGS}
    assert "w3-b128-sym" not in by["ort-default"] and "w2-b32-asym" in by["ort-default"]
    assert by["ort-gptq"] == by["ort-kquant"] == {"w4-b32-asym", "w4-b32-sym", "w4-b128-sym", "w4-b128-asym"}
    assert by["ort-hqq"] == {"w4-b32-asym", "w4-b128-asym", "w2-b32-asym", "w8-b128-asym"}
    assert by["onnxsim-gptq"] == by["onnxsim-int4"] == {"w4-b32-sym"}
    assert by["onnxsim-hqq"] == {"w4-b32-asym"}
    assert len(rows) == len({r.key for r in rows})
    costs = [BY_NAME[r.method].cost for r in rows if r.setting != REFERENCE]
    assert costs == sorted(costs)  # cheap rows first
    with pytest.raises(ValueError, match="unknown method"):
        plan_rows(["m"], list(SETTINGS), ["rtn", "magic"])


def _row(model, setting, method, **kw):
    return {"model": model, "setting": setting, "method": method, "status": "ok", **kw}


def _data():
    rows = [
        _row("enc", REFERENCE, "fp32", mean_cos=1.0, min_cos=1.0, spearman=1.0, nn_agreement=1.0),
        _row("enc", "w4-b128-sym", "rtn", mean_cos=0.94, min_cos=0.9, spearman=0.95, nn_agreement=0.7,
             compile_s=1.0, peak_rss_mb=900, size_mb=50.0, latency_ms=10.0, latency_vs_fp32=1.1,
             runs_in_plain_ort=True),
        _row("enc", "w4-b128-sym", "gptq", mean_cos=0.97, min_cos=0.94, spearman=0.97, nn_agreement=0.8,
             compile_s=30.0, others_cpu=0.45),
        {"model": "enc", "setting": "w4-b128-sym", "method": "ort-gptq", "status": "failed",
         "reason": "timed out after 10 s"},
        _row("lm", REFERENCE, "fp32", perplexity=24.9),
        _row("lm", "w3-b128-sym", "rtn", perplexity=140.2, compile_s=4.0, others_cpu=0.05),
        _row("lm", "w3-b128-sym", "gptaq", perplexity=70.3),
    ]
    return {"meta": {"machine": "test box", "runs": [{"command": "python tools/bench.py", "started": "now",
                                                      "wall_s": 60.0, "rows": 7}]},
            "models": {"enc": {"kind": "encoder", "fingerprint": {"task": "t", "calib": "1 x 1"}},
                       "lm": {"kind": "lm", "fingerprint": {"task": "t", "calib": "1 x 1"}}},
            "rows": {f"{r['model']}/{r['setting']}/{r['method']}": r for r in rows}}


def test_results_page_bolds_the_best_row_and_shows_failed_and_pending_rows():
    data = _data()
    plan = [RowSpec(r["model"], r["setting"], r["method"]) for r in data["rows"].values()]
    plan.append(RowSpec("lm", "w3-b128-sym", "cafeq"))
    md = report.markdown(data, plan)
    assert "**0.9700**" in md and "**0.9400**" not in md  # higher cosine wins
    assert "**70.30**" in md and "**140.20**" not in md  # lower perplexity wins
    assert "failed: timed out after 10 s" in md
    assert "| cafeq | pending (not measured yet) |" in md
    # a peer's known failure mode is explained once, under the method table; methods without one add nothing
    assert md.count("odd number of blocks") == 1 and "- ort-gptq: ONNX Runtime 1.31 packs" in md
    assert "test box" in md and "`python tools/bench.py`" in md
    assert "10.0 (1.10x)" in md
    assert "| 30.0 (busy 45%) |" in md and "| 4.0 |" in md  # other jobs' CPU flags a compile time above 10%
    # a model's reading note sits under its own heading only
    assert "Note:" not in md
    rows = {k.replace("lm/", "smollm2/", 1): {**r, "model": "smollm2"} for k, r in data["rows"].items()
            if r["model"] == "lm"}
    md = report.markdown({**data, "rows": rows, "models": {"smollm2": data["models"]["lm"]}}, [])
    assert md.count("Note: SmolLM2's only offline copy is a Q4_1") == 1
    assert md.index("## smollm2") < md.index("Note: SmolLM2") < md.index("### 3-bit")
    table = report.summary_table(data, plan)
    assert "| gptaq | **70.30** |" in table and "fp32 24.90" in table
    assert "| cafeq |" not in table and "Not measured yet on lm: methods cafeq." in table  # no measured row yet
    plan.append(RowSpec("lm", "w2-b32-asym", "rtn"))
    table = report.summary_table({**data, "rows": {**data["rows"], "lm/w3-b128-sym/cafeq": {
        "model": "lm", "setting": "w3-b128-sym", "method": "cafeq", "status": "ok", "perplexity": 99.0}}}, plan)
    assert "Not measured yet on lm: settings 2-bit block 32 asym." in table
    assert "| cafeq | 99.00 |" in table


def test_readme_block_is_replaced_and_nothing_else(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\nafter\n")
    assert report.write_readme(readme, "| new |")
    assert readme.read_text() == f"intro\n{report.README_BEGIN}\n| new |\n{report.README_END}\nafter\n"
    other = tmp_path / "other.md"
    other.write_text("no block\n")
    assert not report.write_readme(other, "x") and other.read_text() == "no block\n"


def test_store_refuses_rows_measured_on_other_inputs(tmp_path):
    store = ResultStore(tmp_path / "r.json")
    store.models["m"] = {"fingerprint": {"task": "a"}}
    store.put("m/x/rtn", {"status": "ok"})
    again = ResultStore(tmp_path / "r.json")
    assert again.done("m/x/rtn")
    again.check_model("m", {"task": "a"})
    with pytest.raises(ValueError, match="--fresh"):
        again.check_model("m", {"task": "b"})


def test_worker_failure_is_one_line_in_stats(tmp_path):
    np.save(tmp_path / "calib.npy", np.ones((1, 8), np.int64))
    spec = WorkerSpec(str(tmp_path / "missing"), str(tmp_path / "missing.onnx"), "rtn", "w4-b32-sym",
                      str(tmp_path / "calib.npy"), str(tmp_path / "out.onnx"), str(tmp_path / "stats.json"))
    spec.write(tmp_path / "spec.json")
    assert worker_main([str(tmp_path / "spec.json")]) == 1
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert "error" in stats and "\n" not in stats["error"]
    assert not (tmp_path / "out.onnx").exists()


def test_bad_arguments_exit_2(tmp_path):
    for args in (["--models", "gpt5"], ["--settings", "w4-b128"], ["--methods", "rtn,magic"], ["--jobs", "0"]):
        p = subprocess.run([sys.executable, str(ROOT / "tools/bench.py"), "--out", str(tmp_path), *args],
                           capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.startswith("error: "), p.stderr
    assert not (tmp_path / "results.json").exists()


def test_quick_run_end_to_end_then_resume(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "tools/bench.py"), "--quick", "--out", str(out), "--cache-dir", str(cache), "-q"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    # two rows at a time (--quick's default --jobs 2): 65 s alone on 2026-12-07, against 119 s one at a time
    # (224 s one at a time on a slower day); CI may share the cores
    assert wall < 240, f"--quick took {wall:.0f} s"
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    methods = {r["method"] for r in rows.values()}
    assert methods == set(BY_NAME)  # every method, ours and the peers', ran at least once
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r.get("reason"))
        assert r["runs_in_plain_ort"] and r["size_mb"] > 0 and r["latency_ms"] > 0, key
        if r["method"] != "fp32":
            assert r["compile_s"] >= 0 and r["peak_rss_mb"] > 20, key  # a process with onnxruntime loaded
            assert 0 <= r["others_cpu"] <= 1, key
        # which code measured the row (a checkout's commit, marked when the code differs from it) and when
        assert r["code"] == runner.code_version() and r["code"].split("+")[0] and r["measured"][:2] == "20", key
        if r["model"] == "tiny-bert":
            assert 0.9 < r["mean_cos"] <= 1.0 + 1e-9 and -1 <= r["spearman"] <= 1, key
        else:
            assert math.isfinite(r["perplexity"]), key
    # tiny models' weights are small: every quantizer should stay near fp32, and none should be far off
    ppl = {r["method"]: r["perplexity"] for r in rows.values() if r["model"] == "tiny-llama"}
    assert all(abs(v / ppl["fp32"] - 1) < 0.1 for v in ppl.values()), ppl
    md = (out / "results.md").read_text()
    assert "## tiny-bert" in md and "## tiny-llama" in md and "**" in md
    for name in ("tiny-bert_quality.png", "tiny-llama_size_latency.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # a second run resumes: nothing is measured again, the rows are the same
    subprocess.run(cmd, check=True, capture_output=True)
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == rows and again["meta"]["runs"][-1]["rows"] == 0 and len(again["meta"]["runs"]) == 2


def test_committed_readme_table_is_the_one_results_json_gives():
    results = ROOT / "bench" / "results.json"
    if not results.exists():
        pytest.skip("no committed bench results")
    from tools.qbench.grid import full_plan

    data = json.loads(results.read_text())
    assert report.readme_block(ROOT / "README.md") == report.summary_table(data, full_plan()).strip()


def test_watch_kills_a_row_past_its_time_or_memory():
    from tools.qbench.runner import _watch

    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    assert _watch(slow, timeout=0.5, max_rss_gb=100) == "timed out after 0 s" and slow.returncode is not None
    hog = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(400 * 2**20); time.sleep(30)"])
    assert _watch(hog, timeout=60, max_rss_gb=0.2) == "used more than 0.2 GB of memory"
    ok = subprocess.Popen([sys.executable, "-c", "pass"])
    assert _watch(ok, timeout=60, max_rss_gb=100) is None and ok.returncode == 0


def test_a_worker_does_not_inherit_its_parents_peak_memory():
    """The bench's runner holds the fp32 model; its workers' peaks must be their own."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from qcompiler.resources import peak_rss_mb; print(peak_rss_mb())")
    ballast = bytearray(600 * 2**20)  # this process: > 600 MiB resident
    ballast[::4096] = b"x" * len(ballast[::4096])
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 300, child
    del ballast


def test_a_timeout_names_the_last_progress_and_spares_the_methods_other_settings(tmp_path):
    from tools.qbench.runner import last_progress, timed_out_elsewhere

    assert last_progress("loading\rProgress: [##   ] 10.00%\rProgress: [###  ] 15.70%") == "15.70%"
    assert last_progress("no bar here") is None
    store = ResultStore(tmp_path / "results.json")
    store.put("m/w4-b32-asym/ort-gptq", {"model": "m", "setting": "w4-b32-asym", "method": "ort-gptq",
                                         "status": "failed", "reason": "timed out after 1800 s, its log's "
                                         "last progress 9.92%", "timed_out_s": 1800})
    store.put("m/w4-b32-asym/gptq", {"model": "m", "setting": "w4-b32-asym", "method": "gptq",
                                     "status": "failed", "reason": "used more than 16 GB of memory"})
    why = timed_out_elsewhere(store, RowSpec("m", "w4-b128-sym", "ort-gptq"), timeout=1800)
    assert why.startswith("not run: ort-gptq timed out on m at w4-b32-asym (timed out after 1800 s")
    assert timed_out_elsewhere(store, RowSpec("m", "w4-b128-sym", "ort-gptq"), timeout=3600) is None  # longer now
    assert timed_out_elsewhere(store, RowSpec("m", "w4-b32-asym", "ort-gptq"), timeout=1800) is None  # itself
    assert timed_out_elsewhere(store, RowSpec("m", "w4-b128-sym", "gptq"), timeout=1800) is None  # not a timeout
    assert timed_out_elsewhere(store, RowSpec("other", "w4-b128-sym", "ort-gptq"), timeout=1800) is None
    # a timeout on a smaller model spares the bigger one's rows at every setting, not the other way round
    store.put("minilm/w4-b32-sym/onnxsim-awq", {"model": "minilm", "setting": "w4-b32-sym", "method": "onnxsim-awq",
                                                "status": "failed", "reason": "timed out after 1500 s",
                                                "timed_out_s": 1500})
    why = timed_out_elsewhere(store, RowSpec("smollm2", "w4-b32-sym", "onnxsim-awq"), timeout=1500)
    assert why.startswith("not run: onnxsim-awq timed out on minilm at w4-b32-sym (timed out after 1500 s")
    assert timed_out_elsewhere(store, RowSpec("smollm2", "w4-b32-sym", "onnxsim-awq"), timeout=3000) is None
    store.put("smollm2/w4-b32-asym/ort-gptq", {"model": "smollm2", "setting": "w4-b32-asym", "method": "ort-gptq",
                                               "status": "failed", "reason": "timed out after 1800 s",
                                               "timed_out_s": 1800})
    assert timed_out_elsewhere(store, RowSpec("minilm", "w4-b32-asym", "ort-gptq"), timeout=1800) is None
