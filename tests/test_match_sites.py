import numpy as np
import onnx

from qcompiler.config import MatchConfig
from qcompiler.graphio import import_graph
from qcompiler.match.sites import find_linear_sites, site_weight
from tests.graphs import conv_model, mixed_model, shared_weight_model


def _match(model, **kw):
    graph = import_graph(model)
    return graph, find_linear_sites(graph, MatchConfig(**kw))


def test_finds_direct_transposed_and_gemm_weights():
    model = mixed_model()
    graph, m = _match(model)
    by_node = {s.node: s for s in m.sites}
    assert set(by_node) == {"mm1", "mm2", "gemm3"}
    assert (by_node["mm1"].k, by_node["mm1"].n, by_node["mm1"].transposed) == (64, 96, False)
    assert by_node["mm1"].bias == "b1"
    assert (by_node["mm2"].k, by_node["mm2"].n, by_node["mm2"].transposed) == (96, 64, True)
    assert (by_node["gemm3"].k, by_node["gemm3"].n, by_node["gemm3"].transposed) == (64, 48, True)
    assert by_node["gemm3"].bias == "b3"
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(site_weight(graph, by_node["mm2"]), inits["W2t"].T)
    np.testing.assert_array_equal(site_weight(graph, by_node["gemm3"]), inits["W3"].T)


def test_every_rejection_has_a_reason():
    _, m = _match(mixed_model())
    reasons = {r.node: r.reason for r in m.rejected}
    assert "run time" in reasons["mm_dyn"]
    assert "head" in reasons["head"]


def test_head_is_offered_when_asked():
    _, m = _match(mixed_model(), quantize_lm_head=True)
    head = [s for s in m.sites if s.node == "head"]
    assert head and head[0].role == "head"


def test_shared_weights_and_embeddings_are_skipped_with_reasons():
    _, m = _match(shared_weight_model())
    assert m.sites == ()
    reasons = {r.node: r.reason for r in m.rejected}
    assert "shared" in reasons["mmA"] and "shared" in reasons["mmB"]
    assert "embedding" in reasons["embed"]


def test_matcher_does_not_edit_the_graph():
    model = mixed_model()
    before = model.SerializeToString()
    _match(model)
    assert model.SerializeToString() == before


def test_ids_fall_back_to_initializer_names_and_are_unique():
    _, m = _match(mixed_model())
    ids = [s.id for s in m.sites]
    assert ids == ["W1", "W2t", "W3"] and len(set(ids)) == len(ids)


def test_other_ops_with_constant_weights_are_listed_with_a_reason():
    """A patch-embedding Conv and a ConvTranspose head are not sites, but not invisible either."""
    _, m = _match(conv_model(), quantize_lm_head=True)
    assert [s.node for s in m.sites] == ["proj"]
    reasons = {r.node: (r.op_type, r.reason) for r in m.rejected}
    assert reasons["patch_embed"] == ("Conv", "not a MatMul/Gemm site: constant weight [16, 3, 4, 4] kept in float")
    assert reasons["deconv"][0] == "ConvTranspose" and "[16, 2, 2, 2]" in reasons["deconv"][1]
    assert "gram" not in reasons  # an Einsum between activations has no weight


def test_the_compilers_online_transforms_are_named_as_such():
    model = conv_model()
    for t in model.graph.initializer:
        if t.name == "Wc":
            t.name = "x_online_T_inv"
    model.graph.node[0].input[1] = "x_online_T_inv"
    _, m = _match(model)
    assert {r.node: r.reason for r in m.rejected}["patch_embed"].startswith("online transform x T^-1")
