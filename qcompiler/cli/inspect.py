"""``qcompiler inspect``: sites, coupled pairs, sibling groups, what the matcher skipped and why, and
what a compile changed."""

from __future__ import annotations

import argparse
import logging
import sys

from qcompiler.frontends import DEFAULT_MODEL

log = logging.getLogger("qcompiler")


def add_parser(sub) -> argparse.ArgumentParser:
    i = sub.add_parser("inspect", help="show sites, coupled pairs, sibling groups and what the compiler changed")
    i.add_argument("model", nargs="?", default=None,
                   help=f"an .onnx file (compiled or not), a Hugging Face folder, or a bundled name (default: "
                        f"{DEFAULT_MODEL})")
    i.add_argument("--json", action="store_true", help="print the inspection as JSON")
    i.add_argument("--html", help="write a self-contained HTML page here (the graph, block by block); prints "
                                  "only where it went")
    i.add_argument("--against", help="the original .onnx: add a diff (nodes, initializer bytes)")
    i.add_argument("--verify", action="store_true",
                   help="fold random exact transforms into every float pair and report how much ONNX Runtime's "
                        "outputs change (float rounding only, if the pairs are right)")
    i.add_argument("--cache-dir", help="export cache folder (default ~/.cache/qcompiler)")
    return i


def run(args: argparse.Namespace) -> int:
    import json

    from qcompiler.frontends import load_model
    from qcompiler.graphio import check_writable, load_onnx
    from qcompiler.inspect import inspect_model
    from qcompiler.inspect.html import write_html
    from qcompiler.inspect.text import render_text

    if args.html:
        check_writable(args.html)
    if args.model is None:
        log.warning("no model given: inspecting the bundled %s", DEFAULT_MODEL)
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
        text = "" if args.html else render_text(ins) + "\n"  # with --html the page holds the table
        if verify:
            text += (f"verify: random exact transforms folded into {verify['pairs_folded']} pairs change the "
                     f"outputs by {verify['max_rel_change']:.2e} (relative)\n")
        sys.stdout.write(text + (f"page: {args.html}\n" if args.html else ""))
    return 0
