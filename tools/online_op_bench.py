"""What one online ``x T^-1`` op costs in ONNX Runtime (CPU), by layout, input width K and tokens S.

    python tools/online_op_bench.py [--k 576,1536] [--s 1,128] [--block 64] [--ops 20] [--rounds 30]

Each layout is written node for node as ``passes/online_transform.py`` emits it (conv: Transpose ``[B, S, K]``
to ``[B, K, S]``, grouped 1x1 Conv over all S positions at once, Transpose back; rconv, its form for an input
of unknown rank: Shape, Reshape to ``[-1, K, 1]``, the Conv, Reshape back; matmul: Shape, Reshape to
``[-1, K/b, b]``, Transpose, batched MatMul, Transpose back, Reshape back), plus two candidates: ``bmm`` (Reshape
to ``[0, 0, K/b, 1, b]``, a broadcast MatMul, Reshape to ``[0, 0, K]``: no Shape, no Transpose) and ``dense``
(one MatMul by the K x K block-diagonal matrix). A model chains ``--ops`` ops on ``[1, S, K]``; every model
runs in each round, the figure is the median over rounds of microseconds per op, less an Identity chain's.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

LAYOUTS = ("conv", "rconv", "matmul", "bmm", "dense")


def chain(layout: str, k: int, b: int, n_ops: int) -> bytes:
    nb = k // b
    rng = np.random.default_rng(0)
    inv = np.stack([np.linalg.qr(rng.standard_normal((b, b)))[0] for _ in range(nb)]).astype(np.float32)
    nodes, inits, x = [], [], "x"

    def const(name, value):
        inits.append(nh.from_array(np.asarray(value), name))
        return name

    for i in range(n_ops):
        p = f"o{i}_"
        if layout == "rconv":
            w = const(p + "w", np.ascontiguousarray(inv.transpose(0, 2, 1)).reshape(k, b, 1))
            nodes += [helper.make_node("Shape", [x], [p + "sh"]),
                      helper.make_node("Reshape", [x, const(p + "s", np.array([-1, k, 1], np.int64))], [p + "r"]),
                      helper.make_node("Conv", [p + "r", w], [p + "c"], group=nb, kernel_shape=[1]),
                      helper.make_node("Reshape", [p + "c", p + "sh"], [p + "y"])]
        elif layout == "conv":
            w = const(p + "w", np.ascontiguousarray(inv.transpose(0, 2, 1)).reshape(k, b, 1))
            nodes += [helper.make_node("Transpose", [x], [p + "t"], perm=[0, 2, 1]),
                      helper.make_node("Conv", [p + "t", w], [p + "c"], group=nb, kernel_shape=[1]),
                      helper.make_node("Transpose", [p + "c"], [p + "y"], perm=[0, 2, 1])]
        elif layout == "matmul":
            nodes += [helper.make_node("Shape", [x], [p + "sh"]),
                      helper.make_node("Reshape", [x, const(p + "s", np.array([-1, nb, b], np.int64))], [p + "r"]),
                      helper.make_node("Transpose", [p + "r"], [p + "t"], perm=[1, 0, 2]),
                      helper.make_node("MatMul", [p + "t", const(p + "w", inv)], [p + "m"]),
                      helper.make_node("Transpose", [p + "m"], [p + "tb"], perm=[1, 0, 2]),
                      helper.make_node("Reshape", [p + "tb", p + "sh"], [p + "y"])]
        elif layout == "bmm":
            nodes += [helper.make_node("Reshape", [x, const(p + "s", np.array([0, 0, nb, 1, b], np.int64))],
                                       [p + "r"]),
                      helper.make_node("MatMul", [p + "r", const(p + "w", inv)], [p + "m"]),
                      helper.make_node("Reshape", [p + "m", const(p + "s2", np.array([0, 0, k], np.int64))],
                                       [p + "y"])]
        elif layout == "dense":
            full = np.zeros((k, k), np.float32)
            for j in range(nb):
                full[j * b:(j + 1) * b, j * b:(j + 1) * b] = inv[j]
            nodes.append(helper.make_node("MatMul", [x, const(p + "w", full)], [p + "y"]))
        else:
            nodes.append(helper.make_node("Identity", [x], [p + "y"]))
        x = p + "y"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def measure(k: int, s: int, b: int, n_ops: int, rounds: int, threads: int = 0) -> dict[str, float]:
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sessions = {lay: ort.InferenceSession(chain(lay, k, b, n_ops), so, providers=["CPUExecutionProvider"])
                for lay in ("identity", *LAYOUTS)}
    x = np.random.default_rng(1).standard_normal((1, s, k)).astype(np.float32)
    want = sessions["conv"].run(None, {"x": x})[0]
    for lay in LAYOUTS:
        np.testing.assert_allclose(sessions[lay].run(None, {"x": x})[0], want, rtol=1e-3, atol=1e-3)
    times: dict[str, list[float]] = {lay: [] for lay in sessions}
    for _ in range(rounds):
        for lay, sess in sessions.items():
            t0 = time.perf_counter()
            for _ in range(5):
                sess.run(None, {"x": x})
            times[lay].append((time.perf_counter() - t0) / 5 / n_ops * 1e6)
    base = float(np.median(times["identity"]))
    return {lay: float(np.median(times[lay])) - base for lay in LAYOUTS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", default="576,1536")
    ap.add_argument("--s", default="1,128", help="tokens per run (1: a decode step)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--ops", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"microseconds per online op (block {args.block}; median of {args.rounds} rounds, less Identity)")
    print(f"{'K':>6s} {'S':>5s} " + " ".join(f"{lay:>8s}" for lay in LAYOUTS))
    for k in (int(v) for v in args.k.split(",")):
        for s in (int(v) for v in args.s.split(",")):
            r = measure(k, s, args.block, args.ops, args.rounds, args.threads)
            print(f"{k:6d} {s:5d} " + " ".join(f"{r[lay]:8.1f}" for lay in LAYOUTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
