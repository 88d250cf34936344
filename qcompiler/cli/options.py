"""The command line's options, built from the config dataclasses' field metadata (``config.opt``): each
default and help text is written once, in ``qcompiler.config``."""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from qcompiler.config import PER_CHANNEL, CafeqConfig, CalibConfig, CompileConfig, MatchConfig, QuantConfig

# the nested configs of CompileConfig, with the title of their options' group in --help
SECTIONS = {"quant": (QuantConfig, "quantization grid"), "match": (MatchConfig, "what is quantized"),
            "cafeq": (CafeqConfig, "cafeq / rotate (calibration-free transforms)"),
            "calib": (CalibConfig, "gptq / gptaq / cafeq+gptaq (calibration)")}


def parse_group_size(text: str) -> int:
    if text in ("channel", "per-channel", "0"):
        return PER_CHANNEL
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid group size {text!r}") from None


def _list(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def _base_type(hint: Any) -> type:
    """``int`` of ``int | None``; ``tuple`` of ``tuple[str, ...]``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _shown(value: Any, kind: str | None) -> str:
    if kind == "group_size":
        return "channel" if value == PER_CHANNEL else str(value)
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def field_default(cls: type, name: str) -> Any:
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str) -> None:
    """One option per field of ``cls`` that has CLI metadata; ``dest`` is ``prefix + name``."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = f.metadata
        if not meta or not meta.get("cli") or is_dataclass(hints[f.name]):
            continue
        dest, flag, kind, default = prefix + f.name, meta.get("flag"), meta.get("kind"), field_default(cls, f.name)
        base = _base_type(hints[f.name])
        text = meta["help"]
        if base is bool:
            if isinstance(flag, tuple):  # on / off pair; the default may be None (decided later)
                on, off = flag
                group = parser.add_mutually_exclusive_group()
                group.add_argument(on, dest=dest, action="store_true", default=default, help=text.replace(
                    "%", "%%") + (" (default)" if default is True else ""))
                group.add_argument(off, dest=dest, action="store_false", help="the opposite" + (
                    " (default)" if default is False else ""))
            elif default:
                parser.add_argument(flag or "--no-" + f.name.replace("_", "-"), dest=dest, action="store_false",
                                    default=True, help=text.replace("%", "%%"))
            else:
                parser.add_argument(flag or "--" + f.name.replace("_", "-"), dest=dest, action="store_true",
                                    default=False, help=text.replace("%", "%%"))
            continue
        parse = parse_group_size if kind == "group_size" else _list if kind == "list" else base
        shown = "" if default is None else f" (default: {_shown(default, kind)})"
        parser.add_argument(flag or "--" + f.name.replace("_", "-"), dest=dest, type=parse, default=default,
                            choices=meta.get("choices"), metavar=None if meta.get("choices") else f.name.upper(),
                            help=(text + shown).replace("%", "%%"))


def add_compile_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CompileConfig, "")
    for name, (cls, title) in SECTIONS.items():
        add_options(parser.add_argument_group(title), cls, name + ".")


def compile_config(args: argparse.Namespace, **overrides: Any) -> CompileConfig:
    """The CompileConfig the parsed options describe (``overrides``: per nested config, field values)."""
    values = vars(args)

    def build(cls: type, prefix: str) -> Any:
        kw = {f.name: values[prefix + f.name] for f in fields(cls) if prefix + f.name in values}
        return cls(**{**kw, **overrides.get(prefix.rstrip("."), {})})

    nested = {name: build(cls, name + ".") for name, (cls, _) in SECTIONS.items()}
    top = {f.name: values[f.name] for f in fields(CompileConfig) if f.name in values and f.name not in SECTIONS}
    return CompileConfig(**nested, **top)
