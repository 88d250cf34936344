"""Streaming compile: chunks keep coupled units whole; the streamed model equals the whole-model compile;
memory stays bounded by a chunk; refusals and interrupts leave nothing behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qcompiler.analyze import analyze
from qcompiler.config import CafeqConfig, CompileConfig, QuantConfig
from qcompiler.errors import ConfigError
from qcompiler.pipeline import compile_model
from qcompiler.stream import chunk_sites, released

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def external_llama(tiny_checkpoints, cache_dir, tmp_path_factory) -> Path:
    """The tiny Llama, saved as an .onnx file with external data (as large exports are)."""
    from qcompiler.frontends import load_model

    loaded = load_model(str(tiny_checkpoints["llama"]), cache_dir=cache_dir, kv_cache=False)
    folder = tmp_path_factory.mktemp("external_llama")
    path = folder / "model.onnx"
    onnx.save_model(loaded.model, str(path), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=1024)
    return path


def _values(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(5, 90, (2, 7)).astype(np.int64), "attention_mask": np.ones((2, 7), np.int64)}


def _run(path: Path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, _feeds())[0]


def test_chunks_keep_pairs_and_groups_whole(external_llama):
    analysis = analyze(onnx.load(str(external_llama)))
    assert analysis.pairs and analysis.groups
    for budget in (1, 64 * 1024, 2**40):
        chunks = chunk_sites(analysis.sites, budget, analysis.pairs, analysis.groups)
        ids = [s.id for c in chunks for s in c.sites]
        assert sorted(ids) == sorted(s.id for s in analysis.sites)  # every site exactly once
        where = {s.id: i for i, c in enumerate(chunks) for s in c.sites}
        for p in analysis.pairs:
            members = {where[m] for m in (p.producer, p.consumer, p.gate) if m}
            assert len(members) == 1, p.id
            assert p in chunks[where[p.producer]].pairs
        for g in analysis.groups:
            assert len({where[m] for m in g.members}) == 1
            assert g in chunks[where[g.members[0]]].groups
        if budget == 2**40:
            assert len(chunks) == 1
    # at a 1-byte budget every unit is a chunk of its own: here one per pair (with its sibling group)
    assert len(chunk_sites(analysis.sites, 1, analysis.pairs, analysis.groups)) == len(analysis.pairs)


@pytest.mark.parametrize("method,fmt,embed", [("rtn", "matmulnbits", False), ("rtn", "qdq", True),
                                              ("cafeq", "matmulnbits", False), ("rotate", "qdq", False),
                                              ("sinq", "matmulnbits", False)])
def test_streamed_model_equals_the_whole_model_compile(external_llama, tmp_path, method, fmt, embed):
    from qcompiler.config import MatchConfig

    base = dict(quant=QuantConfig(bits=4, group_size=32), method=method, format=fmt,
                match=MatchConfig(quantize_embeddings=embed), cafeq=CafeqConfig(steps=5, joint_rounds=1))
    whole = compile_model(str(external_llama), tmp_path / "whole.onnx", CompileConfig(**base, stream=False))
    streamed = compile_model(str(external_llama), tmp_path / "streamed.onnx",
                             CompileConfig(**base, stream=True, stream_chunk_mb=1))
    # validation stretch by stretch gives the whole-model validation's figures
    assert streamed.validation.max_rel_error == pytest.approx(whole.validation.max_rel_error, rel=1e-4, abs=1e-6)
    assert (tmp_path / "streamed.onnx.data").is_file()
    onnx.checker.check_model(str(tmp_path / "streamed.onnx"))
    a, b = _values(tmp_path / "whole.onnx"), _values(tmp_path / "streamed.onnx")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    np.testing.assert_array_equal(_run(tmp_path / "whole.onnx"), _run(tmp_path / "streamed.onnx"))
    assert streamed.plan.released and [s["id"] for s in streamed.plan.summary()] == \
        [s["id"] for s in whole.plan.summary()]
    assert len(streamed.plan.online) == len(whole.plan.online)
    with pytest.raises(ValueError, match="streaming"):
        streamed.plan.save(tmp_path / "plan.npz")


def test_streamed_transforms_are_exact(external_llama, tmp_path):
    out = tmp_path / "t.onnx"
    res = compile_model(str(external_llama), out, CompileConfig(method="cafeq", stream=True, stream_chunk_mb=1,
                                                                quantize_weights=False, cafeq=CafeqConfig(steps=5)))
    assert res.plan.pair_transforms or res.plan.online
    want, got = _run(external_llama), _run(out)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def test_no_replaced_weight_outlives_its_chunk(external_llama, tmp_path, monkeypatch):
    """Replaced constants sit in reference cycles (gs tensors and their consumer lists): without a
    collection per chunk they waited for Python's count-driven collector, a chunk's weights at a time."""
    import gc

    import onnx_graphsurgeon as gs

    import qcompiler.stream as stream

    orphans = []

    def check_then_trim():
        orphans.append(sum(1 for o in gc.get_objects() if type(o) is gs.Constant and not o.outputs
                           and isinstance(o._values, np.ndarray) and o._values.nbytes >= 1024))

    monkeypatch.setattr(stream, "trim_heap", check_then_trim)
    monkeypatch.setattr(stream, "chunk_sites", lambda sites, _, pairs, groups: chunk_sites(sites, 1, pairs, groups))
    gc.disable()  # as when the count-driven collector happens not to run
    try:
        compile_model(str(external_llama), tmp_path / "m.onnx", CompileConfig(
            method="cafeq", stream=True, stream_chunk_mb=1, validate=False, cafeq=CafeqConfig(steps=5)))
    finally:
        gc.enable()
    assert len(orphans) > 2 and max(orphans) == 0, orphans


def test_released_plan_keeps_shapes_and_storage_without_memory(external_llama, tmp_path):
    res = compile_model(str(external_llama), tmp_path / "w.onnx", CompileConfig(stream=False))
    for sp in res.plan.sites:
        r = released(sp)
        assert r.weight.shape == sp.weight.shape and r.weight.storage_bits() == sp.weight.storage_bits()
        assert r.weight.codes.strides == (0, 0)


def test_stream_refusals_write_nothing(external_llama, tmp_path):
    with pytest.raises(ConfigError, match="streaming"):  # refused before anything is loaded
        compile_model(str(tmp_path / "absent.onnx"), tmp_path / "x.onnx", CompileConfig(method="gptq", stream=True))
    with pytest.raises(ConfigError, match="output"):
        compile_model(str(external_llama), None, CompileConfig(stream=True))
    assert list(tmp_path.iterdir()) == []


def test_stream_is_automatic_above_the_threshold(external_llama, tmp_path, monkeypatch):
    import qcompiler.frontends.onnx_file as onnx_file

    monkeypatch.setattr(onnx_file, "STREAM_AUTO_BYTES", 0)
    res = compile_model(str(external_llama), tmp_path / "auto.onnx", CompileConfig())
    assert res.plan.released and res.validation is not None
    res = compile_model(str(external_llama), tmp_path / "off.onnx", CompileConfig(stream=False))
    assert not res.plan.released


def test_streamed_validation_gate_refuses_and_writes_nothing(external_llama, tmp_path, capsys):
    from qcompiler.cli import main

    out = tmp_path / "q.onnx"
    code = main(["compile", str(external_llama), "-o", str(out), "--stream", "--stream-chunk-mb", "1",
                 "--bits", "2", "--max-error", "1e-6", "-q"])
    assert code == 3 and "validation failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_streamed_validation_sees_a_broken_weight(external_llama, tmp_path, monkeypatch):
    """A stretch-by-stretch validation that did not run the compiled weights would miss this."""
    import qcompiler.stream as stream

    real = stream.DataSink.spill

    def corrupt(self, graph, min_bytes=stream.DataSink.spill.__defaults__[0]):
        for t in graph.tensors().values():
            if t.name.endswith("_scales") and not hasattr(t._values, "path"):
                t.values = t.values * 3  # every scale of this chunk tripled
        return real(self, graph, min_bytes)

    monkeypatch.setattr(stream.DataSink, "spill", corrupt)
    res = compile_model(str(external_llama), tmp_path / "bad.onnx", CompileConfig(stream=True, stream_chunk_mb=1))
    good = compile_model(str(external_llama), tmp_path / "good.onnx", CompileConfig(stream=False))
    assert res.validation.max_rel_error > 5 * good.validation.max_rel_error


def _compile_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qcompiler", "compile", *args, "-q"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_during_a_streaming_compile_leaves_nothing(external_llama, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _compile_cli([str(external_llama), "-o", str(out_dir / "m.onnx"), "--method", "cafeq", "--stream",
                         "--stream-chunk-mb", "1", "--steps", "2000"])
    deadline = time.time() + 120
    while time.time() < deadline and not any(out_dir.iterdir()) and proc.poll() is None:
        time.sleep(0.2)
    assert any(out_dir.iterdir()), "the compile never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "nothing written" in err
    assert list(out_dir.iterdir()) == []


def test_streaming_peak_memory_is_bounded_by_a_chunk(tmp_path):
    """A ~380 MB synthetic Llama: the streamed compile's peak stays well below the whole-model compile's."""
    folder = tmp_path / "synth"
    subprocess.run([sys.executable, "tools/make_synthetic_llama.py", "--out", str(folder), "--layers", "8",
                    "--hidden", "1024", "--intermediate", "2816", "--vocab", "4000"], cwd=ROOT, check=True,
                   capture_output=True)
    model_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    assert model_mb > 300
    peaks = {}
    for mode in ("--stream", "--no-stream"):
        report = tmp_path / f"{mode}.json"
        proc = _compile_cli([str(folder / "model.onnx"), "-o", str(tmp_path / f"{mode}.onnx"), mode,
                             "--stream-chunk-mb", "16", "--no-validate", "--report", str(report)])
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        peaks[mode] = json.loads(report.read_text())["peak_rss_mb"]
    # whole-model: the weights (and their codes) in memory; streamed: one 16 MB chunk at a time
    assert peaks["--stream"] < peaks["--no-stream"] - 0.5 * model_mb, peaks


def test_ray_executor_streams_the_same_bytes(external_llama, tmp_path, ray_instance):
    """A streamed compile sends each chunk's tasks to Ray (not the model): the same files as local workers."""
    base = dict(quant=QuantConfig(bits=3, group_size=32), method="cafeq", stream=True, stream_chunk_mb=1, jobs=2,
                cafeq=CafeqConfig(steps=10, joint_rounds=1, joint_mlp_rounds=1))
    for executor in ("local", "ray"):
        (tmp_path / executor).mkdir()
        compile_model(str(external_llama), tmp_path / executor / "m.onnx", CompileConfig(**base, executor=executor))
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name


