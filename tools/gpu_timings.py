"""GPU against CPU on one machine: the same compiles and evaluations with ``--device cuda`` and
``--device cpu``, timed in one run, alternating, with each command's summary line kept.

    python tools/gpu_timings.py --out /tmp/gpu-timings [--models minilm,smollm2] [--skip-cpu smollm2]

Writes ``timings.json`` and ``timings.md`` (and one log per command) under ``--out``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# (model, label, command after "qcompiler", needs the compiled file of) ; {dev} and {out} are filled in
MINILM = [
    ("cafeq 4b128 asym", ["compile", "minilm", "-o", "{out}/minilm-cafeq-{dev}.onnx", "--method", "cafeq",
                          "--bits", "4", "--group-size", "128"]),
    ("gptaq 4b128 sym", ["compile", "minilm", "-o", "{out}/minilm-gptaq-{dev}.onnx", "--method", "gptaq",
                         "--bits", "4", "--group-size", "128", "--sym"]),
    ("eval fidelity (cafeq file)", ["eval", "{out}/minilm-cafeq-cuda.onnx", "--reference", "minilm"]),
]
SMOLLM2 = [
    ("cafeq 3b128 sym", ["compile", "smollm2", "-o", "{out}/smol-cafeq-{dev}.onnx", "--method", "cafeq",
                         "--bits", "3", "--group-size", "128", "--sym"]),
    ("gptaq 4b128 sym, 64x512", ["compile", "smollm2", "-o", "{out}/smol-gptaq-{dev}.onnx", "--method", "gptaq",
                                 "--bits", "4", "--group-size", "128", "--sym", "--calib-samples", "64",
                                 "--calib-seqlen", "512"]),
    ("eval perplexity (cafeq file)", ["eval", "{out}/smol-cafeq-cuda.onnx", "--perplexity"]),
]


def _run(args: list[str], log: Path) -> tuple[int, float, str]:
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call([sys.executable, "-m", "qcompiler", *args], stdout=f, stderr=subprocess.STDOUT)
    took = time.perf_counter() - start
    lines = [ln.strip() for ln in log.read_text().splitlines() if ln.strip()]
    return rc, took, lines[-1] if lines else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/gpu-timings")
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--steps", default="", help="only the steps whose label starts with one of these words")
    ap.add_argument("--skip-cpu", default="", help="models whose compiles run on CUDA only (eval still on both)")
    ap.add_argument("--extra", default="", help="extra arguments for every compile (e.g. '--cache-dir /tmp/c')")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    plans = {"minilm": MINILM, "smollm2": SMOLLM2}
    rows = []
    for model in a.models.split(","):
        for label, cmd in plans[model]:
            if a.steps and label.split()[0] not in a.steps.split(","):
                continue
            devices = ("cuda",) if model in a.skip_cpu.split(",") and cmd[0] == "compile" else ("cuda", "cpu")
            for dev in devices:
                args = [x.format(dev=dev, out=out) for x in cmd] + ["--device", dev]
                args += a.extra.split() if cmd[0] == "compile" else []
                name = f"{model}-{label.split()[0]}-{dev}"
                rc, took, last = _run(args, out / f"{name}.log")
                rows.append({"model": model, "step": label, "device": dev, "rc": rc, "seconds": round(took, 1),
                             "summary": last, "command": "qcompiler " + " ".join(args)})
                print(f"{model:8s} {label:32s} {dev:5s} rc={rc} {took:7.1f} s  {last[:150]}", flush=True)
    (out / "timings.json").write_text(json.dumps(rows, indent=1))
    md = ["| model | step | device | exit | wall s | summary |", "|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['step']} | {r['device']} | {r['rc']} | {r['seconds']} | {r['summary'][:160]} |"
           for r in rows]
    (out / "timings.md").write_text("\n".join(md) + "\n")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
