"""``qcompiler eval``: measure a model: embedding fidelity against a reference, or perplexity."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from qcompiler.errors import ConfigError


def add_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="measure a model: embedding fidelity or perplexity")
    e.add_argument("model", help="the .onnx model to measure (or an onnxruntime-genai folder)")
    e.add_argument("--reference",
                   help="reference model: .onnx, HF folder or bundled name (fidelity; optional for perplexity)")
    e.add_argument("--perplexity", action="store_true", help="perplexity of a causal LM")
    e.add_argument("--text", help="text file (.txt or .gz; default: the Jargon File if installed)")
    e.add_argument("--tokenizer", help="tokenizer folder (default: recorded in the model by qcompiler)")
    e.add_argument("--paragraphs", type=int, default=256, help="paragraphs for fidelity (default 256)")
    e.add_argument("--max-length", type=int, default=128, help="tokens per paragraph (default 128)")
    e.add_argument("--windows", type=int, default=8, help="perplexity windows (default 8)")
    e.add_argument("--window-length", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--no-bos", dest="bos", action="store_false",
                   help="perplexity windows of text tokens only (default: each window begins as the model's "
                        "tokenizer begins a text, with BOS where it adds one)")
    e.add_argument("--json", help="write the figures as JSON here")
    return e


def run(args: argparse.Namespace) -> int:
    from qcompiler.frontends.onnx_file import load_onnx_model, model_file
    from qcompiler.runtime import evaluate
    from qcompiler.runtime.session import SessionOptions
    from qcompiler.runtime.text import default_text, paragraphs, read_text

    if args.json:
        from qcompiler.graphio import check_writable

        check_writable(args.json)
    loaded = load_onnx_model(model_file(args.model))
    tok = args.tokenizer or loaded.tokenizer_dir
    if not tok:
        raise ConfigError("no tokenizer: pass --tokenizer DIR (the model does not record one)")
    if not Path(tok).is_dir():
        raise ConfigError(f"tokenizer folder not found: {tok}")
    text = read_text(args.text or default_text())
    opts = SessionOptions(device=args.device)
    reference = None
    if args.reference:
        from qcompiler.frontends import load_model

        reference = load_model(args.reference).model
    out: dict = {"model": args.model, "reference": args.reference}
    if args.perplexity:
        try:
            windows = evaluate.token_windows(tok, text, args.windows, args.window_length, bos=args.bos)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        prefix = evaluate.window_prefix(tok) if args.bos else []
        res = evaluate.perplexity(loaded.model, windows, opts, progress=not args.quiet)
        out["perplexity"] = asdict(res)
        out["window_prefix"] = prefix
        start = (f"each window starts with the tokenizer's {len(prefix)} prefix token(s) {prefix} (BOS)" if prefix
                 else "windows of text tokens only" + ("" if not args.bos else " (the tokenizer adds no BOS)"))
        lines = [f"perplexity {res.perplexity:.3f} over {res.tokens} tokens ({res.windows} windows; {start})"]
        if reference is not None:
            ref = evaluate.perplexity(reference, windows, opts, progress=not args.quiet)
            out["reference_perplexity"] = asdict(ref)
            lines.append(f"reference perplexity {ref.perplexity:.3f} (ratio {res.perplexity / ref.perplexity:.4f})")
    else:
        if reference is None:
            raise ConfigError("fidelity needs --reference REF.onnx (or pass --perplexity)")
        paras = paragraphs(text, args.paragraphs)
        if len(paras) < 2:
            raise ConfigError("the text has fewer than 2 usable paragraphs")
        res = evaluate.embedding_fidelity(loaded.model, reference, tok, paras, args.max_length, opts,
                                          progress=not args.quiet)
        out["fidelity"] = asdict(res)
        lines = [f"embedding fidelity over {res.paragraphs} paragraphs: mean cosine {res.mean_cosine:.5f}, "
                 f"min {res.min_cosine:.5f}, spearman {res.spearman:.5f}, nn agreement {res.nn_agreement:.4f}"]
    if args.json:
        from qcompiler.pipeline import write_report

        write_report(out, args.json)
    if not args.quiet:
        sys.stdout.write("\n".join(lines) + "\n")
    return 0