def test_resume_plans_only_the_chunks_an_interrupted_run_left(external_llama, tmp_path, monkeypatch):
    import qcompiler.stream as stream

    real_chunks, real_save = stream.chunk_sites, stream.ChunkStore.save
    monkeypatch.setattr(stream, "chunk_sites", lambda sites, _, pairs=(), groups=(): real_chunks(
        sites, 60_000, pairs, groups))  # several chunks of the tiny model
    planned: list[int] = []

    def save(self, index, plan):
        real_save(self, index, plan)
        planned.append(index)
        if len(planned) == 2 and fail:
            raise RuntimeError("interrupted")

    monkeypatch.setattr(stream.ChunkStore, "save", save)
    base = dict(quant=QuantConfig(bits=4, group_size=32), method="cafeq", stream=True,
                cafeq=CafeqConfig(steps=5, joint_rounds=1, joint_mlp_rounds=1))
    for d in ("ref", "run"):
        (tmp_path / d).mkdir()
    fail = False
    compile_model(str(external_llama), tmp_path / "ref" / "m.onnx", CompileConfig(**base))
    assert not planned  # no --resume: nothing kept
    out = tmp_path / "run" / "m.onnx"
    fail = True
    with pytest.raises(RuntimeError, match="interrupted"):
        compile_model(str(external_llama), out, CompileConfig(**base, resume=True))
    kept = stream.ChunkStore.folder_for(out)
    assert sorted(p.name for p in kept.glob("chunk-*.npz")) == ["chunk-00000.npz", "chunk-00001.npz"]
    assert not out.exists()
    fail, planned[:] = False, []
    compile_model(str(external_llama), out, CompileConfig(**base, resume=True, jobs=2))
    total = len(planned) + 2
    assert total > 3 and 0 not in planned and 1 not in planned  # the first two chunks came from the store
    assert not kept.exists()  # removed once the compile succeeded
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "run" / name).read_bytes(), name
    # plans of another compile (here: other learning steps) are not reused
    fail, planned[:] = True, []
    with pytest.raises(RuntimeError):
        compile_model(str(external_llama), out, CompileConfig(**base, resume=True))
    assert kept.is_dir()
    fail, planned[:] = False, []
    other = dict(base, cafeq=CafeqConfig(steps=6, joint_rounds=1, joint_mlp_rounds=1))
    compile_model(str(external_llama), out, CompileConfig(**other, resume=True))
    assert sorted(planned) == list(range(total))


