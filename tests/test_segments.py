"""The segmented model: cut before each group of sites, chained segments reproduce the whole model."""

import numpy as np
import onnx
import pytest

from qcompiler.frontends import load_model
from qcompiler.graphio import import_graph
from qcompiler.match.sites import find_linear_sites, weight_reader
from qcompiler.runtime.inputs import sample_inputs
from qcompiler.runtime.segments import SegmentedModel
from tests.conftest import FAMILIES
from tests.helpers import outputs, rel


def _with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for n in names:
        vi = m.graph.output.add()
        vi.name = n
        vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return m


def segmented(folder, cache_dir, kv_cache: bool = True):
    loaded = load_model(str(folder), cache_dir=cache_dir, kv_cache=kv_cache)
    graph = import_graph(loaded.model)
    sites = find_linear_sites(graph).sites
    read = weight_reader(graph)
    return loaded.model, SegmentedModel(loaded.model, sites), {s.id: read(s) for s in sites}


@pytest.mark.parametrize("family", FAMILIES)
def test_chained_segments_reproduce_the_model(family, tiny_checkpoints, cache_dir):
    model, seg, weights = segmented(tiny_checkpoints[family], cache_dir)
    # structure: one group per distinct input, in graph order, every site in exactly one group
    assert sorted(s for g in seg.groups for s in g.sites) == sorted(weights)
    assert [g.position for g in seg.groups] == sorted(g.position for g in seg.groups)
    assert len({g.input for g in seg.groups}) == len(seg.groups)
    feeds = sample_inputs(model, batch=2, seq=7)
    w = {seg.weight_inputs[s]: v.astype(np.float32) for s, v in weights.items()}
    full = outputs(_with_outputs(seg.model, [g.input for g in seg.groups]), {**feeds, **w})
    state = seg.segment(0, seg.groups[0].position).runner()(feeds, w)
    tokens, hidden = 2 * 7, 64
    for i, g in enumerate(seg.groups):
        assert set(seg.live(g.position)) == set(state), g
        # only activations cross a cut: tensors computed from weights alone (GPT-2's tied head reads the
        # transposed embedding table) are folded into initializers, not carried in every state
        assert max(v.size for v in state.values()) <= 4 * tokens * hidden
        assert rel(state[g.input], full[g.input]) < 1e-5
        nxt = seg.groups[i + 1].position if i + 1 < len(seg.groups) else None
        part = seg.segment(g.position, nxt)
        onnx.checker.check_model(part.model)
        state = part.runner()(state, w)
    assert state == {}  # nothing is carried past the last cut
    # the original model's outputs are unchanged by turning weights into inputs
    ref = outputs(model, feeds)
    got = outputs(seg.model, {**feeds, **w})
    assert all(rel(got[k], ref[k]) < 1e-6 for k in ref)


def test_state_is_small(tiny_checkpoints, cache_dir):
    """At a cut only a few activations are alive (residual stream, the group's input, masks, rotary
    tables, ...), never every earlier tensor."""
    _, seg, _ = segmented(tiny_checkpoints["llama"], cache_dir, kv_cache=False)
    sizes = [len(seg.live(g.position)) for g in seg.groups]
    assert max(sizes) <= 12, sizes
    # with a KV cache the past of the layers still ahead is alive too (graph inputs, empty when calibrating),
    # and the mask's construction adds a couple of small tensors; nothing grows with depth
    _, seg, _ = segmented(tiny_checkpoints["llama"], cache_dir)
    past = [sorted(t for t in seg.live(g.position) if t.startswith("past_key_values.")) for g in seg.groups]
    assert all(set(b) <= set(a) for a, b in zip(past, past[1:], strict=False)), past  # only ever fewer
    sizes = [len(seg.live(g.position)) - len(p) for g, p in zip(seg.groups, past, strict=True)]
    assert max(sizes) <= 14 and max(sizes[1:]) <= 13, sizes
