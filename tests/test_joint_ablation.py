"""tools/joint_ablation.py: rows name the pairs they mean, the plain and joint weights come from the float model
whatever was applied before, and the sink rule's states and ratios are those of a one-token forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tools import joint_ablation as ja


def test_rows_parse_and_print_back():
    chosen = ja.parse_row("vo:0-2,5;updown:3", 8)
    assert chosen == {("vo", 0), ("vo", 1), ("vo", 2), ("vo", 5), ("updown", 3)}
    assert ja.format_row(chosen) == "vo:0-2,5;updown:3"
    assert ja.parse_row(ja.format_row(chosen), 8) == chosen
    assert ja.parse_row("plain", 8) == set() and ja.format_row(set()) == "plain"
    for bad in ("qk:0", "vo", "vo:7-9"):
        with pytest.raises(ValueError):
            ja.parse_row(bad, 8)


@pytest.fixture()
def ablation(tiny_checkpoints):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32).eval()
    return ja.Ablation(model, 3, 16, True)


def test_rows_put_the_named_pairs_in_place_from_the_float_weights(ablation):
    from qcompiler.algorithms.fold import product_error
    from qcompiler.algorithms.grid import quantize

    model = ablation.model
    ablation.apply(set())  # plain RTN everywhere, then a joint row: its factors still come from the float model
    a, b = ja.pair_factors(ablation.original, "vo", 0)
    assert not np.allclose(ja.pair_factors(model.state_dict(), "vo", 0)[0], a)
    want = quantize(a.astype(np.float32), 3, 16, True).dequantize()
    np.testing.assert_allclose(ja.pair_factors(model.state_dict(), "vo", 0)[0], want, atol=1e-6)
    ablation.apply({("vo", 0), ("updown", 1)})
    ja_, jb = ablation.joint_pair("vo", 0)
    np.testing.assert_allclose(ja.pair_factors(model.state_dict(), "vo", 0)[0], ja_, atol=1e-6)
    d, rep = ablation.heads
    kv_map = tuple(j // rep for j in range(b.shape[0] // d))
    plain = product_error(a, b, want, quantize(b.astype(np.float32), 3, 16, True).dequantize(), d, kv_map)
    assert product_error(a, b, ja_, jb, d, kv_map) <= plain  # joint rounding keeps the better per-head product
    assert not np.allclose(ja_, want)  # and it moved V off the nearest grid point somewhere
    np.testing.assert_allclose(ja.pair_factors(model.state_dict(), "vo", 1)[0],  # an unnamed pair stays plain
                               ja.pair_factors(ablation.plain, "vo", 1)[0], atol=0)
    ablation.apply(set(), float_weights=True)
    for name, w in ablation.original.items():
        assert torch.equal(model.state_dict()[name], w), name


def test_sink_states_and_ratios(ablation):
    model = ablation.model
    ablation.apply(set(), float_weights=True)
    states = ja.sink_states(model, 3)
    layer = model.model.layers[0]
    with torch.no_grad():
        want = layer.input_layernorm(model.model.embed_tokens(torch.tensor([[3]])))[0].double().numpy()
    np.testing.assert_allclose(states[("vo", 0)], want, rtol=1e-5, atol=1e-6)
    assert set(states) == {(k, i) for k in ja.KINDS for i in range(len(model.model.layers))}
    ratios = ablation.sink_ratios(3)
    assert set(ratios) == set(states) and all(np.isfinite(r) and r >= 0 for r in ratios.values())
    # the ratio is the joint pair's sink output error over the plain pair's, recomputed here for one pair
    a, b = ja.pair_factors(ablation.original, "updown", 1)
    x = states[("updown", 1)]
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        gate = torch.nn.functional.silu(mlp.gate_proj(torch.from_numpy(x).float())).double().numpy()

    def out(fa, fb):
        return (gate * (x @ fa)) @ fb
    err = [np.sum((out(*f) - out(a, b)) ** 2)
           for f in (ablation.joint_pair("updown", 1), ja.pair_factors(ablation.plain, "updown", 1))]
    assert ratios[("updown", 1)] == pytest.approx(err[0] / err[1], rel=1e-5)


def test_round_table_ends_on_the_sink_ratios_of_full_joint_rounding(ablation):
    """--rounds-table: one (sink ratio, bound) per round per pair; its last round is the compile's joint rounding,
    whose sink ratio is :meth:`sink_ratios`'."""
    table = ablation.round_table(3, ("updown",))
    ratios = ablation.sink_ratios(3)
    assert [i for _, i, _ in table] == list(range(len(ablation.model.model.layers)))
    for kind, i, rows in table:
        assert kind == "updown" and len(rows) == 2  # --joint-mlp-rounds' default
        assert all(np.isfinite(r) and 0 < b <= 1 + 1e-12 for r, b in rows)
        assert rows[-1][0] == pytest.approx(ratios[("updown", i)], rel=1e-9)
    # the first round's bound is that of a one-round joint rounding with the compile's up·down settings
    from qcompiler.algorithms.joint import JointConfig, joint_round

    a, b = ja.pair_factors(ablation.original, "updown", 1)
    one = joint_round(a, b, ablation.grid, ablation.grid, None, cfg=JointConfig(rounds=1, channel_weight=4.0))
    assert table[1][2][0][1] == pytest.approx((one.pqe / one.pqe_plain) ** 2, rel=1e-12)
    assert table[1][2][0][1] >= table[1][2][1][1] - 1e-12  # a second round never raises the kept product error
