"""CafeQ's learners on random weights with outliers: they cut the proxy error, never end worse than
RTN, and the kept transforms are what they claim (orthogonal for Cayley, exact fake quantization)."""

import numpy as np
import pytest
import torch

from qcompiler.algorithms.cafeq import (
    PLATEAU_TOL,
    LearnConfig,
    _Plateau,
    _schedule,
    channel_order,
    hadamard,
    initial_blocks,
    learn_block_transform,
    learn_updown_scale,
    learn_vo,
    weighted_row_error,
)
from qcompiler.algorithms.fakequant import fake_quant
from qcompiler.algorithms.grid import GridSpec, quantize

GRID = GridSpec(3, 32, False)


@pytest.fixture(params=["fused", "torch"])
def fq_path(request, monkeypatch):
    """The fake quantizer's CPU kernels (``kernels``) and its torch code: both must pass."""
    from qcompiler.algorithms import fakequant

    monkeypatch.setattr(fakequant, "FUSED", request.param == "fused")
    return request.param


def _outlier_weight(rng, k, n):
    w = rng.standard_normal((k, n))
    w[rng.integers(0, k, 6), rng.integers(0, n, 6)] *= 12  # a few outliers: what transforms fix
    return w


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quant_forward_is_the_ort_grid(bits, sym, fq_path):
    w = np.random.default_rng(0).standard_normal((100, 12)).astype(np.float32)
    ref = quantize(w, bits, 32, sym).dequantize()
    got = fake_quant(torch.from_numpy(w), bits, 32, sym, ste=False).numpy()
    assert np.mean(np.abs(got - ref) > 1e-6) < 1e-3  # ties may round differently; nothing else


def test_fake_quant_passes_gradients_straight_through(fq_path):
    w = torch.randn(64, 8, requires_grad=True)
    fake_quant(w, 3, 32, False, ste=True).sum().backward()
    assert w.grad is not None and torch.count_nonzero(w.grad) > 0


