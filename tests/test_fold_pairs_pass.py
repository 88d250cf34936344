"""FoldPairsPass: structure, ONNX checker, numeric equivalence on ONNX Runtime, negative cases."""

import numpy as np
import onnx
import pytest

from qcompiler.analyze import analyze_graph
from qcompiler.emit import emit_model
from qcompiler.frontends import load_model
from qcompiler.graphio import import_graph
from qcompiler.passes import FoldPairsPass, PassError, PassManager
from qcompiler.plan import PairTransform
from qcompiler.runtime.inputs import sample_inputs
from tests.helpers import outputs, rel
from tests.pairfold import random_transforms


@pytest.fixture()
def llama(pair_checkpoints, cache_dir):
    return load_model(str(pair_checkpoints["llama"]), cache_dir=cache_dir, kv_cache=False).model


def test_structure_checker_and_equivalence(llama):
    before = llama.SerializeToString()
    graph = import_graph(llama)
    analysis = analyze_graph(graph, llama)
    ops_before = sorted(n.op for n in graph.nodes)
    result = FoldPairsPass(random_transforms(analysis), {s.id: s for s in analysis.sites})(graph)
    assert result.modified
    assert sorted(n.op for n in result.graph.nodes) == ops_before  # weights change, structure does not
    folded = {s.weight for s in analysis.sites if any(s.id in (p.producer, p.consumer, p.gate) for p in analysis.pairs)}
    names = {t.name for n in result.graph.nodes for t in n.inputs}
    assert all(f"{w}_folded" in names and w not in names for w in folded)
    model = emit_model(result.graph, llama, {})
    onnx.checker.check_model(model, full_check=True)
    feeds = sample_inputs(llama, batch=2, seq=7)
    ref = outputs(onnx.ModelProto.FromString(before), feeds)
    got = outputs(model, feeds)
    assert rel(got["logits"], ref["logits"]) < 1e-5


def test_no_transforms_is_a_no_op(llama):
    graph = import_graph(llama)
    result = PassManager([FoldPairsPass([], {})])(graph)
    assert not result.modified
    assert emit_model(result.graph, llama, {}).graph == emit_model(import_graph(llama), llama, {}).graph


def test_refuses_unknown_sites_and_inexact_transforms(llama):
    graph = import_graph(llama)
    analysis = analyze_graph(graph, llama)
    vo = analysis.pairs_of("attn_vo")[0]
    with pytest.raises(PassError, match="is not in the graph"):
        FoldPairsPass([PairTransform(vo, matrices=np.stack([np.eye(16)] * 2))], {})(graph)
    sites = {s.id: s for s in analysis.sites}
    with pytest.raises(ValueError, match="expected matrices of shape"):
        FoldPairsPass([PairTransform(vo, matrices=np.stack([np.eye(16)] * 3))], sites)(graph)
