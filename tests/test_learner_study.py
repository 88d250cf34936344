"""tools/learner_study.py on a tiny Llama: the weighted learner never ends above RTN under its own weighted error,
and the start table's cells are bounded by RTN and by their start."""

import numpy as np
import torch

from qcompiler.algorithms.fakequant import fake_quant
from qcompiler.algorithms.grid import GridSpec
from tools.learner_study import _groups, _stack, norm_gain, start_table, weighted_learn


def _tiny(tiny_checkpoints):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(tiny_checkpoints["llama"]), dtype=torch.float32).eval()


def test_weighted_learner_ends_at_or_below_rtn_under_its_weights(tiny_checkpoints):
    model = _tiny(tiny_checkpoints)
    grid = GridSpec(3, 32, True)
    mods, norm = _groups(model, 0)["qkv"]
    w = _stack(mods)
    rows = np.random.default_rng(0).uniform(0.1, 4.0, w.shape[0])
    rtn = fake_quant(torch.tensor(w), 3, 32, True, False).numpy()
    learned = weighted_learn(w, rows, grid, steps=30, lr=2e-2)
    assert learned.shape == w.shape
    weighted = lambda w_hat: float((((w_hat - w) ** 2).sum(1) * rows).sum())  # noqa: E731
    assert weighted(learned) <= weighted(rtn) * (1 + 1e-5)
    assert not np.allclose(learned, rtn)  # it moved
    assert norm_gain(model, norm).shape == (w.shape[0],)


def test_start_table_cells_are_bounded(tiny_checkpoints):
    model = _tiny(tiny_checkpoints)
    lines = start_table(model, [0, 1], GridSpec(3, 32, True), [5, 20])
    rows = [line for line in lines[2:]]
    assert len(rows) == 4  # 2 layers x (q/k/v, gate/up)
    for row in rows:
        cells = [float(c) for c in row.strip("|").split("|")[1:]]
        identity, sinq_alone, sinq = cells[:2], cells[2], cells[3:]
        assert all(0 < c <= 1.0 for c in cells), row  # never above RTN
        assert all(c <= sinq_alone + 1e-12 for c in sinq), row  # never above its start
        assert identity[1] <= 1.0


def test_power_table_correlates_each_input_over_the_layers(tiny_checkpoints):
    """One row, a cell per input kind, each a mean and a minimum of correlations (within [-1, 1], mean >= min); the
    text's own power correlates perfectly with itself."""
    from tools.learner_study import POWER_INPUTS, input_power, log_corr, power_table, random_ids

    model = _tiny(tiny_checkpoints)
    ids = random_ids(model.config.vocab_size, 64, seed=1, length=32)
    lines = power_table(model, ids, 64)
    assert len(lines) == 3 and lines[0].count("|") == len(POWER_INPUTS) + 2
    for cell in lines[2].strip("|").split("|")[1:]:
        mean, low = (float(part.split()[-1]) for part in cell.split(","))
        assert -1 <= low <= mean <= 1
    power = input_power(model, ids)
    assert all(len(v) == len(model.model.layers) and all(p.shape == v[0].shape for p in v) for v in power.values())
    assert log_corr(power["O's input (after attention)"][0], power["O's input (after attention)"][0]) > 0.999


def test_schedule_table_rows_bounded_by_rtn_and_steps_as_asked(tiny_checkpoints):
    """One row per group (q/k/v, gate/up, down) per layer, each cell an error over RTN's in (0, 1] with the steps run
    (at most those asked), a variant with a column batch of its own too; a mean row and a time row relative to the
    first variant's (1.00)."""
    from tools.learner_study import schedule_table

    model = _tiny(tiny_checkpoints)
    variants = ["constant:20:0.02", "cosine:10:0.04", "constant:10:0.02:8"]
    lines = schedule_table(model, [0], GridSpec(3, 32, True), variants)
    body, mean, timing = lines[2:-2], lines[-2], lines[-1]
    assert len(body) == 3
    for row in body:
        for cell, asked in zip(row.strip("|").split("|")[1:], (20, 10, 10), strict=True):
            ratio, steps = cell.split()
            assert 0 < float(ratio) <= 1.0 and 0 < int(steps.strip("()")) <= asked, row
    assert mean.startswith("| mean") and timing.split("|")[2].strip() == "1.00"
