"""Graph helpers: constants stored once."""

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.graphio import share_identical_constants


def _graph(values: dict[str, np.ndarray]) -> gs.Graph:
    x = gs.Variable("x", dtype=np.float32, shape=[4])
    nodes, outs = [], []
    for name, v in values.items():
        y = gs.Variable(f"{name}_y", dtype=np.float32)
        nodes.append(gs.Node("Add", name, inputs=[x, gs.Constant(name, v)], outputs=[y]))
        outs.append(y)
    return gs.Graph(nodes=nodes, inputs=[x], outputs=outs)


def test_equal_large_constants_are_read_from_one():
    rng = np.random.default_rng(0)
    big = rng.standard_normal(1 << 12).astype(np.float32)  # 16 KiB
    other = big.copy()
    other[-1] += 1.0
    graph = _graph({"a": big, "b": big.copy(), "c": other, "d": big.astype(np.float64), "small": np.ones(4, np.float32),
                    "small2": np.ones(4, np.float32)})
    assert share_identical_constants(graph) == 1
    reads = {n.name: n.inputs[1].name for n in graph.nodes}
    assert reads["b"] == "a" and reads["c"] == "c" and reads["d"] == "d"  # other bytes, other dtype: kept
    assert reads["small2"] == "small2"  # under min_bytes: not looked at
    assert share_identical_constants(graph) == 0
