"""OnlineTransformPass: structure, ONNX checker, numeric equivalence on ONNX Runtime, negative cases."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from qcompiler.algorithms.transforms import random_invertible
from qcompiler.analyze import analyze_graph
from qcompiler.emit import emit_model
from qcompiler.frontends import load_model
from qcompiler.graphio import import_graph
from qcompiler.passes import OnlineTransformPass, PassError, PassManager
from qcompiler.plan import OnlineTransform
from qcompiler.runtime.inputs import sample_inputs
from tests.helpers import outputs, rel


def _transforms(analysis, b, rng):
    """One random T per sibling group and per lone site."""
    grouped = {m for g in analysis.groups for m in g.members}
    units = [(g.id, g.input, g.members) for g in analysis.groups]
    units += [(s.id, s.input, (s.id,)) for s in analysis.sites if s.id not in grouped]
    out = []
    for uid, tensor, members in units:
        k = next(s.k for s in analysis.sites if s.id == members[0])
        out.append(OnlineTransform(uid, tensor, members, np.stack([random_invertible(b, rng) for _ in range(k // b)])))
    return out


def _nodes(layout, graph, transforms) -> int:
    """Nodes the ops add: matmul 6 each; conv 3 on a ``[B, S, K]`` input (Transpose, Conv, Transpose), else 4."""
    tensors = graph.tensors()
    ranks = [len(tensors[t.input].shape) if tensors[t.input].shape is not None else 0 for t in transforms]
    return sum(6 if layout == "matmul" else 3 if r == 3 else 4 for r in ranks)


def _check_equivalent(graph, model, before: bytes) -> None:
    """The rewritten graph passes the ONNX checker and computes what the model ``before`` did (1e-5)."""
    out = emit_model(graph, model, {})
    onnx.checker.check_model(out, full_check=True)
    feeds = sample_inputs(model, batch=2, seq=7)
    ref, got = outputs(onnx.ModelProto.FromString(before), feeds), outputs(out, feeds)
    assert all(rel(got[k], ref[k]) < 1e-5 for k in ref), {k: rel(got[k], ref[k]) for k in ref}


@pytest.mark.parametrize("layout", ["matmul", "conv"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # 3-D activations; GPT-2's 2-D Gemm inputs
def test_structure_checker_and_equivalence(family, layout, pair_checkpoints, cache_dir):
    model = load_model(str(pair_checkpoints[family]), cache_dir=cache_dir).model
    before = model.SerializeToString()
    graph = import_graph(model)
    analysis = analyze_graph(graph, model)
    transforms = _transforms(analysis, 16, np.random.default_rng(0))
    n_before, added = len(graph.nodes), _nodes(layout, graph, transforms)
    if family == "llama" and layout == "conv":
        assert added == 3 * len(transforms)  # every input is [B, S, K]: the transposed form
    if family == "gpt2" and layout == "conv":
        assert added > 3 * len(transforms)  # its 2-D Gemm inputs take the reshaped form
    result = OnlineTransformPass(transforms, {s.id: s for s in analysis.sites}, layout)(graph)
    assert result.modified
    ops = [n.op for n in result.graph.nodes]
    assert len(ops) == n_before + added
    assert ops.count("Conv") == (len(transforms) if layout == "conv" else 0)
    members = {m for t in transforms for m in t.sites}
    for s in analysis.sites:  # every member reads the transformed tensor; the others do not
        node = next(n for n in result.graph.nodes if n.name == s.node)
        assert node.inputs[0].name.endswith("_online_out") == (s.id in members)
    _check_equivalent(result.graph, model, before)


def test_no_transforms_is_a_no_op(pair_checkpoints, cache_dir):
    model = load_model(str(pair_checkpoints["llama"]), cache_dir=cache_dir).model
    result = PassManager([OnlineTransformPass([], {})])(import_graph(model))
    assert not result.modified


def test_refuses_wrong_width_and_foreign_input(pair_checkpoints, cache_dir):
    model = load_model(str(pair_checkpoints["llama"]), cache_dir=cache_dir).model
    graph = import_graph(model)
    analysis = analyze_graph(graph, model)
    sites = {s.id: s for s in analysis.sites}
    g = analysis.groups[0]
    with pytest.raises(PassError, match="covers 32"):
        OnlineTransformPass([OnlineTransform(g.id, g.input, g.members, np.stack([np.eye(16)] * 2))], sites)(graph)
    other = analysis.groups[1]
    with pytest.raises(PassError, match="does not read"):
        OnlineTransformPass([OnlineTransform(g.id, other.input, g.members, np.stack([np.eye(16)] * 4))], sites)(graph)


def _gain_muls(graph, transforms):
    """The transforms whose input is ``Mul(x, constant gain)``: a norm's gain, foldable."""
    tensors = graph.tensors()
    return [t for t in transforms if tensors[t.input].inputs and tensors[t.input].inputs[0].op == "Mul"
            and any(isinstance(i, gs.Constant) for i in tensors[t.input].inputs[0].inputs)]


