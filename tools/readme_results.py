"""Measure RTN on the bundled MiniLM at several settings and write the README's results table.

    python tools/readme_results.py            # prints the table and rewrites it in README.md

Fidelity: mean-pooled sentence embeddings of 256 Jargon File paragraphs (128 tokens) against fp32.
ONNX Runtime's own MatMulNBitsQuantizer (DEFAULT = RTN) runs beside ours where it supports the setting.
"""

from __future__ import annotations

import argparse
import logging
import platform
import re
import time
from pathlib import Path

import onnx

from qcompiler.config import CompileConfig, QuantConfig
from qcompiler.frontends import load_model
from qcompiler.frontends.bundled import bundled_path
from qcompiler.pipeline import compile_model
from qcompiler.runtime.evaluate import fidelity, sentence_embeddings
from qcompiler.runtime.text import default_text, paragraphs, read_text

SETTINGS = [(4, 32, False), (4, 128, False), (4, 128, True), (3, 128, False), (2, 32, False), (8, 128, False)]
ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _ort_default(model: onnx.ModelProto, bits: int, block: int, sym: bool) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(model.SerializeToString()),
                             algo_config=DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym, bits=bits))
    q.process()
    return q.model.model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print only; leave README.md alone")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    tok = str(bundled_path("minilm"))
    ref_model = load_model("minilm").model
    texts = paragraphs(read_text(default_text()), 256)
    ref = sentence_embeddings(ref_model, tok, texts)
    rows = []
    for bits, block, sym in SETTINGS:
        cfg = QuantConfig(bits, block, sym)
        t0 = time.perf_counter()
        res = compile_model("minilm", None, CompileConfig(quant=cfg))
        t = time.perf_counter() - t0
        f = fidelity(sentence_embeddings(res.model, tok, texts), ref)
        ort_cos = "n/a (no 3-bit)"
        if bits != 3:
            f_ort = fidelity(sentence_embeddings(_ort_default(ref_model, bits, block, sym), tok, texts), ref)
            ort_cos = f"{f_ort.mean_cosine:.4f}"
        rows.append(f"| {cfg.describe()} | {f.mean_cosine:.4f} | {f.min_cosine:.4f} | {f.spearman:.4f} | "
                    f"{f.nn_agreement:.3f} | {ort_cos} | {res.size_after / 1e6:.1f} | {t:.1f} |")
        print(rows[-1], flush=True)
    header = (
        f"Measured by `python tools/readme_results.py` ({platform.machine()}, {platform.python_version()}, "
        f"ONNX Runtime CPU). all-MiniLM-L6-v2 (fp32 file {ref_model.ByteSize() / 1e6:.1f} MB), method rtn, "
        "format matmulnbits; fidelity over 256 Jargon File paragraphs (128 tokens) against fp32; "
        "compile time with the export cache warm, validation included.\n\n"
        "| setting | mean cosine | min cosine | Spearman | NN agreement | ORT DEFAULT mean cosine "
        "| file MB | compile s |\n|---|---|---|---|---|---|---|---|"
    )
    table = header + "\n" + "\n".join(rows)
    print(table)
    if not args.no_write:
        readme = ROOT / "README.md"
        text = readme.read_text()
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), BEGIN + "\n" + table + "\n" + END, text, flags=re.S)
        readme.write_text(new)


if __name__ == "__main__":
    main()
