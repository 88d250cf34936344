"""The run-time cost model of CafeQ's online ops and the budget's choice of units."""


import numpy as np
import pytest

from qcompiler.algorithms.grid import quantize
from qcompiler.algorithms.packing import pack_matmulnbits
from qcompiler.config import CafeqConfig, MatchConfig, QuantConfig
from qcompiler.errors import ConfigError
from qcompiler.graphio import import_graph
from qcompiler.match.sites import LinearSite, find_linear_sites, float_weight_bytes
from qcompiler.methods.online_cost import (
    OP_FIXED_BYTES,
    Unit,
    block_for,
    candidate_units,
    cheapest_first,
    op_cost,
    step_cost,
    stored_bytes,
)


def _site(sid: str, k: int, n: int, dtype: str = "float32") -> LinearSite:
    return LinearSite(id=sid, node=f"{sid}_node", op_type="MatMul", weight=f"{sid}_w", transposed=False, k=k, n=n,
                      input=f"{sid}_in", output=f"{sid}_out", bias=None, role="linear", dtype=dtype)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 128, True), (2, 64, False), (8, 32, True)])
def test_stored_bytes_are_those_of_the_packed_tensors(bits, group, sym):
    k, n = 256, 24
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    t = pack_matmulnbits(quantize(w, bits, group, sym))
    packed = t.b.nbytes + t.scales.nbytes + (t.zero_points.nbytes if t.zero_points is not None else 0)
    assert stored_bytes(_site("s", k, n), QuantConfig(bits, group, sym)) == packed


def test_token_steps_charge_each_op_its_fixed_cost_and_batches_their_arithmetic():
    sites = [_site("a", 576, 960), _site("b", 576, 3072)]
    q = QuantConfig(4, 128, True)
    batch, token = step_cost("batch", sites, q), step_cost("token", sites, q, float_bytes=10**6)
    assert batch.macs == token.macs == 576 * (960 + 3072)
    assert token.token_bytes == pytest.approx(sum(stored_bytes(s, q) for s in sites) + 10**6)
    assert op_cost(576, 64, batch) == pytest.approx(576 * 64 / batch.macs)
    assert op_cost(576, 64, token) == pytest.approx((OP_FIXED_BYTES + 4 * 576 * 64) / token.token_bytes)
    # at a token step a smaller block saves its T^-1's bytes, not the op's fixed cost
    assert op_cost(576, 16, token) > 0.4 * op_cost(576, 64, token)
    assert op_cost(576, 16, batch) == pytest.approx(0.25 * op_cost(576, 64, batch))
    with pytest.raises(ValueError, match="regime"):
        step_cost("auto", sites, q)


def test_units_are_groups_and_lone_uncovered_sites_with_a_usable_block():
    class Group:
        def __init__(self, gid, tensor, members):
            self.id, self.input, self.members = gid, tensor, members

    sites = {s.id: s for s in [_site("q", 64, 64), _site("k", 64, 32), _site("o", 64, 64), _site("down", 128, 64),
                               _site("odd", 36, 8)]}
    step = step_cost("batch", list(sites.values()), QuantConfig(4, 32, False))
    units = candidate_units(sites, [Group("qk", "x", ("q", "k"))], {"o"}, 64, step)
    assert [u.id for u in units] == ["qk", "down"]  # cheapest first; o covered; K=36 has no block >= 8
    assert [u.block for u in units] == [64, 64] and units[0].members == ("q", "k")
    assert block_for(96, 64) == 32 and block_for(36, 64) is None
    assert block_for(36, 1) == 1  # a diagonal T fits any width


def test_cheapest_first_skips_what_no_longer_fits():
    units = [Unit("dear", "y", ("b",), 64, 0.02), Unit("cheap", "x", ("a",), 64, 0.01),
             Unit("least", "z", ("c",), 64, 0.001), Unit("tie", "w", ("d",), 64, 0.01)]
    assert [u.id for u in cheapest_first(units, 0.021)] == ["least", "cheap", "tie"]
    assert [u.id for u in cheapest_first(units, 0.035)] == ["least", "cheap", "tie"]  # dear would pass 3.5%
    assert [u.id for u in cheapest_first(units, 1.0)] == ["least", "cheap", "tie", "dear"]
    assert cheapest_first(units, 0.0) == []


def test_float_weight_bytes_counts_the_head_kept_in_float(tiny_checkpoints, cache_dir):
    from qcompiler.frontends import load_model

    model = load_model(str(tiny_checkpoints["llama"]), cache_dir=cache_dir).model
    graph = import_graph(model)
    match = find_linear_sites(graph, MatchConfig(quantize_lm_head=False))  # a KV-cache decoder's is quantized
    head = [r for r in match.rejected if "output head" in r.reason]
    assert len(head) == 1
    assert float_weight_bytes(graph, match.sites) == 512 * 64 * 4  # vocab x hidden, float32


def test_the_regime_decides_how_many_online_ops_fit(smollm2):
    """SmolLM2 at the default 3% budget: counted as arithmetic (batch, the default) all 60 groups and 9
    of the 30 down projections fit; counted at a token step, each op's fixed cost leaves 23. The choice a
    plan makes (``select_online_units``, what a compile's planner and a streamed compile both use), on the
    real model's sites and pairs."""
    from qcompiler.analyze import analyze_graph
    from qcompiler.methods.rotate import Rotate
    from qcompiler.methods.transform_planner import select_online_units

    q, cfg = QuantConfig(3, 128, True), CafeqConfig()
    graph = import_graph(smollm2.model)
    analysis = analyze_graph(graph, smollm2.model)
    floats = float_weight_bytes(graph, analysis.sites)
    chosen = {regime: select_online_units(analysis, cfg, step_cost(regime, analysis.sites, q, floats), Rotate.recipe)
              for regime in ("batch", "token")}
    assert len(chosen["batch"]) == 69 and 15 <= len(chosen["token"]) <= 30, {k: len(v) for k, v in chosen.items()}
    assert chosen["token"] < chosen["batch"]  # the token regime keeps a subset: the cheapest units
    with pytest.raises(ConfigError, match="--online-regime"):
        CafeqConfig(online_regime="fast")
