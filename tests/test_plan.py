import numpy as np

from qcompiler.config import MatchConfig, QuantConfig
from qcompiler.graphio import import_graph
from qcompiler.match.sites import find_linear_sites, site_weight
from qcompiler.methods.rtn import plan_rtn
from qcompiler.plan import QuantPlan, joint_rounded_sites
from tests.graphs import mixed_model


def test_plan_roundtrips_through_npz(tmp_path):
    graph = import_graph(mixed_model())
    match = find_linear_sites(graph, MatchConfig())
    plan = plan_rtn(match.sites, lambda s: site_weight(graph, s), QuantConfig(3, 32, True))
    plan.save(tmp_path / "p.npz")
    back = QuantPlan.load(tmp_path / "p.npz")
    assert back.method == "rtn" and back.quant == plan.quant
    assert [p.site for p in back.sites] == [p.site for p in plan.sites]
    for a, b in zip(back.sites, plan.sites, strict=True):
        assert np.array_equal(a.weight.codes, b.weight.codes) and np.array_equal(a.weight.scales, b.weight.scales)
        assert a.stats == b.stats
    summary = plan.summary()
    assert [s["id"] for s in summary] == ["W1", "W2t", "W3"]
    assert all(0 < s["rel_error"] < 0.5 and s["bits"] == 3 for s in summary)


def test_rtn_reports_relative_and_proxy_error():
    graph = import_graph(mixed_model())
    match = find_linear_sites(graph, MatchConfig())
    plan = plan_rtn(match.sites, lambda s: site_weight(graph, s), QuantConfig(4, 32, False))
    for p in plan.sites:
        w = site_weight(graph, p.site)
        w_hat = p.weight.dequantize()
        assert np.isclose(p.stats.rel_error, np.linalg.norm(w_hat - w) / np.linalg.norm(w))
        assert np.isclose(p.stats.proxy_error, np.sum((w_hat - w) ** 2), rtol=1e-5)


def test_nan_weight_is_named():
    import pytest

    from qcompiler.errors import QCompilerError

    graph = import_graph(mixed_model())
    match = find_linear_sites(graph, MatchConfig())

    def weights(site):
        w = site_weight(graph, site)
        if site.id == "W2t":
            w[0, 0] = np.nan
        return w

    with pytest.raises(QCompilerError, match="W2t"):
        plan_rtn(match.sites, weights, QuantConfig())


def test_joint_rounded_sites_ignore_float_rounding():
    """Sites joint rounding left alone differ from their plain error by float noise only: not counted."""
    import dataclasses

    graph = import_graph(mixed_model())
    match = find_linear_sites(graph, MatchConfig())
    plan = plan_rtn(match.sites, lambda s: site_weight(graph, s), QuantConfig(3, 32, True))
    noise, changed, untouched = plan.sites
    sites = (
        dataclasses.replace(noise, stats=dataclasses.replace(noise.stats, plain_rel_error=noise.stats.rel_error
                                                             * (1 + 2e-9))),
        dataclasses.replace(changed, stats=dataclasses.replace(changed.stats, plain_rel_error=changed.stats.rel_error
                                                               * 0.9)),
        untouched,  # no plain error recorded (not a cafeq plan)
    )
    joint = joint_rounded_sites(dataclasses.replace(plan, sites=sites))
    assert [p.site.id for p in joint] == [changed.site.id]
    assert joint_rounded_sites(plan) == ()