def test_streamed_validation_cuts_before_a_gain_an_online_op_took_in(tmp_path):
    """The cut before a site whose input (a norm gain's Mul) the compiled model no longer has (the online op
    folded the gain in) moves before the Mul; validation then compares the two models as usual."""
    from onnx import TensorProto, helper

    from qcompiler.runtime.stream_validate import shared_cuts, validate_streamed

    rng = np.random.default_rng(0)
    g, w = rng.uniform(0.5, 2.0, 8).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)

    def model(nodes, inits):
        graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])],
                                  [numpy_helper.from_array(v, k) for k, v in inits.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    original = model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                      helper.make_node("Mul", ["r", "g"], ["y"], name="mul"),
                      helper.make_node("MatMul", ["y", "w"], ["z"], name="matmul")], {"g": g, "w": w})
    compiled = model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                      helper.make_node("MatMul", ["r", "w2"], ["z"], name="matmul")], {"w2": g[:, None] * w})
    assert shared_cuts(original, compiled, ["matmul"]) == ["mul"]
    assert shared_cuts(original, original, ["matmul"]) == ["matmul"]
    res = validate_streamed(original, tmp_path, compiled, {}, ["matmul"], {"x": rng.standard_normal((2, 8)).astype(
        np.float32)})
    assert res.max_rel_error < 1e-5


