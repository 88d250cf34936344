"""The calibration driver: H and D at every group are those of the model with every earlier group
quantized (X) and of the float model (X~), without re-running the model per group."""

import numpy as np
import pytest

from qcompiler.algorithms.grid import quantize
from qcompiler.runtime.calibrate import calibrate
from qcompiler.runtime.inputs import sample_inputs
from tests.helpers import outputs
from tests.test_segments import _with_outputs, segmented


def _recording_rtn(weights):
    """A quantize callback for :func:`calibrate` (3-bit RTN) that records what it is given and returns."""
    seen, w_hat = [], {}

    def rtn(data):
        seen.append(data)
        out = {s: quantize(weights[s], 3, 16, False).dequantize() for s in data.group.sites}
        w_hat.update(out)
        return out

    return seen, w_hat, rtn


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_driver_statistics_match_whole_model_runs(family, tiny_checkpoints, cache_dir):
    model, seg, weights = segmented(tiny_checkpoints[family], cache_dir)
    batches = [sample_inputs(model, batch=2, seq=6, seed=i) for i in range(2)]
    holdout = [sample_inputs(model, batch=1, seq=5, seed=9)]
    seen, w_hat, rtn = _recording_rtn(weights)

    res = calibrate(seg, weights, batches, rtn, target=True, holdout=holdout)
    assert [d.group for d in seen] == list(seg.groups)
    probe = _with_outputs(seg.model, [g.input for g in seg.groups])
    w_fp = {seg.weight_inputs[s]: v.astype(np.float32) for s, v in weights.items()}
    for i, data in enumerate(seen):
        done = {s for g in seg.groups[:i] for s in g.sites}  # quantized before this group
        w_q = {seg.weight_inputs[s]: (w_hat[s] if s in done else weights[s]).astype(np.float32) for s in weights}
        xs, xts = [], []
        for b in batches:
            xs.append(outputs(probe, {**b, **w_q})[data.group.input].reshape(-1, data.h.shape[0]))
            xts.append(outputs(probe, {**b, **w_fp})[data.group.input].reshape(-1, data.h.shape[0]))
        x, xt = np.concatenate(xs).astype(np.float64), np.concatenate(xts).astype(np.float64)
        assert data.tokens == len(x)
        np.testing.assert_allclose(data.h, x.T @ x / len(x), rtol=1e-4, atol=1e-5 * np.abs(data.h).max())
        np.testing.assert_allclose(data.d, (xt - x).T @ x / len(x), rtol=1e-3, atol=1e-4 * np.abs(data.h).max())
    assert np.abs(seen[0].d).max() == 0  # nothing quantized before the first group: X = X~
    assert np.abs(seen[-1].d).max() > 0
    # held-out error of the last group's sites, recomputed from whole-model runs
    last = seg.groups[-1]
    w_q = {seg.weight_inputs[s]: (w_hat[s] if s not in last.sites else weights[s]).astype(np.float32) for s in weights}
    x = outputs(probe, {**holdout[0], **w_q})[last.input].reshape(-1, seen[-1].h.shape[0]).astype(np.float64)
    xt = outputs(probe, {**holdout[0], **w_fp})[last.input].reshape(-1, seen[-1].h.shape[0]).astype(np.float64)
    for s in last.sites:
        ref = xt @ weights[s]
        want = np.linalg.norm(x @ w_hat[s] - ref) / np.linalg.norm(ref)
        assert res.holdout_error[s] == pytest.approx(want, rel=1e-4)


def test_gptq_stream_only(tiny_checkpoints, cache_dir):
    """Without a target stream no D is computed (GPTQ)."""
    model, seg, weights = segmented(tiny_checkpoints["llama"], cache_dir)
    got = []
    calibrate(seg, weights, [sample_inputs(model, batch=2, seq=6)],
              lambda d: got.append(d) or {s: weights[s] for s in d.group.sites}, target=False)
    assert got and all(d.d is None for d in got)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_value_statistics_are_those_of_the_attention_mixed_inputs(family, tiny_checkpoints, cache_dir):
    """A V site's per-KV-head H and D are over ``A_j X`` for the query heads ``j`` reading that head, with
    ``A`` the attention weights of the stream (quantized earlier groups) and ``X~``, ``A~`` of the float one."""
    from qcompiler.analyze import analyze_graph
    from qcompiler.frontends import load_model
    from qcompiler.graphio import import_graph
    from qcompiler.match.sites import weight_reader
    from qcompiler.methods.gptq import value_heads
    from qcompiler.runtime.segments import SegmentedModel

    model = load_model(str(tiny_checkpoints[family]), cache_dir=cache_dir, kv_cache=False).model
    graph = import_graph(model)
    analysis = analyze_graph(graph, model)  # site ids with module paths, as the pipeline has them
    read = weight_reader(graph)
    seg, weights = SegmentedModel(model, analysis.sites), {s.id: read(s) for s in analysis.sites}
    values = value_heads(analysis.pairs, analysis.sites)
    assert values and set(values) == {p.producer for p in analysis.pairs if p.kind == "attn_vo"}
    batches = [sample_inputs(model, batch=2, seq=6, seed=i) for i in range(2)]
    seen, w_hat, rtn = _recording_rtn(weights)

    calibrate(seg, weights, batches, rtn, target=True, values=values)
    checked = 0
    w_fp = {seg.weight_inputs[s]: v.astype(np.float32) for s, v in weights.items()}
    for i, data in enumerate(seen):
        vs = [s for s in data.group.sites if s in values]
        assert set(data.heads) == set(vs)
        if not vs:
            continue
        done = {s for g in seg.groups[:i] for s in g.sites}
        w_q = {seg.weight_inputs[s]: (w_hat[s] if s in done else weights[s]).astype(np.float32) for s in weights}
        for sid in vs:
            v = values[sid]
            probe = _with_outputs(seg.model, [data.group.input, v.probs])
            n_kv = max(v.kv_map) + 1
            assert [(h.lo, h.hi) for h in data.heads[sid]] == [
                (v.cols[0] + j * v.head_dim, v.cols[0] + (j + 1) * v.head_dim) for j in range(n_kv)]
            k = data.h.shape[0]
            hh = np.zeros((n_kv, k, k))
            dd = np.zeros((n_kv, k, k))
            tokens = np.zeros(n_kv)
            for b in batches:
                q, f = outputs(probe, {**b, **w_q}), outputs(probe, {**b, **w_fp})
                a, at = q[v.probs].astype(np.float64), f[v.probs].astype(np.float64)
                x = q[data.group.input].astype(np.float64).reshape(a.shape[0], a.shape[3], k)
                xt = f[data.group.input].astype(np.float64).reshape(x.shape)
                for j, h in enumerate(v.kv_map):
                    y, yt = (a[:, j] @ x).reshape(-1, k), (at[:, j] @ xt).reshape(-1, k)
                    hh[h] += y.T @ y
                    dd[h] += (yt - y).T @ y
                    tokens[h] += len(y)
            for h, st in enumerate(data.heads[sid]):
                scale = np.abs(hh[h] / tokens[h]).max()
                np.testing.assert_allclose(st.h, hh[h] / tokens[h], rtol=1e-4, atol=1e-5 * scale)
                np.testing.assert_allclose(st.d, dd[h] / tokens[h], rtol=1e-3, atol=1e-4 * scale)
            assert not np.allclose(data.heads[sid][0].h, data.h, rtol=0.05)  # mixing changes it
            checked += 1
    assert checked >= 1
