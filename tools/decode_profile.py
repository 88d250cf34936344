"""Where a batch-1 decode step's time goes, by operator type (ONNX Runtime's profiler, CPU).

    python tools/decode_profile.py MODEL.onnx [MODEL2.onnx ...] [--past 128] [--steps 32]

Each model runs a prefill of ``--past`` tokens, then ``--steps`` one-token steps with the profiler on; per
operator type: the kernels' summed time per step, its share, the number of nodes run per step and the mean
microseconds per node. The gap between the step's wall time and the kernels' sum is the session's own cost
(scheduling, allocation, I/O). Works on our KV-cache graphs and on onnxruntime-genai builder models (their
``model.onnx``; the cache layout is read from ``genai_config.json`` beside it).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def _past(sess: ort.InferenceSession, model: Path) -> dict[str, np.ndarray]:
    cfg = model.parent / "genai_config.json"
    if cfg.exists():
        d = json.loads(cfg.read_text())["model"]["decoder"]
        heads, size = d["num_key_value_heads"], d["head_size"]
    else:
        from qcompiler.kv_layout import CacheLayout

        layout = CacheLayout.from_properties(dict(sess.get_modelmeta().custom_metadata_map))
        heads, size = layout.kv_heads, layout.head_dim
    return {i.name: np.zeros((1, heads, 0, size), np.float32) for i in sess.get_inputs()
            if i.name.startswith("past_key_values.")}


def profile(model: Path, past_len: int, steps: int, threads: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "p")
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in sess.get_outputs()]
        names = {o: "past_key_values." + o[len("present."):] for o in outputs if o.startswith("present.")}
        rng = np.random.default_rng(0)
        ids = rng.integers(10, 1000, (1, past_len), dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **_past(sess, model)}
        res = dict(zip(outputs, sess.run(None, feeds), strict=True))
        walls = []
        for s in range(steps):
            feeds = {"input_ids": np.array([[int(res["logits"][0, -1].argmax())]], np.int64),
                     "attention_mask": np.ones((1, past_len + s + 1), np.int64),
                     **{names[o]: v for o, v in res.items() if o in names}}
            t0 = time.perf_counter()
            res = dict(zip(outputs, sess.run(None, feeds), strict=True))
            walls.append(time.perf_counter() - t0)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    cut = runs[1]["ts"] if len(runs) > 1 else 0  # leave out the prefill
    by_op: dict[str, list[float]] = collections.defaultdict(list)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= cut:
            by_op[e["args"].get("op_name", "?")].append(e["dur"])
    total = sum(sum(v) for v in by_op.values()) / steps
    rows = sorted(((op, sum(v) / steps, len(v) / steps) for op, v in by_op.items()), key=lambda r: -r[1])
    return {"model": str(model), "step_ms": 1e3 * float(np.median(walls)), "kernels_ms": total / 1e3,
            "nodes_per_step": sum(r[2] for r in rows),
            "ops": [{"op": op, "us": us, "share": us / total, "nodes": n, "us_per_node": us / n}
                    for op, us, n in rows]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--past", type=int, default=128, help="prompt tokens before the profiled steps")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    out = []
    for m in args.models:
        p = profile(m, args.past, args.steps, args.threads)
        out.append(p)
        print(f"{m}: step {p['step_ms']:.2f} ms (median wall), kernels {p['kernels_ms']:.2f} ms, "
              f"{p['nodes_per_step']:.0f} nodes per step")
        print(f"  {'op':28s} {'us/step':>9s} {'share':>6s} {'nodes':>6s} {'us/node':>8s}")
        for r in p["ops"][:args.top]:
            print(f"  {r['op']:28s} {r['us']:9.0f} {100 * r['share']:5.1f}% {r['nodes']:6.0f} {r['us_per_node']:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