@pytest.mark.parametrize("layout", ["matmul", "conv"])
def test_norm_gain_is_folded_exactly(layout, pair_checkpoints, cache_dir):
    model = load_model(str(pair_checkpoints["llama"]), cache_dir=cache_dir).model
    graph = import_graph(model)
    analysis = analyze_graph(graph, model)
    rng = np.random.default_rng(1)
    transforms = _transforms(analysis, 16, rng)
    gains = _gain_muls(graph, transforms)
    assert len(gains) >= 2  # the RMSNorm gains before q/k/v and gate/up
    for t in gains:  # a fresh model's gains are ones: make them tell rows from columns
        c = next(i for i in graph.tensors()[t.input].inputs[0].inputs if isinstance(i, gs.Constant))
        c.values = rng.uniform(0.5, 1.5, c.values.shape).astype(c.values.dtype)
    before = emit_model(graph, model, {}).SerializeToString()
    n_before, muls = len(graph.nodes), sum(n.op == "Mul" for n in graph.nodes)
    added = _nodes(layout, graph, transforms)
    p = OnlineTransformPass(transforms, {s.id: s for s in analysis.sites}, layout, fold_scale=True)
    result = p(graph)
    assert p.folded == len(gains)
    ops = [n.op for n in result.graph.nodes]
    assert len(ops) == n_before + added - len(gains)
    assert ops.count("Mul") == muls - len(gains)
    _check_equivalent(result.graph, model, before)


def test_gain_read_elsewhere_is_not_folded(pair_checkpoints, cache_dir):
    model = load_model(str(pair_checkpoints["llama"]), cache_dir=cache_dir).model
    graph = import_graph(model)
    analysis = analyze_graph(graph, model)
    transforms = _transforms(analysis, 16, np.random.default_rng(2))
    gains = _gain_muls(graph, transforms)
    shared = graph.tensors()[gains[0].input]  # a second reader: the Mul's output must stay
    extra = gs.Variable("extra_out", dtype=shared.dtype)
    graph.nodes.append(gs.Node("Identity", "extra", inputs=[shared], outputs=[extra]))
    graph.outputs.append(extra)
    p = OnlineTransformPass(transforms, {s.id: s for s in analysis.sites}, "conv", fold_scale=True)
    result = p(graph)
    assert p.folded == len(gains) - 1
    assert shared.name in result.graph.tensors() and shared.inputs[0].op == "Mul"


def test_refuses_unknown_layout():
    with pytest.raises(PassError, match="layout"):
        OnlineTransformPass([], {}, "auto")


