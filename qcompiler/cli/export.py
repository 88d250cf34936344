"""``qcompiler export``: the fp32 ONNX graph alone, as a compile starts from (the baseline to compare with)."""

from __future__ import annotations

import argparse
import sys

from qcompiler.cli.options import field_default
from qcompiler.config import CompileConfig


def add_parser(sub) -> argparse.ArgumentParser:
    x = sub.add_parser("export", help="write the fp32 ONNX graph of a model (no quantization)")
    x.add_argument("model", help="a Hugging Face folder or a bundled name")
    x.add_argument("-o", "--output", required=True, help="output .onnx")
    x.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                   default=field_default(CompileConfig, "kv_cache"),
                   help="a causal LM without its KV cache (input_ids, attention_mask -> logits)")
    x.add_argument("--cache-dir", help="export cache folder (default ~/.cache/qcompiler)")
    return x


def run(args: argparse.Namespace) -> int:
    from qcompiler.frontends import load_model
    from qcompiler.graphio import save_onnx_atomic

    loaded = load_model(args.model, cache_dir=args.cache_dir, kv_cache=args.kv_cache)
    out = save_onnx_atomic(loaded.model, args.output)
    if not args.quiet:
        sys.stdout.write(f"exported {loaded.source} -> {out} ({loaded.kind})\n")
    return 0
