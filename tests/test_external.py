"""File-backed weights: read per access and never cached, spilled to a sink, saved file to file."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qcompiler.external import (
    ALIGN,
    DataSink,
    ExternalValues,
    attach_external,
    external_sources,
    read_values,
    save_with_external_data,
)
from qcompiler.graphio import import_graph, load_onnx
from qcompiler.match.sites import weight_reader
from qcompiler.match.view import constant_value
from qcompiler.passes.qdq import int_tensor
from tests.graphs import mixed_model


def _external_copy(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(mixed_model(), str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return path


def test_external_values_are_read_from_the_file_and_never_cached(tmp_path):
    path = _external_copy(tmp_path)
    model = load_onnx(path, load_data=False)
    assert all(not t.HasField("raw_data") for t in model.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL)
    graph = import_graph(model, tmp_path)
    full = {t.name: numpy_helper.to_array(t) for t in load_onnx(path).graph.initializer}
    consts = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    assert isinstance(consts["W1"]._values, ExternalValues)
    np.testing.assert_array_equal(constant_value(consts["W1"]), full["W1"])
    np.testing.assert_array_equal(read_values(consts["W2t"]), full["W2t"])
    assert isinstance(consts["W1"]._values, ExternalValues)  # still in the file, not in the graph
    assert tuple(consts["W1"].shape) == full["W1"].shape


def test_attach_external_leaves_loaded_tensors_alone(tmp_path):
    model = load_onnx(_external_copy(tmp_path))  # data loaded: nothing is external any more
    graph = gs.import_onnx(model)
    assert attach_external(graph, model, tmp_path) == 0


@pytest.mark.parametrize("bits", [4, 8])
def test_spill_writes_the_exporters_bytes_and_reads_them_back(tmp_path, bits):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2**bits, size=(64, 48)).astype(np.uint8)
    weight = rng.standard_normal((128, 40)).astype(np.float32)
    graph = gs.Graph()
    c1 = int_tensor("codes", codes, bits, signed=False)
    c2 = gs.Constant("w", weight)
    small = gs.Constant("small", np.ones(3, np.float32))
    want = {t.name: gs.export_onnx(_holder(t)).graph.initializer[0] for t in (c1, c2)}
    for i, c in enumerate((c1, c2, small)):
        graph.nodes.append(gs.Node("Identity", name=f"id{i}", inputs=[c], outputs=[gs.Variable(f"y{i}")]))
    sink = DataSink(tmp_path / "spill.data")
    moved = sink.spill(graph, min_bytes=256)
    sink.close()
    assert moved == sum(len(w.raw_data) for w in want.values())
    assert isinstance(c1._values, ExternalValues) and isinstance(c2._values, ExternalValues)
    assert not isinstance(small._values, ExternalValues)  # below min_bytes: stays in memory
    np.testing.assert_array_equal(read_values(c2), weight)
    assert c1._values.offset % ALIGN == 0 and c2._values.offset % ALIGN == 0
    for c in (c1, c2):
        assert c._values.read_bytes() == want[c.name].raw_data
    assert external_sources(graph) == {"spill.data": tmp_path / "spill.data"}


def _holder(const: gs.Constant) -> gs.Graph:
    g = gs.Graph()
    g.nodes.append(gs.Node("Identity", inputs=[const], outputs=[gs.Variable("y")]))
    return g


def test_written_tensors_keep_no_bytes_in_memory(tmp_path):
    """protobuf (upb) frees a message's bytes only with its arena: a stub made by copying the full tensor
    and clearing ``raw_data`` kept every spilled byte alive (a streamed compile grew by each chunk)."""
    from qcompiler.resources import current_rss_mb, trim_heap

    sink = DataSink(tmp_path / "spill.data")
    trim_heap()  # measure what stays alive, not what the allocator has yet to give back
    before = current_rss_mb()
    kept = []
    for i in range(5):  # 5 x 40 MB
        kept.append(sink.write(numpy_helper.from_array(np.full(10 * 2**20, i, np.float32), f"w{i}")))
    trim_heap()
    grown = current_rss_mb() - before
    sink.close()
    assert grown < 60, f"{grown:.0f} MB stayed resident after spilling 200 MB"
    assert kept[3].tensor.ByteSize() < 200 and float(kept[3].load()[-1]) == 3.0


def test_save_with_external_data_copies_every_tensor_and_runs(tmp_path):
    path = _external_copy(tmp_path)
    graph = import_graph(load_onnx(path, load_data=False), tmp_path)
    w1 = next(t for t in graph.tensors().values() if t.name == "W1")
    w1_values = read_values(w1)
    sink = DataSink(tmp_path / "spill.data")
    # a new in-memory constant (what a pass writes) goes to the sink
    w1.values = w1_values * 2
    sink.spill(graph, min_bytes=16)
    sink.close()
    model = gs.export_onnx(graph, do_type_check=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = save_with_external_data(model, out_dir / "q.onnx", external_sources(graph))
    assert sorted(p.name for p in out_dir.iterdir()) == ["q.onnx", "q.onnx.data"]
    saved = onnx.load(str(out))  # every tensor reads from the one data file beside it
    values = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    np.testing.assert_array_equal(values["W1"], w1_values * 2)
    original = {t.name: numpy_helper.to_array(t) for t in load_onnx(path).graph.initializer}
    np.testing.assert_array_equal(values["W2t"], original["W2t"])
    feeds = {i.name: np.ones([d.dim_value or 2 for d in i.type.tensor_type.shape.dim], np.float32)
             for i in saved.graph.input}
    assert all(np.isfinite(o).all() for o in ort.InferenceSession(str(out)).run(None, feeds))


def test_save_with_external_data_leaves_nothing_on_failure(tmp_path):
    path = _external_copy(tmp_path)
    graph = import_graph(load_onnx(path, load_data=False), tmp_path)
    model = gs.export_onnx(graph, do_type_check=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (tmp_path / "m.onnx.data").write_bytes(b"")  # the source vanished under us
    with pytest.raises(Exception, match="truncated"):
        save_with_external_data(model, out_dir / "q.onnx", external_sources(graph))
    assert list(out_dir.iterdir()) == []


def test_truncated_external_data_is_refused_on_load(tmp_path):
    path = _external_copy(tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:-8])
    from qcompiler.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="truncated"):
        load_onnx(path, load_data=False)


def test_weight_reader_reads_file_backed_weights(tmp_path):
    path = _external_copy(tmp_path)
    graph = import_graph(load_onnx(path, load_data=False), tmp_path)
    from qcompiler.match.sites import find_linear_sites

    sites = find_linear_sites(graph).sites
    assert sites
    read = weight_reader(graph)
    full = import_graph(load_onnx(path))
    read_full = weight_reader(full)
    for s in sites:
        np.testing.assert_array_equal(read(s), read_full(s))