def test_only_a_full_width_input_scaling_folds():
    from qcompiler.passes.online_transform import _foldable_scale

    def scaled(a_shape, s_shape):
        a = gs.Variable("a", dtype=np.float32, shape=a_shape)
        x = gs.Variable("x", dtype=np.float32, shape=[2, 3, 8])
        gs.Node("Mul", "mul", inputs=[a, gs.Constant("s", np.full(s_shape, 2.0, np.float32))], outputs=[x])
        gs.Node("MatMul", "site", inputs=[x, gs.Constant("w", np.ones((8, 4), np.float32))],
                outputs=[gs.Variable("y", dtype=np.float32)])
        return x

    found = _foldable_scale(scaled([2, 3, 8], [1, 1, 8]), 8, {"site"}, set())
    assert found is not None and found[0].name == "a" and np.array_equal(found[1], np.full(8, 2.0))
    assert _foldable_scale(scaled([2, 3, 1], [8]), 8, {"site"}, set()) is None  # a broadcast along K
    assert _foldable_scale(scaled([2, 3, 8], [8]), 8, {"other"}, set()) is None  # x read by a non-member
    assert _foldable_scale(scaled([2, 3, 8], [8]), 8, {"site"}, {"x"}) is None  # x is a graph output
    assert _foldable_scale(scaled([2, 3, 8], [2, 3, 8]), 8, {"site"}, set()) is None  # not a per-channel gain


def _diagonal(analysis, rng):
    """A random positive diagonal ``T`` (``[K, 1, 1]`` blocks) per sibling group and per lone site."""
    return [OnlineTransform(t.id, t.input, t.sites, rng.uniform(0.5, 2.0, (t.blocks.shape[0] * 16, 1, 1)))
            for t in _transforms(analysis, 16, rng)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # RMSNorm's gain Mul; LayerNormalization's scale and bias
def test_diagonal_transforms_are_absorbed_into_the_gain_before_them(family, pair_checkpoints, cache_dir):
    model = load_model(str(pair_checkpoints[family]), cache_dir=cache_dir).model
    graph = import_graph(model)
    analysis = analyze_graph(graph, model)
    transforms = _diagonal(analysis, np.random.default_rng(3))
    tensors = graph.tensors()

    def producer(name):  # through GPT-2's Reshape to Gemm rows
        node = tensors[name].inputs[0]
        return node.inputs[0].inputs[0] if node.op == "Reshape" else node
    normed = [t for t in transforms if producer(t.input).op == "LayerNormalization"
              or (producer(t.input).op == "Mul" and any(isinstance(i, gs.Constant) for i in producer(t.input).inputs))]
    assert len(normed) >= 2  # the norms before q/k/v and gate/up (GPT-2: c_attn and c_fc)
    before = model.SerializeToString()
    n_before = len(graph.nodes)
    p = OnlineTransformPass(transforms, {s.id: s for s in analysis.sites}, "conv")
    result = p(graph)
    assert p.absorbed == len(normed)  # no node for them; one Mul for each of the others
    ops = [n.op for n in result.graph.nodes]
    assert len(ops) == n_before + len(transforms) - len(normed)
    assert sum(n.name.endswith("_online_Mul") for n in result.graph.nodes) == len(transforms) - len(normed)
    _check_equivalent(result.graph, model, before)


def test_diagonal_is_not_absorbed_into_a_gain_read_elsewhere(pair_checkpoints, cache_dir):
    model = load_model(str(pair_checkpoints["llama"]), cache_dir=cache_dir).model
    graph = import_graph(model)
    analysis = analyze_graph(graph, model)
    transforms = _diagonal(analysis, np.random.default_rng(4))
    gains = _gain_muls(graph, transforms)
    shared = graph.tensors()[gains[0].input]
    extra = gs.Variable("extra_out", dtype=shared.dtype, shape=shared.shape)
    graph.nodes.append(gs.Node("Identity", "extra", inputs=[shared], outputs=[extra]))
    graph.outputs.append(extra)
    before = emit_model(graph, model, {}).SerializeToString()
    p = OnlineTransformPass(transforms, {s.id: s for s in analysis.sites}, "conv")
    result = p(graph)
    assert p.absorbed == len(gains) - 1
    _check_equivalent(result.graph, model, before)
