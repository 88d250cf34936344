"""Evaluation and calibration text: files (plain or .gz), paragraphs, and the default corpus."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

from qcompiler.errors import QCompilerError

JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")


def default_text() -> Path:
    if JARGON_FILE.is_file():
        return JARGON_FILE
    raise QCompilerError(f"no --text given and the default corpus is missing ({JARGON_FILE}; "
                         "apt-get install jargon-text)")


def read_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise QCompilerError(f"text file not found: {p}")
    try:
        if p.suffix == ".gz":
            with gzip.open(p, "rt", encoding="utf-8", errors="replace") as f:
                return f.read()
        return p.read_text(encoding="utf-8", errors="replace")
    except (OSError, EOFError) as e:
        raise QCompilerError(f"cannot read text file {p}: {e}") from None


_WORDY = re.compile(r"[A-Za-z]")


def paragraphs(text: str, count: int = 256, min_chars: int = 200) -> list[str]:
    """``count`` prose paragraphs spread evenly over the text (deterministic).

    Paragraphs are blank-line separated, whitespace-normalised, at least ``min_chars`` long and
    mostly letters (tables and ASCII art are skipped).
    """
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if len(para) < min_chars:
            continue
        letters = len(_WORDY.findall(para))
        if letters < 0.6 * len(para):
            continue
        out.append(para)
    if len(out) <= count:
        return out
    step = len(out) / count
    return [out[int(i * step)] for i in range(count)]