def test_windows_take_consecutive_chunks_up_to_units_and_bytes():
    from qcompiler.sites import LinearSite
    from qcompiler.stream import Chunk, windows

    def chunk(units, mb, role="linear"):  # one site of ``mb`` MB of fp32 weights
        site = LinearSite(id=f"s{mb}", node="n", op_type="MatMul", weight="w", transposed=False, k=256,
                          n=mb * 1024, input="x", output="y", bias=None, role=role, dtype="float32")
        return Chunk((site,), units=units)

    chunks = [chunk(1, 1), chunk(1, 1), chunk(3, 1), chunk(1, 1), chunk(1, 8), chunk(1, 1)]
    assert windows(chunks, 2, 2**40) == [[0, 1], [2], [3, 4], [5]]  # a window ends once it holds 2 units
    assert windows(chunks, 4, 4 * 2**20) == [[0, 1, 2], [3], [4], [5]]  # the 8 MB chunk is over 4 MB: alone
    assert windows(chunks, 1, 2**40) == [[i] for i in range(6)]
    # an embedding table is not loaded by a learned plan: its bytes do not end a window
    assert windows([chunk(1, 8, "embedding"), chunk(1, 2), chunk(1, 1)], 4, 4 * 2**20) == [[0, 1, 2]]


def test_windows_of_chunks_planned_side_by_side_give_the_same_bytes(external_llama, tmp_path, monkeypatch, caplog):
    """With workers, chunks of one unit each are planned several at a time (tasks side by side), each chunk's
    part of the window's plan rewritten in chunk order: the same files as one chunk at a time."""
    import logging

    import qcompiler.stream as stream

    real = stream.chunk_sites
    monkeypatch.setattr(stream, "chunk_sites", lambda sites, _, pairs=(), groups=(): real(sites, 1, pairs, groups))
    base = dict(quant=QuantConfig(bits=3, group_size=32), method="cafeq", stream=True,
                cafeq=CafeqConfig(steps=10, joint_rounds=1, joint_mlp_rounds=1, online_budget=1.0))
    plans = {}
    for jobs in (1, 2):
        (tmp_path / str(jobs)).mkdir()
        with caplog.at_level(logging.INFO, logger="qcompiler.stream"):
            plans[jobs] = compile_model(str(external_llama), tmp_path / str(jobs) / "m.onnx",
                                        CompileConfig(**base, jobs=jobs)).plan
    assert any("planned in" in r.getMessage() and "windows" in r.getMessage() for r in caplog.records)
    assert plans[2].online and plans[2].pair_transforms and plans[2].pair_stats
    assert plans[1].summary() == plans[2].summary()
    assert [o.id for o in plans[1].online] == [o.id for o in plans[2].online]
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
