"""Graph helpers: constants stored once."""

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.graphio import share_constants


def _graph(values: dict[str, np.ndarray]) -> gs.Graph:
    x = gs.Variable("x", dtype=np.float32, shape=[4])
    nodes, outs = [], []
    for name, v in values.items():
        y = gs.Variable(f"{name}_y", dtype=np.float32)
        nodes.append(gs.Node("Add", name, inputs=[x, gs.Constant(name, v)], outputs=[y]))
        outs.append(y)
    return gs.Graph(nodes=nodes, inputs=[x], outputs=outs)


def test_readers_of_a_copy_read_the_kept_constant():
    rng = np.random.default_rng(0)
    big = rng.standard_normal(1 << 12).astype(np.float32)
    other = big.copy()
    other[-1] += 1.0
    graph = _graph({"a": big, "b": big.copy(), "c": other, "d": big.astype(np.float64), "e": big.reshape(64, 64)})
    keep = next(n.inputs[1] for n in graph.nodes if n.name == "a")
    assert share_constants(graph, [keep]) == 1
    reads = {n.name: n.inputs[1].name for n in graph.nodes}
    assert reads["a"] == reads["b"] == "a"
    assert (reads["c"], reads["d"], reads["e"]) == ("c", "d", "e")  # other bytes, dtype or shape: kept
    assert share_constants(graph, [keep]) == 0 and share_constants(graph, []) == 0


def test_a_table_read_through_a_transpose_becomes_the_constant_a_head_transposes():
    """onnxruntime-genai's builder ties a head as ``Gather(Transpose(C))`` + ``MatMul(x, C)``: after
    ``untranspose_tables`` the Gather reads a constant ``C^T`` and the MatMul reads ``Transpose(C^T)`` (a Hugging
    Face export's layout); the model passes the checker and gives the same outputs on ONNX Runtime."""
    import onnx

    from qcompiler.graphio import export_graph, untranspose_tables
    from tests.helpers import outputs

    rng = np.random.default_rng(0)
    c = gs.Constant("lm_head.weight", rng.standard_normal((8, 32)).astype(np.float32))  # [H, V]
    ids = gs.Variable("ids", dtype=np.int64, shape=[2, 3])
    x = gs.Variable("x", dtype=np.float32, shape=[2, 8])
    t, rows, logits = (gs.Variable(n, dtype=np.float32, shape=s)
                       for n, s in (("t", [32, 8]), ("rows", [2, 3, 8]), ("logits", [2, 32])))
    nodes = [gs.Node("Transpose", "flip", attrs={"perm": [1, 0]}, inputs=[c], outputs=[t]),
             gs.Node("Gather", "embed", inputs=[t, ids], outputs=[rows]),
             gs.Node("MatMul", "head", inputs=[x, c], outputs=[logits])]
    graph = gs.Graph(nodes=nodes, inputs=[ids, x], outputs=[rows, logits], opset=17)
    before = export_graph(graph.copy())
    before.ir_version = 9
    assert untranspose_tables(graph) == 1
    graph.cleanup().toposort()
    after = export_graph(graph)
    after.ir_version = 9
    onnx.checker.check_model(after, full_check=True)
    by_name = {n.name: n for n in after.graph.node}
    inits = {i.name for i in after.graph.initializer}
    assert by_name["embed"].input[0] == "lm_head.weight_table" and inits == {"lm_head.weight_table"}
    assert by_name["head"].input[1] != "lm_head.weight"  # reads Transpose(table)
    feeds = {"ids": rng.integers(0, 32, (2, 3)).astype(np.int64), "x": rng.standard_normal((2, 8)).astype(np.float32)}
    want, got = outputs(before, feeds), outputs(after, feeds)
    for name in ("rows", "logits"):
        np.testing.assert_array_equal(got[name], want[name])
    # a Transpose read by something other than Gathers, or a permutation of more axes, is left alone
    assert untranspose_tables(gs.Graph(nodes=[gs.Node("Transpose", attrs={"perm": [1, 0]}, inputs=[c], outputs=[t]),
                                              gs.Node("Relu", inputs=[t], outputs=[rows])],
                                       inputs=[], outputs=[rows])) == 0
