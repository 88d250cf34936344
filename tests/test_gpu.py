"""The CUDA paths (``--device cuda``): torch learning and calibration statistics on the GPU, ONNX
Runtime's CUDA execution provider for validation, and end-to-end compiles. Marked ``gpu``; every test
skips on a machine without a usable CUDA device, so the suite passes without one."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch

from qcompiler.algorithms.cafeq import LearnConfig, learn_block_transform, learn_vo
from qcompiler.algorithms.gptq import ActivationStats
from qcompiler.algorithms.grid import GridSpec
from qcompiler.cli import main
from qcompiler.runtime.session import SessionOptions, make_session
from tests.graphs import mixed_model
from tests.test_cafeq_algorithms import _outlier_weight

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")]

GRID = GridSpec(3, 32, False)


def _cuda_ep() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_block_transform_learns_on_cuda_as_well_as_on_cpu():
    rng = np.random.default_rng(1)
    ws = [_outlier_weight(rng, 128, 96), _outlier_weight(rng, 128, 32)]
    res = {d: learn_block_transform(ws, GRID, 32, LearnConfig(steps=150, device=d)) for d in ("cpu", "cuda")}
    for r in res.values():
        assert r.error <= r.identity_error
    assert res["cuda"].identity_error == pytest.approx(res["cpu"].identity_error, rel=1e-6)
    # float sums run in another order on the GPU: the learned error may differ a little, not much
    assert res["cuda"].error < 0.95 * res["cuda"].identity_error
    assert res["cuda"].error == pytest.approx(res["cpu"].error, rel=0.05)


def test_vo_learns_on_cuda():
    rng = np.random.default_rng(3)
    a, b = _outlier_weight(rng, 64, 2 * 8), _outlier_weight(rng, 4 * 8, 48)
    res = learn_vo(a, b, (0, 0, 1, 1), 8, GRID, GRID, LearnConfig(steps=200, device="cuda"))
    assert res.error < 0.97 * res.identity_error


def test_activation_statistics_on_cuda_equal_cpu():
    rng = np.random.default_rng(4)
    x, xt = rng.standard_normal((3, 50, 64)), rng.standard_normal((3, 50, 64))
    stats = {}
    for dev in ("cpu", "cuda"):
        s = ActivationStats(64, target=True, device=dev)
        s.add(x, xt)
        s.add(x[:1], xt[:1])
        stats[dev] = s.result()
    for got, ref in zip(stats["cuda"], stats["cpu"], strict=True):
        assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref)


@pytest.mark.skipif(not _cuda_ep(), reason="this onnxruntime has no CUDA execution provider")
def test_cuda_execution_provider_runs_a_compiled_model_like_cpu(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save_model(mixed_model(), str(src))
    assert main(["compile", str(src), "-o", str(out), "-q", "--device", "cuda"]) == 0
    model = onnx.load(str(out))
    cuda = make_session(model, SessionOptions(device="cuda"))
    assert cuda.get_providers()[0] == "CUDAExecutionProvider"
    cpu = make_session(model, SessionOptions(device="cpu"))
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    feeds = {cuda.get_inputs()[0].name: x}
    got, ref = cuda.run(None, feeds)[0], cpu.run(None, feeds)[0]
    assert np.linalg.norm(got - ref) <= 1e-3 * np.linalg.norm(ref)


@pytest.mark.parametrize("args", [["--method", "cafeq", "--steps", "30"], ["--method", "rotate"]])
def test_compile_on_cuda_is_deterministic(tmp_path, args):
    """Same input, options and seed: the same bytes, also when torch learns on the GPU."""
    src = tmp_path / "m.onnx"
    onnx.save_model(mixed_model(), str(src))
    digests = []
    for rep in range(2):
        out = tmp_path / f"out{rep}.onnx"
        assert main(["compile", str(src), "-o", str(out), "-q", "--device", "cuda", *args]) == 0
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_calibrated_compile_on_cuda(tmp_path, tiny_checkpoints, cache_dir):
    ids = tmp_path / "calib.npy"
    np.save(ids, np.random.default_rng(0).integers(5, 500, (8, 32)))
    out = tmp_path / "g.onnx"
    common = ["--calib", str(ids), "--calib-samples", "6", "--calib-seqlen", "32", "--group-size", "32",
              "--cache-dir", str(cache_dir), "-q"]
    assert main(["compile", str(tiny_checkpoints["llama"]), "-o", str(out), "--method", "gptaq", "--device", "cuda",
                 "--report", str(tmp_path / "r.json"), *common]) == 0
    onnx.checker.check_model(str(out))


def test_joint_rounding_batched_on_cuda_matches_the_numpy_reference():
    from qcompiler.algorithms.joint import Heads, JointConfig, JointItem, joint_round, joint_round_batch

    rng = np.random.default_rng(7)
    heavy = lambda s: rng.standard_normal(s) * rng.exponential(1.0, s)  # noqa: E731
    heads, cfg = Heads(16, (0, 0, 1, 1)), JointConfig(rounds=2)
    items = [JointItem(heavy((64, 32)), heavy((64, 48))) for _ in range(4)]
    got = joint_round_batch(items, GRID, GRID, heads, cfg, "cuda")
    for it, res in zip(items, got, strict=True):
        ref = joint_round(it.a, it.b, GRID, GRID, heads, cfg=cfg)
        assert res.pqe == pytest.approx(ref.pqe, rel=1e-3) and res.pqe <= res.pqe_plain
        assert np.mean(res.a.codes == ref.a.codes) > 0.99 and np.mean(res.b.codes == ref.b.codes) > 0.99
