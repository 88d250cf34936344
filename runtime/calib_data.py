"""Calibration tokens and the feeds that carry them into a model.

Text is tokenized with the model's tokenizer and cut into ``samples`` windows of ``seqlen`` tokens,
drawn at seeded random offsets (GPTQ's recipe); a ``.npy`` holds token ids already (``[S, L]``, or 1-D
and cut the same way). The default text is Python's own documentation (``pydoc_data.topics``, shipped
with every CPython), disjoint from the Jargon File that evaluation uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from qcompiler.errors import ConfigError
from qcompiler.runtime.inputs import past_feeds, vocab_size
from qcompiler.runtime.text import read_text

PYTHON_DOCS = "python-docs"  # the name of the default calibration text


def python_docs_text() -> str:
    """Python's documentation topics (the text of ``help('topic')``), always present with CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _windows(ids: np.ndarray, count: int, length: int, seed: int, what: str) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) < count * length:
        raise ConfigError(f"{what} has {len(ids)} tokens, {count} x {length} are needed for calibration")
    rng = np.random.default_rng(seed)
    # non-overlapping windows: a random offset inside each of `count` equal slices of the text
    span = len(ids) // count
    starts = np.arange(count) * span + rng.integers(0, span - length + 1, size=count)
    return np.stack([ids[s:s + length] for s in starts])


def check_source(source: str | os.PathLike | None) -> None:
    """A calibration file that does not exist, named before any model is loaded (a one-line error)."""
    if source is None or str(source) == PYTHON_DOCS:
        return
    if not Path(source).is_file():
        kind = "calibration file" if str(source).endswith(".npy") else "calibration text file"
        raise ConfigError(f"{kind} not found: {source}")


def calibration_tokens(source: str | os.PathLike | None, tokenizer_dir: str | None, count: int, length: int,
                       seed: int = 0) -> np.ndarray:
    """``[count, length]`` int64 token ids from a text file, a ``.npy`` of ids, or Python's docs (None)."""
    if source is not None and str(source).endswith(".npy"):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"calibration file not found: {path}")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read calibration ids {path}: {e}") from None
        if not np.issubdtype(arr.dtype, np.integer) or arr.ndim not in (1, 2):
            raise ConfigError(f"{path}: expected a 1-D or 2-D array of integer token ids, got {arr.dtype} {arr.shape}")
        if arr.ndim == 2 and arr.shape[1] >= length and arr.shape[0] >= count:
            return np.ascontiguousarray(arr[:count, :length].astype(np.int64))
        return _windows(arr, count, length, seed, str(path))
    if tokenizer_dir is None:
        raise ConfigError("calibration text needs a tokenizer: pass --tokenizer DIR (the model records none)")
    text = python_docs_text() if source is None or str(source) == PYTHON_DOCS else read_text(source)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a folder without a tokenizer
        raise ConfigError(f"cannot load a tokenizer from {tokenizer_dir} ({type(e).__name__}); "
                          "pass --tokenizer DIR or a .npy of token ids as --calib") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return _windows(np.asarray(ids), count, length, seed, "the calibration text" if source is None else str(source))


def token_input(model: onnx.ModelProto) -> str:
    """The graph input that takes token ids."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    for i in inputs:
        if i.name == "input_ids":
            return i.name
    ints = [i.name for i in inputs if vocab_size(model, i.name) is not None]
    if len(ints) == 1:
        return ints[0]
    raise ConfigError("calibration needs one token-id input (an input_ids feeding the embedding Gather); "
                      f"the model's inputs are {', '.join(i.name for i in inputs)}")


def calibration_feeds(model: onnx.ModelProto, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a batch of token ids ``[B, L]``: a full attention mask, zero token types, positions, and an
    empty past for a KV-cache graph's ``past_key_values.*``."""
    inits = {t.name for t in model.graph.initializer}
    ids_name = token_input(model)
    past = past_feeds(model, len(ids))  # a KV-cache graph: an empty past
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if inp.name in past:
            feeds[inp.name] = past[inp.name]
            continue
        name = inp.name.lower()
        if inp.name == ids_name:
            feeds[inp.name] = ids
        elif "mask" in name:
            feeds[inp.name] = np.ones_like(ids)
        elif "token_type" in name:
            feeds[inp.name] = np.zeros_like(ids)
        elif "position" in name:
            feeds[inp.name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        else:
            raise ConfigError(f"calibration cannot feed the model's input {inp.name!r} "
                              "(known: token ids, attention mask, token types, positions)")
        want = inp.type.tensor_type.elem_type
        if want == onnx.TensorProto.INT32:
            feeds[inp.name] = feeds[inp.name].astype(np.int32)
    return feeds
