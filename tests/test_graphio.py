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
