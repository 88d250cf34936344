"""Calibrated methods against RTN and ONNX Runtime's own GPTQ, in one run, on the same calibration tokens.

    python tools/calib_results.py minilm     # fidelity on 256 Jargon File paragraphs
    python tools/calib_results.py smollm2    # perplexity on 8 x 512 Jargon File tokens

Calibration: Python's documentation (``pydoc_data.topics``), ``--samples`` x ``--seqlen`` tokens (default
64 x 512; MiniLM 64 x 128), plus ``--holdout`` held-out sequences on which every site's
``||X W_hat - X~ W|| / ||X~ W||`` is measured (GPTAQ against GPTQ: the share of sites where it is lower).
Settings: 3- and 4-bit block 128 sym. Each of our compiles runs as its own ``qcompiler compile``
process (its report gives compile time and peak memory); ONNX Runtime's GPTQ (``MatMulNBitsQuantizer``
with ``GPTQWeightOnlyQuantConfig``, 4-bit only; ONNX Runtime 1.31 carries its own copy of Intel Neural
Compressor's weight-only code, nothing more to install) runs in this process on the same tokens, one
sequence per calibration sample. ``tools/bench.py`` runs it too, beside every other method.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcompiler.frontends import load_model  # noqa: E402
from qcompiler.frontends.bundled import bundled_path  # noqa: E402
from qcompiler.runtime.calib_data import calibration_tokens  # noqa: E402
from qcompiler.runtime.evaluate import fidelity, perplexity, sentence_embeddings, token_windows  # noqa: E402
from qcompiler.runtime.text import default_text, paragraphs, read_text  # noqa: E402
from tools.qbench.grid import Setting  # noqa: E402
from tools.qbench.peers import ort_gptq  # noqa: E402
from tools.qbench.worker import feeds_from_ids  # noqa: E402

SETTINGS = [(3, 128, True), (4, 128, True)]
METHODS = ("rtn", "gptq", "gptaq", "cafeq+gptaq", "ort-gptq")


def _ort_gptq(model: onnx.ModelProto, tokens: np.ndarray, block: int, sym: bool) -> onnx.ModelProto:
    return ort_gptq(model, Setting(4, block, sym), feeds_from_ids(model, tokens))


def _compile(model: str, method: str, bits: int, block: int, sym: bool, args, tmp: Path,
             samples: int) -> tuple[onnx.ModelProto, dict]:
    out, rep = tmp / f"{method}-{bits}.onnx", tmp / f"{method}-{bits}.json"
    cmd = [sys.executable, "-m", "qcompiler", "compile", model, "-o", str(out), "--report", str(rep), "-q",
           "--method", method, "--bits", str(bits), "--group-size", str(block), "--sym" if sym else "--asym",
           "--no-validate", "--calib-samples", str(samples), "--calib-seqlen", str(args.seqlen),
           "--calib-holdout", str(args.holdout)]
    subprocess.run(cmd, check=True)
    return onnx.load(str(out)), json.loads(rep.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["minilm", "smollm2"])
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, help="tokens per sequence (default: 512; MiniLM 128)")
    ap.add_argument("--holdout", type=int, default=8)
    ap.add_argument("--ort-samples", type=int,
                    help="ONNX Runtime's GPTQ on this many sequences (it re-runs the whole model once per "
                         "layer input and sample); our gptq is then also run on those same sequences")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    args.seqlen = args.seqlen or (128 if args.model == "minilm" else 512)
    logging.basicConfig(level=logging.WARNING)
    ref = load_model(args.model)
    tok = str(bundled_path(args.model))
    text = read_text(default_text())
    rows: list[dict] = []
    if args.model == "minilm":
        texts = paragraphs(text, 256)
        ref_emb = sentence_embeddings(ref.model, tok, texts)

        def score(m):
            f = fidelity(sentence_embeddings(m, tok, texts), ref_emb)
            return {"one_minus_cos": 1 - f.mean_cosine, "min_cos": f.min_cosine, "spearman": f.spearman}
    else:
        windows = token_windows(tok, text, 8, 512)

        def score(m):
            return {"perplexity": perplexity(m, windows).perplexity}
        rows.append({"setting": "fp32", "method": "fp32", **score(ref.model)})
        print(json.dumps(rows[-1]), flush=True)
    # the windows our compiles draw (same count and seed), for ONNX Runtime's GPTQ
    ort_n = args.ort_samples or args.samples
    tokens = calibration_tokens(None, tok, ort_n + args.holdout, args.seqlen)[:ort_n]
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for bits, block, sym in SETTINGS:
            if str(bits) not in args.bits.split(","):
                continue
            setting = f"{bits}-bit block {block} {'sym' if sym else 'asym'}"
            holdout = {}
            for method in methods:
                if method == "ort-gptq":
                    if bits != 4:
                        continue  # ONNX Runtime's GPTQ writes 4-bit MatMulNBits only
                    label = "" if ort_n == args.samples else f" ({ort_n} seqs)"
                    if label:  # ours on the same sequences
                        m, rep = _compile(args.model, "gptq", bits, block, sym, args, tmp, ort_n)
                        rows.append({"setting": setting, "method": "gptq" + label,
                                     "compile_s": sum(rep["timings_s"].values()), "peak_rss_mb": rep["peak_rss_mb"],
                                     **score(m)})
                        print(json.dumps(rows[-1]), flush=True)
                    t0 = time.perf_counter()
                    m = _ort_gptq(ref.model, tokens, block, sym)
                    rows.append({"setting": setting, "method": method + label, "compile_s": time.perf_counter() - t0,
                                 **score(m)})
                else:
                    m, rep = _compile(args.model, method, bits, block, sym, args, tmp, args.samples)
                    holdout[method] = {s["id"]: s["holdout_error"] for s in rep["sites"]}
                    rows.append({"setting": setting, "method": method, "compile_s": sum(rep["timings_s"].values()),
                                 "peak_rss_mb": rep["peak_rss_mb"], **score(m)})
                print(json.dumps(rows[-1]), flush=True)
            if {"gptq", "gptaq"} <= set(holdout):
                a, b = holdout["gptaq"], holdout["gptq"]
                share = float(np.mean([a[s] < b[s] for s in a]))
                rows.append({"setting": setting, "holdout": "gptaq < gptq", "share": share, "sites": len(a),
                             "gptaq_mean": float(np.mean(list(a.values()))),
                             "gptq_mean": float(np.mean(list(b.values())))})
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    ppl = any("perplexity" in r for r in rows)
    lines = [f"| setting | method | {'perplexity' if ppl else '1 - mean cosine | min cosine | Spearman'} | "
             "compile s | peak MiB |", "|---|---|---|---|---|" + ("" if ppl else "---|---|")]
    for r in rows:
        if "holdout" in r:
            lines.append(f"| {r['setting']} | held-out: GPTAQ below GPTQ at {r['share']:.0%} of {r['sites']} sites "
                         f"(mean {r['gptaq_mean']:.4f} vs {r['gptq_mean']:.4f}) | |" + (" |" if ppl else " | | |"))
            continue
        q = f"{r['perplexity']:.2f}" if ppl else f"{r['one_minus_cos']:.4f} | {r['min_cos']:.4f} | {r['spearman']:.4f}"
        t = f"{r['compile_s']:.0f}" if "compile_s" in r else ""
        mem = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else ""
        lines.append(f"| {r['setting']} | {r['method']} | {q} | {t} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
