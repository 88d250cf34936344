"""Command line: ``qcompiler compile`` and ``qcompiler eval``.

Bad input ends with one line on stderr naming the problem and exit code 2; nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from qcompiler import __version__
from qcompiler.config import (
    CALIBRATED_METHODS,
    METHODS,
    ONLINE_LAYOUTS,
    ONLINE_REGIMES,
    PER_CHANNEL,
    CafeqConfig,
    CalibConfig,
    CompileConfig,
    MatchConfig,
    QuantConfig,
)
from qcompiler.errors import ConfigError, QCompilerError, first_line

log = logging.getLogger("qcompiler")
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention too)
        self.exit(EXIT_BAD_INPUT, f"qcompiler: error: {message}\n")


def _group_size(text: str) -> int:
    if text in ("channel", "per-channel", "0"):
        return PER_CHANNEL
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid group size {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcompiler", description="Compile transformer models to weight-quantized ONNX.")
    p.add_argument("--version", action="version", version=f"qcompiler {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    c = sub.add_parser("compile", help="quantize a model's weights and write ONNX")
    c.add_argument("model", nargs="?", default=None,
                   help="an .onnx file, a Hugging Face folder, or a bundled name (default: minilm)")
    c.add_argument("-o", "--output", help="output .onnx (default: <model>.<method>-w<bits>.onnx here)")
    c.add_argument("--method", default="rtn", choices=METHODS)
    c.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (3-bit codes use the 4-bit container)")
    c.add_argument("--group-size", dest="group_size", type=_group_size, default=32,
                   help="rows of K per scale: a power of two in 16..256, or 'channel' (default 32)")
    sym = c.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", help="symmetric grid")
    sym.add_argument("--asym", dest="symmetric", action="store_false", help="asymmetric grid (default)")
    c.set_defaults(symmetric=False)
    c.add_argument("--format", default="matmulnbits", choices=["matmulnbits", "qdq"])
    c.add_argument("--accuracy-level", type=int, default=1,
                   help="MatMulNBits accuracy_level: 1 float activations (default), 4 int8 activations")
    c.add_argument("--quantize-lm-head", action="store_true", help="also quantize the output head")
    c.add_argument("--quantize-embeddings", action="store_true",
                   help="also quantize embedding tables (DequantizeLinear before the Gather)")
    c.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip running the result against the original")
    c.add_argument("--max-error", type=float,
                   help="refuse to write the model (exit 3) when its relative output error against the original "
                        "on sample inputs exceeds this; non-finite outputs are always refused")
    c.add_argument("--force", action="store_true", help="write the model even when validation fails")
    c.add_argument("--report", help="write a JSON report here")
    st = c.add_mutually_exclusive_group()
    st.add_argument("--stream", dest="stream", action="store_true", default=None,
                    help="leave the weights on disk (an .onnx input's external data; a Hugging Face folder's "
                         "safetensors, exported without loading them) and compile a chunk at a time (default: "
                         "above 2 GiB of fp32 weights); the output gets external data")
    st.add_argument("--no-stream", dest="stream", action="store_false", help="load the whole model")
    c.add_argument("--stream-chunk-mb", type=int, default=None,
                   help="fp32 weight MB planned at once when streaming (default: rtn 256, cafeq/rotate 16)")
    t = c.add_argument_group("cafeq / rotate (calibration-free transforms)")
    t.add_argument("--transforms", default="single,vo,updown",
                   help="any subset of single (block-diagonal T, online x T^-1 per sibling group), vo (V·O per KV "
                        "head, folded), updown (up·down diagonal + permutation, folded)")
    t.add_argument("--block-size", type=int, default=64, help="b of the single-matrix transforms (default 64)")
    t.add_argument("--online-budget", type=float, default=0.03,
                   help="the most the online x T^-1 ops may add to run time, as a fraction (0.03)")
    t.add_argument("--online-regime", default="batch", choices=ONLINE_REGIMES,
                   help="run time the budget is counted in: batch (arithmetic, default) or token (a decoder's "
                        "batch-1 token step, where each op's fixed cost counts; fewer ops, less accuracy)")
    t.add_argument("--online-layout", default="auto", choices=ONLINE_LAYOUTS,
                   help="how the online x T^-1 ops are written: matmul (batched MatMul: encoders, prefill), conv "
                        "(grouped 1x1 Conv: a decoder's batch-1 token steps), auto (default: conv for causal LMs)")
    t.add_argument("--pseudo-loss", default="ste", choices=["ste", "lse"],
                   help="ste: straight-through Frobenius (default); lse: LogSumExp smooth range")
    t.add_argument("--optimizer", default="adam", choices=["adam", "cayley"])
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--patience", type=int, default=100,
                   help="stop a learner once its best error has not fallen by 0.01%% in this many steps (0: never)")
    t.add_argument("--lr", type=float, default=2e-2)
    t.add_argument("--ortho-reg", type=float, default=0.0, help="orthonormality penalty weight (adam)")
    t.add_argument("--temperature", type=float, default=20.0, help="LSE temperature")
    t.add_argument("--init", default="identity", choices=["identity", "orthogonal", "hadamard"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--jobs", type=int, default=0,
                   help="worker processes for learning and joint rounding (default 0: one per core on models "
                        "of 1M+ weights); the result does not depend on it")
    t.add_argument("--no-joint-rounding", dest="joint_rounding", action="store_false",
                   help="cafeq: round each weight alone (skip joint rounding of the coupled pairs)")
    t.add_argument("--joint-pairs", default="vo,updown",
                   help="cafeq: which coupled pairs are rounded jointly (subset of vo,updown)")
    t.add_argument("--joint-rounds", type=int, default=4,
                   help="cafeq: alternations of joint rounding per V·O pair (default 4)")
    t.add_argument("--joint-max-gb", type=float, default=4.0,
                   help="skip joint rounding of a pair needing more memory than this (wide MLPs; default 4)")
    t.add_argument("--joint-mlp-rounds", type=int, default=2,
                   help="cafeq: alternations of joint rounding per up·down pair (default 2)")
    t.add_argument("--joint-channel-weight", type=float, default=4.0,
                   help="cafeq, MLP pairs: weight of each channel's own product error against the whole "
                        "product's (the activation between up and down varies per token; default 4)")
    t.add_argument("--transforms-only", action="store_true",
                   help="apply the method's transforms but keep float weights (checks that they are exact)")
    k = c.add_argument_group("gptq / gptaq / cafeq+gptaq (calibration)")
    k.add_argument("--calib", help="calibration text file (.txt, .gz, ...) or .npy of token ids "
                                   "(default: Python's documentation, shipped with CPython)")
    k.add_argument("--tokenizer", help="tokenizer folder for the calibration text (default: the model's)")
    k.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default 64)")
    k.add_argument("--calib-seqlen", type=int, default=512, help="tokens per sequence (default 512)")
    k.add_argument("--calib-holdout", type=int, default=0,
                   help="extra held-out sequences: report ||X W_hat - X~ W|| per site on them (default 0)")
    k.add_argument("--calib-batch", type=int, default=8, help="sequences per ONNX Runtime run (default 8)")
    k.add_argument("--percdamp", type=float, default=0.01, help="Hessian damping, fraction of mean diag (0.01)")
    k.add_argument("--act-order", action="store_true", help="round inputs by decreasing activation energy")
    k.add_argument("--no-attention-values", dest="attention_values", action="store_false",
                   help="round attention V projections on their inputs X alone, not as attention mixes them (A X)")
    k.add_argument("--alpha", type=float, default=0.25, help="GPTAQ: weight of the asymmetric term (0.25)")
    k.add_argument("--gptq-block", type=int, default=128, help="rows per lazy batch update (128)")
    c.add_argument("--cache-dir", help="export cache folder (default ~/.cache/qcompiler)")

    e = sub.add_parser("eval", help="measure a model: embedding fidelity or perplexity")
    e.add_argument("model", help="the .onnx model to measure")
    e.add_argument("--reference",
                   help="reference model: .onnx, HF folder or bundled name (fidelity; optional for perplexity)")
    e.add_argument("--perplexity", action="store_true", help="perplexity of a causal LM")
    e.add_argument("--text", help="text file (.txt or .gz; default: the Jargon File if installed)")
    e.add_argument("--tokenizer", help="tokenizer folder (default: recorded in the model by qcompiler)")
    e.add_argument("--paragraphs", type=int, default=256)
    e.add_argument("--max-length", type=int, default=128)
    e.add_argument("--windows", type=int, default=8)
    e.add_argument("--window-length", type=int, default=512)
    e.add_argument("--json", help="write the figures as JSON here")

    i = sub.add_parser("inspect", help="show sites, coupled pairs, sibling groups and what the compiler changed")
    i.add_argument("model", nargs="?", default=None,
                   help="an .onnx file (compiled or not), a Hugging Face folder, or a bundled name")
    i.add_argument("--json", action="store_true", help="print the inspection as JSON")
    i.add_argument("--html", help="write a self-contained HTML page here (the graph, block by block)")
    i.add_argument("--against", help="the original .onnx: add a diff (nodes, initializer bytes)")
    i.add_argument("--verify", action="store_true",
                   help="fold random exact transforms into every float pair and report how much ONNX Runtime's "
                        "outputs change (float rounding only, if the pairs are right)")
    i.add_argument("--cache-dir", help="export cache folder (default ~/.cache/qcompiler)")

    for sp in (c, e, i):
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="ONNX Runtime execution provider for validation/evaluation")
        sp.add_argument("-v", "--verbose", action="count", default=0)
        sp.add_argument("-q", "--quiet", action="store_true")
        sp.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _default_output(model: str | None, method: str, bits: int) -> str:
    name = Path(model).name if model else "minilm"
    stem = name[:-5] if name.endswith(".onnx") else name
    return f"{stem}.{method}-w{bits}.onnx"


def _human(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_compile(args: argparse.Namespace) -> int:
    from qcompiler.pipeline import compile_model, write_report

    config = CompileConfig(
        quant=QuantConfig(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric),
        match=MatchConfig(quantize_lm_head=args.quantize_lm_head, quantize_embeddings=args.quantize_embeddings),
        method=args.method, format=args.format, accuracy_level=args.accuracy_level, validate=args.validate,
        max_error=args.max_error, force=args.force, stream=args.stream, stream_chunk_mb=args.stream_chunk_mb,
        cafeq=CafeqConfig(
            transforms=tuple(t for t in args.transforms.split(",") if t), block_size=args.block_size,
            loss=args.pseudo_loss, optimizer=args.optimizer, steps=args.steps, patience=args.patience, lr=args.lr,
            ortho_reg=args.ortho_reg,
            temperature=args.temperature, init=args.init, seed=args.seed, device=args.device,
            online_budget=args.online_budget, online_regime=args.online_regime,
            online_layout=args.online_layout,
            joint_pairs=tuple(t for t in args.joint_pairs.split(",") if t) if args.joint_rounding else (),
            joint_rounds=args.joint_rounds, joint_mlp_rounds=args.joint_mlp_rounds, joint_max_gb=args.joint_max_gb,
            joint_channel_weight=args.joint_channel_weight, jobs=args.jobs),
        quantize_weights=not args.transforms_only,
        calib=CalibConfig(source=args.calib, tokenizer=args.tokenizer, samples=args.calib_samples,
                          seqlen=args.calib_seqlen, holdout=args.calib_holdout, batch=args.calib_batch,
                          percdamp=args.percdamp, act_order=args.act_order, alpha=args.alpha, block=args.gptq_block,
                          attention_values=args.attention_values, seed=args.seed),
    )
    output = args.output or _default_output(args.model, args.method, args.bits)
    if args.report:
        from qcompiler.graphio import check_writable

        check_writable(args.report)
    result = compile_model(args.model, output, config, cache_dir=args.cache_dir, progress=not args.quiet)
    report = result.report(config)
    if args.report:
        write_report(report, args.report)
    if not args.quiet:
        total = sum(result.timings.values())
        errs = [p.stats.rel_error for p in result.plan.sites]
        rtn = [p.stats.rtn_rel_error for p in result.plan.sites if p.stats.rtn_rel_error is not None]
        lines = [
            f"compiled {result.source} -> {result.output}",
            f"  method {config.method}, {config.quant.describe()}, format {config.format}",
            f"  sites: {len(result.plan.sites)} quantized, {len(result.match.rejected)} skipped"
            f" (weight rel. error mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}"
            + (f"; plain RTN: mean {sum(rtn) / len(rtn):.4f})" if rtn and config.method != "rtn" else ")"),
            f"  size: {_human(result.size_before)} -> {_human(result.size_after)}"
            f" ({result.size_after / max(result.size_before, 1):.2f}x)",
        ]
        plan = result.plan
        if plan.pair_transforms or plan.online:
            lines.append(f"  transforms: {len(plan.pair_transforms)} pairs folded, "
                         f"{len(plan.online)} online x T^-1 ops")
        for kind in ("attn_vo", "mlp_up_down"):
            ps = [p for p in plan.pair_stats if p.kind == kind]
            if ps:
                mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
                plain = [p.pqe_plain for p in ps if p.pqe_plain is not None]
                lines.append(f"  {kind} product error (PQE) mean over {len(ps)} pairs: "
                             f"RTN {mean([p.pqe_rtn for p in ps]):.4f}"
                             + (f", transforms {mean(plain):.4f}" if len(plain) == len(ps) else "")
                             + f", final {mean([p.pqe for p in ps]):.4f}")
        if plan.method == "cafeq" and config.cafeq.joint_pairs:
            joint = [p for p in plan.sites if p.stats.plain_rel_error is not None
                     and p.stats.plain_rel_error != p.stats.rel_error]
            if joint:
                lines.append(f"  joint rounding: {len(joint)} paired weights, rel. error mean "
                             f"{sum(p.stats.plain_rel_error for p in joint) / len(joint):.4f} -> "
                             f"{sum(p.stats.rel_error for p in joint) / len(joint):.4f} (traded for the products)")
        if config.method in CALIBRATED_METHODS:
            cal = [p.stats for p in plan.sites if p.stats.rtn_proxy_error]
            if cal:
                lines.append(f"  calibration output error^2 (relative) mean over {len(cal)} sites: RTN "
                             f"{sum(s.rtn_proxy_error for s in cal) / len(cal):.5f} -> "
                             f"{sum(s.proxy_error for s in cal) / len(cal):.5f}")
            ho = [p.stats.holdout_error for p in plan.sites if p.stats.holdout_error is not None]
            if ho:
                lines.append(f"  held-out ||X W_hat - X~ W|| / ||X~ W|| mean over {len(ho)} sites: "
                             f"{sum(ho) / len(ho):.4f}")
        if result.validation is not None:
            for o in result.validation.outputs:
                lines.append(f"  validation [{o.name}]: rel. error {o.rel_error:.4f}, cosine {o.cosine:.5f}")
        lines.append(f"  time: {total:.1f}s (" + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
                     + (", export cached)" if result.cached_export else ")")
                     + f"; peak memory {report['peak_rss_mb']:.0f} MiB")
        if args.report:
            lines.append(f"  report: {args.report}")
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from qcompiler.frontends.onnx_file import load_onnx_model
    from qcompiler.runtime import evaluate
    from qcompiler.runtime.session import SessionOptions
    from qcompiler.runtime.text import default_text, paragraphs, read_text

    if args.json:
        from qcompiler.graphio import check_writable

        check_writable(args.json)
    loaded = load_onnx_model(Path(args.model))
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
            windows = evaluate.token_windows(tok, text, args.windows, args.window_length)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        res = evaluate.perplexity(loaded.model, windows, opts, progress=not args.quiet)
        out["perplexity"] = asdict(res)
        lines = [f"perplexity {res.perplexity:.3f} over {res.tokens} tokens ({res.windows} windows)"]
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


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from qcompiler.frontends import load_model
    from qcompiler.graphio import check_writable, load_onnx
    from qcompiler.inspect import inspect_model
    from qcompiler.inspect.html import write_html
    from qcompiler.inspect.text import render_text

    if args.html:
        check_writable(args.html)
    loaded = load_model(args.model, cache_dir=args.cache_dir)
    against = load_onnx(args.against) if args.against else None
    ins = inspect_model(loaded.model, loaded.source, against=against, with_graph=bool(args.html))
    verify = None
    if args.verify:
        from qcompiler.inspect.verify import fold_check

        check, _ = fold_check(loaded.model, ins.analysis)
        verify = {"pairs_folded": check.pairs, "max_rel_change": check.rel_change}
    if args.html:
        write_html(ins, args.html)
    if args.json:
        sys.stdout.write(json.dumps({**ins.to_json(), **({"verify": verify} if verify else {})}, indent=1) + "\n")
    elif not args.quiet:
        text = render_text(ins)
        if verify:
            text += (f"\nverify: random exact transforms folded into {verify['pairs_folded']} pairs change the "
                     f"outputs by {verify['max_rel_change']:.2e} (relative)")
        sys.stdout.write(text + "\n" + (f"page: {args.html}\n" if args.html else ""))
    return 0


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else
                                                 logging.INFO if args.verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # third-party chatter (e.g. torch.onnx's "torchvision is not installed") only with -v
    for noisy in ("onnxscript", "torch", "transformers", "onnx_ir", "onnxruntime"):
        logging.getLogger(noisy).setLevel(level if args.verbose else logging.ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C so that temporary files go and nothing half-written stays."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(argv if argv is not None else sys.argv[1:])
    if not argv or (argv[0] not in ("compile", "eval", "inspect") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["compile", *argv]  # plain ``qcompiler [MODEL] [options]`` means compile
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help, --version, or a bad option (exit 2)
        return int(e.code or 0)
    _setup_logging(args)
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return {"compile": cmd_compile, "eval": cmd_eval, "inspect": cmd_inspect}[args.command](args)
    except QCompilerError as e:
        if args.debug:
            raise
        sys.stderr.write(f"qcompiler: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt as e:
        sys.stderr.write("qcompiler: interrupted; nothing written\n")
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        sys.stderr.write(f"qcompiler: internal error: {type(e).__name__}: {first_line(e)} (rerun with --debug)\n")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
