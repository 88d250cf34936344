"""Joint rounding of one synthetic pair, timed, with the process's peak memory: the numpy solver (in one block
of channels, or in blocks of ``--channel-block``) or the batched torch solver on a device.

    python tools/joint_bench.py --channels 5632 --k 2048 --rounds 1 --channel-block 8192   # one block
    python tools/joint_bench.py --channels 5632 --k 2048 --rounds 1                        # blocks of 4096 at most
    python tools/joint_bench.py --kind vo --batch 16 --engine torch --device cuda          # V·O pairs as one batch

Each run is one process (peak RSS is the process's); compare runs made on the same machine. Random Gaussian
factors (weights of a trained model round differently; the memory and time do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from qcompiler.algorithms.grid import GridSpec
from qcompiler.algorithms.joint import Heads, JointConfig, JointItem, joint_round, joint_round_batch
from qcompiler.resources import peak_rss_mb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("mlp", "vo"), default="mlp")
    ap.add_argument("--channels", type=int, default=5632, help="mlp: the pair's channels C")
    ap.add_argument("--k", type=int, default=2048, help="hidden size (the producer's input, the consumer's output)")
    ap.add_argument("--heads", type=int, default=32, help="vo: query heads")
    ap.add_argument("--kv-heads", type=int, default=8, help="vo: KV heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--channel-block", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1, help="pairs (solved as one batch by --engine torch)")
    ap.add_argument("--engine", choices=("numpy", "torch"), default="numpy")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as in a worker process
    rng = np.random.default_rng(0)
    if args.kind == "mlp":
        heads, shapes = None, ((args.k, args.channels), (args.channels, args.k))
    else:
        group = args.heads // args.kv_heads
        heads = Heads(args.head_dim, tuple(h for h in range(args.kv_heads) for _ in range(group)))
        shapes = ((args.k, args.kv_heads * args.head_dim), (args.heads * args.head_dim, args.k))
    items = [JointItem(rng.standard_normal(shapes[0]) * 0.02, rng.standard_normal(shapes[1]) * 0.02)
             for _ in range(args.batch)]
    grid = GridSpec(args.bits, args.group_size, False)
    cfg = JointConfig(rounds=args.rounds, channel_block=args.channel_block,
                      channel_weight=4.0 if args.kind == "mlp" else 0.0)
    start = time.perf_counter()
    if args.engine == "torch":
        results = joint_round_batch(items, grid, grid, heads, cfg, args.device)
    else:
        results = [joint_round(it.a, it.b, grid, grid, heads, None, None, cfg) for it in items]
    took = time.perf_counter() - start
    row = {"kind": args.kind, "engine": args.engine, "device": args.device, "channels": args.channels, "k": args.k,
           "batch": args.batch, "rounds": args.rounds, "channel_block": args.channel_block, "seconds": round(took, 1),
           "seconds_per_pair": round(took / args.batch, 2), "peak_rss_mb": round(peak_rss_mb()),
           "pqe_plain": round(results[0].pqe_plain, 5), "pqe": round(results[0].pqe, 5)}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
