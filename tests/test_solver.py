"""The batched torch solver and joint rounding against their numpy references (gptq.py, joint.py): the
grid bit for bit, the solves code for code up to the order of floating-point sums, each problem of a batch
as if solved alone, and the working memory of a wide pair."""

import numpy as np
import pytest
import torch

from qcompiler.algorithms import gptq, solver
from qcompiler.algorithms import grid as np_grid
from qcompiler.algorithms.gptq import SolverConfig
from qcompiler.algorithms.grid import GridSpec
from qcompiler.algorithms.joint import Heads, JointConfig, JointItem, joint_round, joint_round_batch
from qcompiler.algorithms.transforms import random_invertible

FULL = SolverConfig(act_order=True, alpha=1.0, percdamp=0.1, grid_search=21, refine_passes=4)
CFGS = [SolverConfig(), SolverConfig(alpha=0.25), FULL]
GRIDS = [GridSpec(4, 32, False), GridSpec(3, 32, True), GridSpec(2, 0, False)]


def problem(rng, k, n, tokens=300):
    x = rng.standard_normal((tokens, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    xt = x + 0.05 * rng.standard_normal(x.shape)
    w = rng.standard_normal((k, n)) * rng.exponential(1.0, (k, n))
    h = x.T @ x / tokens
    h[3] = h[:, 3] = 0.0  # a dead input
    return w, h, (xt - x).T @ x / tokens


def same_codes(ref, got) -> float:
    assert ref.scales.shape == got.scales.shape and ref.codes.shape == got.codes.shape
    return float(np.mean(ref.codes == got.codes))


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False), (4, True)])
def test_grid_is_bit_for_bit_the_numpy_grid(bits, sym):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((96, 40)) * rng.exponential(1.0, (96, 40))).astype(np.float32)
    w[:32, 5] = 0.0  # an all-zero group
    w[:, 7] = np.abs(w[:, 7])  # one-signed columns
    for ratios in (None, np.linspace(1.0, 0.5, 21)):
        s_ref, z_ref = (np_grid.fit_grid(w, bits, 32, sym) if ratios is None
                        else np_grid.fit_grid_search(w, bits, 32, sym, ratios))
        s, z = solver.fit_search(solver.grouped(torch.from_numpy(w).T, 32), bits, sym, ratios)  # [N, nb]
        np.testing.assert_array_equal(s.T.numpy(), s_ref)
        np.testing.assert_array_equal(z.T.numpy().astype(np.uint8), z_ref)
        rows = np.arange(96) // 32
        c = solver.codes_of(torch.from_numpy(w), s.T[rows], z.T[rows], bits)
        np.testing.assert_array_equal(c.numpy().astype(np.uint8), np_grid.quantize_codes(w, s_ref, z_ref, bits, 32))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("cfg", CFGS)
def test_solve_rows_matches_the_reference(grid, cfg):
    rng = np.random.default_rng(1)
    probs = [problem(rng, 80, 24) for _ in range(3)]
    ws, hs, ds = map(list, zip(*probs, strict=True))
    got = solver.solve_rows(ws, hs, grid, ds, cfg)
    for (w, h, d), q in zip(probs, got, strict=True):
        ref = gptq.solve_rows(w, h, grid, d, cfg)
        assert same_codes(ref, q) > 0.995
        np.testing.assert_allclose(q.scales, ref.scales, rtol=1e-6)
        assert not q.dequantize()[3].any()  # the dead input's row


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("cfg", CFGS)
def test_solve_columns_matches_the_reference(grid, cfg):
    rng = np.random.default_rng(2)
    probs = [problem(rng, 40, 72) for _ in range(2)]
    probs = [(w.T.copy(), h, d) for w, h, d in probs]  # A [72, 40]: C = 40 sequential columns
    as_, hs, ds = map(list, zip(*probs, strict=True))
    got = solver.solve_columns(as_, hs, grid, ds, cfg)
    for (a, h, d), q in zip(probs, got, strict=True):
        ref = gptq.solve_columns(a, h, grid, d, cfg)
        assert same_codes(ref, q) > 0.995


