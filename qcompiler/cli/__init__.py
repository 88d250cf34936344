"""Command line: ``qcompiler compile | eval | inspect | generate | export`` (one module per command).

Bad input ends with one line on stderr naming the problem and exit code 2; nothing is written.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import signal
import sys
import threading
from pathlib import Path

from qcompiler import __version__
from qcompiler.cli import compile as compile_cmd
from qcompiler.cli import eval as eval_cmd
from qcompiler.cli import export as export_cmd
from qcompiler.cli import generate as generate_cmd
from qcompiler.cli import inspect as inspect_cmd
from qcompiler.cli.options import field_default
from qcompiler.config import DEVICES, CompileConfig
from qcompiler.errors import QCompilerError, first_line
from qcompiler.frontends.bundled import BUNDLED

log = logging.getLogger("qcompiler")
EXIT_BAD_INPUT = 2
COMMANDS = {"compile": compile_cmd, "eval": eval_cmd, "inspect": inspect_cmd, "generate": generate_cmd,
            "export": export_cmd}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention too)
        self.exit(EXIT_BAD_INPUT, f"qcompiler: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcompiler", description="Compile transformer models to weight-quantized ONNX. "
                                              "`qcompiler MODEL [options]` is short for `qcompiler compile MODEL`.")
    p.add_argument("--version", action="version", version=f"qcompiler {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="{" + ",".join(COMMANDS) + "}")
    for name, module in COMMANDS.items():
        sp = module.add_parser(sub)
        if name != "compile":  # compile's comes from CompileConfig with the other options
            sp.add_argument("--device", default=field_default(CompileConfig, "device"), choices=DEVICES,
                            help="ONNX Runtime's execution provider (auto: CUDA when present)")
        sp.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (-vv: debug)")
        sp.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
        sp.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _route(argv: list[str], parser: argparse.ArgumentParser) -> list[str] | str:
    """``argv`` with its command made explicit, or a one-line error: ``qcompiler MODEL ...`` means compile;
    a first word that is neither a command nor a model is a mistyped command."""
    if not argv or argv[0] in COMMANDS or argv[0].startswith("-"):
        return argv
    word = argv[0]
    looks_like_model = word in BUNDLED or Path(word).exists() or "/" in word or word.endswith(".onnx")
    if looks_like_model:
        return ["compile", *argv]
    near = difflib.get_close_matches(word, list(COMMANDS), n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return (f"qcompiler: error: {word!r} is neither a command ({', '.join(COMMANDS)}) nor a model (an .onnx file, "
            f"a folder, or one of: {', '.join(BUNDLED)}){hint}\n")


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
    if not argv:  # nothing asked: say what there is rather than compile something
        parser.print_help()
        return 0
    routed = _route(argv, parser)
    if isinstance(routed, str):
        sys.stderr.write(routed)
        return EXIT_BAD_INPUT
    try:
        args = parser.parse_args(routed)
    except SystemExit as e:  # argparse: --help, --version, or a bad option (exit 2)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    _setup_logging(args)
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return COMMANDS[args.command].run(args)
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