def _reference_fake_quant(w: torch.Tensor, bits: int, block: int, symmetric: bool) -> torch.Tensor:
    """The STE fake quantization as plain autograd of its formula: what ``fake_quant``'s hand-written
    backward must reproduce."""
    def ste_round(x):
        return x + (torch.round(x) - x).detach()

    k, n = w.shape
    nb = -(-k // block)
    wb = torch.cat([w, w.new_zeros(nb * block - k, n)]).reshape(nb, block, n)
    mx, mn = wb.amax(dim=1, keepdim=True), wb.amin(dim=1, keepdim=True)
    if symmetric:
        mid = float(1 << (bits - 1))
        scale = torch.where(mx.abs() > mn.abs(), mx, mn) / -mid
        zero = torch.full_like(scale, mid)
    else:
        qmax = float((1 << bits) - 1)
        mn, mx = mn.clamp(max=0), mx.clamp(min=0)
        scale = (mx - mn) / qmax
        zero = ste_round(-mn / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp(0, qmax)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = ste_round(wb / safe + zero).clamp(0, float((1 << bits) - 1))
    return torch.where(scale == 0, torch.zeros_like(wb), (q - zero) * scale).reshape(-1, n)[:k]


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits,block", [(2, 32), (3, 128), (4, 128), (4, 48), (8, 64)])
@pytest.mark.parametrize("kind", ["normal", "ties", "one-signed"])
def test_fake_quant_gradient_is_autograd_of_its_formula(bits, block, sym, kind, fq_path):
    """The hand-written STE backward equals autograd of the plain formula: groups padded with zeros,
    all-zero groups, one-signed groups (asym: the zero point clamps) and tied extremes included."""
    g = torch.Generator().manual_seed(bits * 100 + block)
    w0 = torch.randn(200, 24, generator=g, dtype=torch.float64)
    zero_group = slice(0, block)
    w0[zero_group, 3] = 0.0  # an all-zero group
    if kind == "ties":  # integer values: tied maxima and minima, and u exactly on the clamp bounds
        w0 = torch.round(w0 * 3)
    elif kind == "one-signed":
        w0 = w0.abs() + 0.5
        w0[:, 5] *= -1
        w0[zero_group, 3] = 0.0
    up = torch.randn(200, 24, generator=g, dtype=torch.float64)
    grads, values = [], []
    for f in (fake_quant, _reference_fake_quant):
        w = w0.clone().requires_grad_(True)
        y = f(w * 1.0, bits, block, sym)
        (y * up).sum().backward()
        values.append(y.detach())
        grads.append(w.grad)
    assert torch.equal(values[0], values[1])
    np.testing.assert_allclose(grads[0].numpy(), grads[1].numpy(), rtol=1e-10, atol=1e-10)
    assert torch.count_nonzero(grads[0]) > 0


@pytest.mark.parametrize("loss,optimizer", [("ste", "adam"), ("ste", "cayley"), ("lse", "adam")])
def test_block_transform_cuts_the_proxy_error(loss, optimizer):
    rng = np.random.default_rng(1)
    ws = [_outlier_weight(rng, 64, 48), _outlier_weight(rng, 64, 16)]
    cfg = LearnConfig(loss=loss, optimizer=optimizer, steps=150, lr=0.02 if optimizer == "adam" else 0.05)
    res = learn_block_transform(ws, GRID, 16, cfg)
    assert res.value.shape == (4, 16, 16)
    assert res.error <= res.identity_error
    if loss == "ste":
        assert res.error < 0.93 * res.identity_error, (res.error, res.identity_error)
    if optimizer == "cayley":
        assert np.allclose(res.value @ res.value.transpose(0, 2, 1), np.eye(16), atol=1e-4)
    # the reported error is the true one: recompute it with the ORT-exact grid
    t = res.value
    w = np.concatenate(ws, axis=1)
    tw = np.einsum("kij,kjn->kin", t, w.reshape(4, 16, -1)).reshape(64, -1)
    eff = np.einsum("kij,kjn->kin", np.linalg.inv(t), quantize(tw, 3, 32, False).dequantize().reshape(4, 16, -1))
    assert np.sum((eff.reshape(64, -1) - w) ** 2) == pytest.approx(res.error, rel=1e-3)


def test_cosine_schedule_falls_from_lr_to_zero_and_still_learns():
    """``lr_schedule="cosine"``: the rate starts at ``lr``, halves at mid-run and is 0 at the last step; a learner
    on it still cuts the proxy error; an unknown schedule is refused."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=0.04)
    sched = _schedule(opt, LearnConfig(steps=10, lr=0.04, lr_schedule="cosine"))
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(0.04) and rates[5] == pytest.approx(0.02)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert _schedule(opt, LearnConfig(lr_schedule="constant")) is None
    rng = np.random.default_rng(1)
    ws = [_outlier_weight(rng, 64, 48)]
    res = learn_block_transform(ws, GRID, 16, LearnConfig(steps=120, lr=0.04, lr_schedule="cosine", patience=0))
    assert res.steps == 120 and res.error < 0.93 * res.identity_error, (res.error, res.identity_error)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        learn_block_transform(ws, GRID, 16, LearnConfig(steps=5, lr_schedule="linear"))


def test_learning_never_ends_worse_than_rtn():
    w = np.random.default_rng(2).standard_normal((32, 8))
    res = learn_block_transform([w], GridSpec(8, 32, False), 8, LearnConfig(steps=3, lr=1.0))  # a bad lr
    assert res.error <= res.identity_error


def test_vo_transform_cuts_the_factor_errors_under_gqa():
    rng = np.random.default_rng(3)
    a, b = _outlier_weight(rng, 64, 2 * 8), _outlier_weight(rng, 4 * 8, 48)
    res = learn_vo(a, b, (0, 0, 1, 1), 8, GRID, GRID, LearnConfig(steps=200))
    assert res.value.shape == (2, 8, 8)
    assert res.error < 0.97 * res.identity_error, (res.error, res.identity_error)


def test_updown_scale_and_channel_order():
    rng = np.random.default_rng(4)
    up, down = rng.standard_normal((32, 64)), rng.standard_normal((64, 24)) * np.exp(rng.normal(0, 1, (64, 1)))
    res = learn_updown_scale(up, down, GRID, LearnConfig(steps=80))
    assert np.all(res.value > 0) and res.error < res.identity_error
    # outlier rows spread over every quant group of down: sorting puts them in one group
    down = rng.standard_normal((64, 24))
    down[::16] *= 20
    perm = channel_order(down)
    assert sorted(perm) == list(range(64))
    assert weighted_row_error(up[:, perm], down[perm], GRID) < weighted_row_error(up, down, GRID)


def test_learners_stop_once_the_error_plateaus():
    """``patience``: a learner whose best error stops falling stops early and reports the steps it ran;
    with patience 0 it runs every step; stopping never loses what was reached before the stop.

    How far a learner would still fall after a plateau is not a property of the learner (an STE
    trajectory can leave a plateau late, and where depends on the processor's float rounding), so
    the bounds here are the ones that hold for any rounding: the early stop keeps the best of exactly
    the steps it ran, running on can only keep something at least as good, and the stop came after
    ``patience`` steps without a real improvement."""
    rng = np.random.default_rng(4)
    up, down = rng.standard_normal((32, 64)), rng.standard_normal((64, 24)) * np.exp(rng.normal(0, 1, (64, 1)))
    full = learn_updown_scale(up, down, GRID, LearnConfig(steps=600, patience=0))
    early = learn_updown_scale(up, down, GRID, LearnConfig(steps=600, patience=30))
    assert full.steps == 600 and 30 <= early.steps < 600, early.steps
    cut = learn_updown_scale(up, down, GRID, LearnConfig(steps=early.steps, patience=0))
    assert early.error == pytest.approx(cut.error, rel=1e-9)  # the best of the steps it ran
    assert full.error <= early.error * (1 + 1e-9)  # running on keeps the best of a superset of those steps
    assert early.error < early.identity_error
    # the stop was earned: the 30 steps before it did not improve on the best of the steps up to them
    # (indices 0 .. steps - 30) by more than PLATEAU_TOL
    on = learn_updown_scale(up, down, GRID, LearnConfig(steps=early.steps - 29, patience=0))
    assert early.error >= on.error * (1 - PLATEAU_TOL) - 1e-15, (on.error, early.error)
    ws = [_outlier_weight(rng, 64, 48)]
    for exact in (True, False):  # the STE loss read every step, or the true error every 10 (column subsets)
        cfg = LearnConfig(steps=3000, lr=0.02, ortho_reg=0.0, patience=100, column_batch=64 if exact else 16)
        res = learn_block_transform(ws, GRID, 16, cfg)
        assert res.steps < 3000 and res.error < res.identity_error, (exact, res.steps)


def test_plateau_counts_steps_without_a_real_improvement():
    p = _Plateau(1.0, 3)
    assert not p.stalled(0.5) and not p.stalled(0.5) and not p.stalled(0.5 * (1 - PLATEAU_TOL / 2))
    assert p.stalled(0.5)  # three steps with no fall beyond the tolerance
    assert not _Plateau(1.0, 0).stalled(1.0, 1000)  # patience 0: never
    assert _Plateau(1.0, 10).stalled(1.0, 10)  # counted in steps, e.g. 10 per true-error check


def test_initial_blocks():
    rng = np.random.default_rng(5)
    h = hadamard(8)
    assert np.allclose(h @ h.T, np.eye(8))
    for init in ("identity", "orthogonal", "hadamard"):
        t = initial_blocks(3, 8, init, rng)
        assert t.shape == (3, 8, 8) and np.allclose(t @ t.transpose(0, 2, 1), np.eye(8))
    with pytest.raises(ValueError):
        hadamard(6)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 128, True), (2, 48, False), (4, 16, True)])
def test_transformed_error_is_autograd_of_its_composition(bits, group, sym, fq_path):
    """The block learner's fused error ``sum ||M^-1 Q(M P) - P||^2`` and its gradient equal autograd of the
    composition with ``fake_quant`` (groups that span blocks, padded groups and tied extremes included)."""
    from qcompiler.algorithms.fakequant import transformed_error

    g = torch.Generator().manual_seed(bits * 10 + group)
    nb, b, width = 6, 16, 40  # K = 96: group 128 pads, group 48 spans three blocks
    part = torch.randn(nb, b, width, generator=g, dtype=torch.float64)
    part[:, :, 0] = torch.round(part[:, :, 0] * 2)  # ties
    m0 = torch.eye(b, dtype=torch.float64) + 0.1 * torch.randn(nb, b, b, generator=g, dtype=torch.float64)

    def composed(m):
        tw = (m @ part).reshape(nb * b, width)
        eff = torch.linalg.inv(m) @ fake_quant(tw, bits, group, sym, ste=True).reshape(nb, b, width)
        return ((eff - part) ** 2).sum()

    values, grads = [], []
    for f in (composed, lambda m: transformed_error(m, torch.linalg.inv(m), part, bits, group, sym)):
        m = m0.clone().requires_grad_(True)
        v = f(m)
        v.backward()
        values.append(float(v.detach()))
        grads.append(m.grad)
    assert values[1] == pytest.approx(values[0], rel=1e-12)
    np.testing.assert_allclose(grads[1].numpy(), grads[0].numpy(), rtol=1e-9, atol=1e-9 * float(grads[0].abs().max()))
    assert torch.count_nonzero(grads[1]) > 0


@pytest.mark.parametrize("group", [32, 128, 48])
def test_transformed_errors_of_stacked_items_are_each_items_own(group, fq_path):
    """Items laid one after another are quantized on their own groups (a padded group never reaches into the next
    item): each item's error, and the gradient of a weighted sum of them, equal the item's own computation."""
    from qcompiler.algorithms.fakequant import transformed_error, transformed_errors

    g = torch.Generator().manual_seed(group)
    items, nb, b, width = 3, 6, 16, 40  # K = 96 per item: group 128 pads each item, 48 spans three blocks
    parts = [torch.randn(nb, b, width, generator=g, dtype=torch.float64) for _ in range(items)]
    ms = [torch.eye(b, dtype=torch.float64) + 0.1 * torch.randn(nb, b, b, generator=g, dtype=torch.float64)
          for _ in range(items)]
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    alone, grads = [], []
    for m0, part, w in zip(ms, parts, weights, strict=True):
        m = m0.clone().requires_grad_(True)
        v = transformed_error(m, torch.linalg.inv(m), part, 4, group, False)
        (w * v).backward()
        alone.append(float(v.detach()))
        grads.append(m.grad)
    m = torch.cat(ms).requires_grad_(True)
    errs = transformed_errors(m, torch.linalg.inv(m), torch.cat(parts), 4, group, False, items)
    (weights * errs).sum().backward()
    np.testing.assert_allclose(errs.detach().numpy(), alone, rtol=1e-12)
    np.testing.assert_allclose(m.grad.numpy(), torch.cat(grads).numpy(), rtol=1e-9,
                               atol=1e-12 * float(torch.cat(grads).abs().max()))


@pytest.mark.parametrize("columns,patience", [(1024, 10), (64, 10), (64, 0)])
def test_batched_block_learners_learn_what_each_learns_alone(columns, patience):
    """Sibling groups of one shape learned as one batch (weighted and not; whole and on column batches; some
    stopping early at their plateau, at different steps): each gets the transform, steps and errors it gets
    alone, up to the float order of the error sums."""
    from qcompiler.algorithms.cafeq import learn_block_transforms

    rng = np.random.default_rng(columns + patience)
    problems = [([rng.standard_normal((128, 100)) * rng.uniform(0.5, 2.0)],
                 None if i % 2 else rng.uniform(0.1, 3.0, 128)) for i in range(3)]
    on_grid = rng.integers(-4, 4, (128, 100)).astype(float)
    on_grid[::32] = -4  # every group's extreme: RTN is exact, so this item plateaus at once
    problems.append(([on_grid], None))
    grid, cfg = GridSpec(3, 32, True), LearnConfig(steps=60, column_batch=columns, patience=patience)
    alone = [learn_block_transform(ws, grid, 64, cfg, r) for ws, r in problems]
    batch = learn_block_transforms(problems, grid, 64, cfg)
    assert len(batch) == len(problems)
    for a, b in zip(alone, batch, strict=True):
        assert a.steps == b.steps
        np.testing.assert_allclose(b.value, a.value, atol=1e-6)
        assert b.error == pytest.approx(a.error, rel=1e-5) and b.identity_error == pytest.approx(a.identity_error)
        assert b.error <= b.identity_error
    if patience:  # the plateau stopped the exact item early, the others ran on
        assert batch[-1].error == 0 and batch[-1].steps <= 20 < min(b.steps for b in batch[:-1])
    with pytest.raises(ValueError, match="one shape"):
        learn_block_transforms(problems + [([rng.standard_normal((128, 50))], None)], grid, 64, cfg)


@pytest.mark.parametrize("loss", ["ste", "lse"])
def test_batched_vo_learners_learn_what_each_learns_alone(loss):
    """V·O pairs of one shape learned as one batch (weighted and not, one stopping early): each gets the transforms,
    steps and errors it gets alone, up to the float order of the error sums."""
    from qcompiler.algorithms.cafeq import learn_vos

    rng = np.random.default_rng(3)
    kv_map, d = (0, 0, 1, 1, 1, 0), 16
    pairs = [(rng.standard_normal((128, 32)) * rng.uniform(0.5, 2.0), rng.standard_normal((96, 80)),
              None if i % 2 else rng.uniform(0.1, 3.0, 128)) for i in range(3)]
    a, b = rng.integers(-4, 4, (128, 32)).astype(float), rng.integers(-7, 9, (96, 80)).astype(float)
    a[::32], b[::32], b[1::32] = -4, -7, 8  # both factors on their grids: RTN is exact, this pair stops at once
    pairs.append((a, b, None))
    grid_a, grid_b = GridSpec(3, 32, True), GridSpec(4, 32, False)
    cfg = LearnConfig(steps=40, patience=10, loss=loss)
    alone = [learn_vo(a, b, kv_map, d, grid_a, grid_b, cfg, r) for a, b, r in pairs]
    batch = learn_vos(pairs, kv_map, d, grid_a, grid_b, cfg)
    for x, y in zip(alone, batch, strict=True):
        assert x.steps == y.steps
        np.testing.assert_allclose(y.value, x.value, atol=1e-6)
        assert y.error == pytest.approx(x.error, rel=1e-5) and y.identity_error == pytest.approx(x.identity_error)
    assert all(x.error < x.identity_error for x in batch[:-1])
    assert batch[-1].error == 0 and batch[-1].steps < min(x.steps for x in batch[:-1])
    with pytest.raises(ValueError, match="one shape"):
        learn_vos(pairs + [(pairs[0][0][:, :16], pairs[0][1], None)], kv_map, d, grid_a, grid_b, cfg)


def test_row_weights_weigh_the_learned_error():
    """Uniform row weights change nothing; other weights are learned as the unweighted problem of ``D W`` and
    reported in the weighted metric, which the kept transform never leaves above RTN's."""
    from qcompiler.algorithms.transforms import apply_blocks

    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 96))
    grid, cfg = GridSpec(3, 32, True), LearnConfig(steps=60)
    plain = learn_block_transform([w], grid, 64, cfg)
    ones = learn_block_transform([w], grid, 64, cfg, np.ones(128))
    assert np.array_equal(plain.value, ones.value) and plain.error == ones.error
    r = rng.uniform(0.1, 5.0, 128)
    res = learn_block_transform([w], grid, 64, cfg, r)

    def q(x):
        return grid(torch.tensor(x), False).double().numpy()

    eff = apply_blocks(np.linalg.inv(res.value), q(apply_blocks(res.value, w)))
    weights = r / r.mean()
    assert res.error == pytest.approx((((eff - w) ** 2).sum(1) * weights).sum(), rel=1e-4)
    assert res.identity_error == pytest.approx((((q(w) - w) ** 2).sum(1) * weights).sum(), rel=1e-4)
    assert res.error < 0.8 * res.identity_error
    assert not np.allclose(res.value, plain.value)


def test_vo_row_weights_weigh_vs_rows():
    """Uniform row weights change nothing; other weights weigh V's rows (its input channels) in its error, O's error
    staying unweighted: the reported errors are recomputed here from the returned transforms and never end above
    RTN's."""
    rng = np.random.default_rng(5)
    kv_map, d = (0, 0, 1, 1), 8
    a, b = _outlier_weight(rng, 64, 2 * d), _outlier_weight(rng, 4 * d, 48)
    cfg = LearnConfig(steps=60)
    plain = learn_vo(a, b, kv_map, d, GRID, GRID, cfg)
    ones = learn_vo(a, b, kv_map, d, GRID, GRID, cfg, np.ones(64))
    assert np.array_equal(plain.value, ones.value) and plain.error == pytest.approx(ones.error, rel=1e-6)
    ra = rng.uniform(0.1, 5.0, 64)
    res = learn_vo(a, b, kv_map, d, GRID, GRID, cfg, ra)

    def q(x):
        return GRID(torch.tensor(x, dtype=torch.float32), False).double().numpy()

    def weighted(m):
        m_inv = np.linalg.inv(m)
        a_t = np.concatenate([a[:, h * d:(h + 1) * d] @ m[h] for h in range(2)], axis=1)
        a_hat = q(a_t)
        a_eff = np.concatenate([a_hat[:, h * d:(h + 1) * d] @ m_inv[h] for h in range(2)], axis=1)
        b_t = np.concatenate([m_inv[h] @ b[j * d:(j + 1) * d] for j, h in enumerate(kv_map)])
        b_hat = q(b_t)
        b_eff = np.concatenate([m[h] @ b_hat[j * d:(j + 1) * d] for j, h in enumerate(kv_map)])
        wa = ra / ra.mean()
        return ((a_eff - a) ** 2).sum(1) @ wa / ((a ** 2).sum(1) @ wa) + ((b_eff - b) ** 2).sum() / (b ** 2).sum()

    assert res.error == pytest.approx(weighted(res.value), rel=1e-4)
    assert res.identity_error == pytest.approx(weighted(np.broadcast_to(np.eye(d), (2, d, d))), rel=1e-4)
    assert res.error < res.identity_error
    assert not np.allclose(res.value, plain.value)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 48, True), (2, 32, False)])
