"""``qcompiler compile``: quantize a model's weights and write ONNX."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qcompiler.cli.options import add_compile_options, compile_config
from qcompiler.config import QuantConfig
from qcompiler.frontends import DEFAULT_MODEL
from qcompiler.methods.registry import get_method

log = logging.getLogger("qcompiler")


def add_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("compile", help="quantize a model's weights and write ONNX")
    c.add_argument("model", nargs="?", default=None,
                   help=f"an .onnx file, a Hugging Face folder, or a bundled name (default: {DEFAULT_MODEL})")
    c.add_argument("-o", "--output", help="output .onnx (default: <model>.<method>-<setting>.onnx here, e.g. "
                                          "minilm.rtn-w4-b32-asym.onnx)")
    c.add_argument("--report", help="write a JSON report here")
    add_compile_options(c)
    c.add_argument("--no-joint-rounding", dest="no_joint_rounding", action="store_true",
                   help="cafeq: round each weight alone (the same as --joint-pairs '')")
    c.add_argument("--cache-dir", help="export cache folder (default ~/.cache/qcompiler)")
    return c


def default_output(model: str | None, method: str, quant: QuantConfig, dtype: str = "float32") -> str:
    name = Path(model).name if model else DEFAULT_MODEL
    stem = name[:-5] if name.endswith(".onnx") else name
    precision = "" if dtype == "float32" else "-" + {"float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)
    return f"{stem}.{method}-{quant.tag()}{precision}.onnx"


def run(args: argparse.Namespace) -> int:
    from qcompiler.graphio import check_writable
    from qcompiler.pipeline import compile_model, write_report
    from qcompiler.report import summary_lines

    config = compile_config(args, cafeq={"joint_pairs": ()} if args.no_joint_rounding else {})
    if args.model is None:
        log.warning("no model given: compiling the bundled %s", DEFAULT_MODEL)
    output = args.output or default_output(args.model, config.method, config.quant, config.dtype)
    if config.package == "genai" and not args.output:
        output = output.removesuffix(".onnx")  # a folder
    if args.report:
        check_writable(args.report)
    result = compile_model(args.model, output, config, cache_dir=args.cache_dir, progress=not args.quiet)
    report = result.report(config)
    if args.report:
        write_report(report, args.report)
    if not args.quiet:
        lines = summary_lines(result, config, report["peak_rss_mb"], get_method(config.method).needs_calibration)
        if args.report:
            lines.append(f"  report: {args.report}")
        sys.stdout.write("\n".join(lines) + "\n")
    return 0