def test_a_problem_solves_the_same_alone_or_in_a_batch():
    rng = np.random.default_rng(3)
    probs = [problem(rng, 64, 16) for _ in range(4)]
    ws, hs, ds = map(list, zip(*probs, strict=True))
    batch = solver.solve_rows(ws, hs, GridSpec(3, 32, False), ds, FULL)
    alone = solver.solve_rows([probs[2][0]], [probs[2][1]], GridSpec(3, 32, False), [probs[2][2]], FULL)[0]
    np.testing.assert_array_equal(batch[2].codes, alone.codes)
    np.testing.assert_array_equal(batch[2].scales, alone.scales)


def test_refinement_moves_lower_the_objective():
    """The batched coordinate descent (lazy gradient per block of rows) never raises the objective and ends
    where no single move lowers it, as the reference's."""
    rng = np.random.default_rng(4)
    w, h, d = problem(rng, 70, 12)
    cfg = SolverConfig(block=16)
    q = solver.solve(torch.from_numpy(w)[None], torch.from_numpy(h)[None], GridSpec(3, 32, False), None, cfg)
    rows = torch.arange(70) // 32
    step, zero = q.scales[:, rows].double(), q.zps[:, rows].double()
    hh, ww = torch.from_numpy(h)[None], torch.from_numpy(w)[None]

    def obj(codes):
        e = (codes.double() - zero) * step - ww
        return float((e * (hh @ e)).sum())

    before = obj(q.codes)
    codes = q.codes.clone()
    moves = solver.refine(codes, step, zero, 7, ww, hh, None, 0.0, passes=20, block=16)
    assert moves > 0 and obj(codes) < before
    ref = q.codes[0].numpy().astype(np.uint8).copy()
    gptq.refine(ref, step[0].numpy(), zero[0].numpy(), 7, w, h, None, 0.0, 20)
    np.testing.assert_array_equal(codes[0].numpy().astype(np.uint8), ref)


@pytest.mark.parametrize("kind", ["vo", "mlp", "transforms", "weighted"])
def test_joint_batch_matches_the_reference(kind):
    rng = np.random.default_rng(5)
    heavy = lambda s: rng.standard_normal(s) * rng.exponential(1.0, s)  # noqa: E731
    grid, heads, cfg = GridSpec(3, 32, False), None, JointConfig(rounds=2, channel_weight=4.0)
    if kind == "vo":
        heads = Heads(16, (0, 0, 1, 1))
        items = [JointItem(heavy((64, 32)), heavy((64, 48))) for _ in range(3)]
    elif kind == "mlp":
        items = [JointItem(heavy((64, 96)), heavy((96, 48))) for _ in range(3)]
    elif kind == "weighted":  # row weights on one item, none on the other
        heads = Heads(16, (0, 0, 1, 1))
        items = [JointItem(heavy((64, 32)), heavy((64, 48)), row_weights=np.exp(rng.normal(0, 1.5, 64))),
                 JointItem(heavy((64, 32)), heavy((64, 48)))]
    else:
        items = [JointItem(heavy((64, 48)), heavy((48, 32)), np.stack([random_invertible(16, rng) for _ in range(4)]),
                           np.stack([random_invertible(16, rng) for _ in range(3)])) for _ in range(2)]
    got = joint_round_batch(items, grid, grid, heads, cfg)
    for it, res in zip(items, got, strict=True):
        ref = joint_round(it.a, it.b, grid, grid, heads, it.a_blocks, it.b_blocks, cfg, it.row_weights)
        assert res.pqe_plain == pytest.approx(ref.pqe_plain, rel=1e-9)
        assert res.pqe == pytest.approx(ref.pqe, rel=1e-3)
        assert res.pqe <= res.pqe_plain
        assert same_codes(ref.a, res.a) > 0.99 and same_codes(ref.b, res.b) > 0.99


def test_joint_batch_rejects_mixed_transforms():
    rng = np.random.default_rng(6)
    items = [JointItem(rng.standard_normal((32, 16)), rng.standard_normal((16, 8)), np.eye(16)[None]),
             JointItem(rng.standard_normal((32, 16)), rng.standard_normal((16, 8)))]
    with pytest.raises(ValueError, match="a_blocks"):
        joint_round_batch(items, GridSpec(4, 32, False), GridSpec(4, 16, False))


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_joint_bench_tool(engine, capsys):
    import json

    from tools.joint_bench import main

    assert main(["--channels", "192", "--k", "64", "--channel-block", "128", "--engine", engine]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["engine"] == engine and row["pqe"] < row["pqe_plain"] and row["peak_rss_mb"] > 0
