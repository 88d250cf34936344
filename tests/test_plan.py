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


def test_regrid_role_gives_the_head_its_own_grid():
    """An 8-bit head in a 4-bit plan: only the head is re-rounded; MatMulNBits writes it at 8 bits and ONNX
    Runtime runs it closer to float than the 4-bit head."""
    import onnxruntime as ort

    from qcompiler.emit import emit_model
    from qcompiler.passes import MatMulNBitsPass, PassManager
    from qcompiler.plan import regrid_role

    model = mixed_model()
    graph = import_graph(model)
    match = find_linear_sites(graph, MatchConfig(quantize_lm_head=True))
    plan = plan_rtn(match.sites, lambda s: site_weight(graph, s), QuantConfig(4, 16, True))
    head8 = regrid_role(plan, "head", QuantConfig(8, 16, True), lambda s: site_weight(graph, s))
    by_id = {p.site.id: p for p in head8.sites}
    assert [p.site.role for p in plan.sites if p.weight.bits == 8] == []
    assert by_id["Wh"].weight.bits == 8 and by_id["Wh"].site.role == "head"
    assert by_id["Wh"].stats.rel_error < 0.1 * next(p for p in plan.sites if p.site.id == "Wh").stats.rel_error
    assert all(by_id[p.site.id] is p for p in plan.sites if p.site.role != "head")
    assert regrid_role(plan, "head", QuantConfig(4, 16, True), None) == plan  # same grid: nothing re-rounded

    x = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)

    def head_error(p):
        out = emit_model(PassManager([MatMulNBitsPass(p)])(import_graph(model)).graph, model, {})
        bits = {n.name: a.i for n in out.graph.node if n.op_type == "MatMulNBits"
                for a in n.attribute if a.name == "bits"}
        sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got, want = sess.run(["logits"], {"x": x})[0], ref.run(["logits"], {"x": x})[0]
        return bits, np.linalg.norm(got - want) / np.linalg.norm(want)

    bits4, err4 = head_error(plan)
    bits8, err8 = head_error(head8)
    assert sorted(bits8.values()) == [4, 4, 4, 8] and sorted(bits4.values()) == [4, 4, 4, 4]
    assert err8 < err4


def test_compile_report_names_the_head_grid(tmp_path):
    import onnx

    from qcompiler.config import CompileConfig
    from qcompiler.pipeline import compile_model
    from qcompiler.report import summary_lines

    onnx.save(mixed_model(), str(tmp_path / "m.onnx"))
    cfg = CompileConfig(quant=QuantConfig(4, 16, True), match=MatchConfig(quantize_lm_head=True))
    result = compile_model(str(tmp_path / "m.onnx"), None, cfg)
    lines = summary_lines(result, cfg, 0.0, False)
    assert any(line.startswith("  head Wh: 40 x 48 at 8-bit block 16 sym, weight rel. error 0.") for line in lines)