def test_updown_scale_gradient_is_autograd_of_its_error(bits, group, sym, fq_path):
    """The up·down scale learner's hand-written error and gradient equal autograd of its formula (a padded last
    group: 100 rows in groups of 48)."""
    from qcompiler.algorithms.cafeq import _updown_error_and_grad

    g = torch.Generator().manual_seed(bits * 10 + group)
    dn = torch.randn(100, 24, generator=g, dtype=torch.float64)
    dn[:, 0] = torch.round(dn[:, 0] * 2)  # ties
    weight = torch.rand(100, generator=g, dtype=torch.float64) + 0.5
    theta0 = 0.3 * torch.randn(100, generator=g, dtype=torch.float64)
    grid = GridSpec(bits, group, sym)
    theta = theta0.clone().requires_grad_(True)
    s = torch.exp(theta)[:, None]
    x = dn / s
    ref = (weight[:, None] * ((grid(x, True) - x) * s) ** 2).sum() / 7.0
    ref.backward()
    with torch.no_grad():
        value, grad = _updown_error_and_grad(theta0.clone(), dn, weight, 7.0, grid)
    assert value == pytest.approx(float(ref.detach()), rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), theta.grad.numpy(), rtol=1e-9, atol=1e-12 * float(theta.grad.abs().max()))
    assert torch.count_nonzero(grad) > 0
