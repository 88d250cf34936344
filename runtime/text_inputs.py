"""Validation inputs from real text when the model's tokenizer is known; random token ids otherwise.

Random token ids do not rank quantization methods (a 3-bit LLM's validation on them scored RTN better
than GPTAQ while perplexity said the opposite): a few paragraphs of real text do. The random inputs stay
the fallback, and every set of inputs carries a label saying which kind it is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qcompiler.errors import QCompilerError
from qcompiler.runtime.inputs import sample_inputs, vocab_size
from qcompiler.runtime.text import JARGON_FILE, paragraphs, read_text

log = logging.getLogger(__name__)

_INT_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
_NOT_TOKENS = ("mask", "position", "token_type", "past", "cache", "present")


@dataclass(frozen=True)
class SampleInputs:
    feeds: dict[str, np.ndarray]
    label: str  # what they are, for the validation line: "text (4 samples of the Jargon File, ...)"


def token_input(model: onnx.ModelProto) -> str | None:
    """The graph input that takes token ids: ``input_ids``, else the one integer input that is not a mask,
    position, token type or cache."""
    init_names = {t.name for t in model.graph.initializer}
    ints = [i.name for i in model.graph.input
            if i.name not in init_names and i.type.tensor_type.elem_type in _INT_TYPES]
    if "input_ids" in ints:
        return "input_ids"
    ids = [n for n in ints if not any(w in n.lower() for w in _NOT_TOKENS)]
    return ids[0] if len(ids) == 1 else None


def random_label(model: onnx.ModelProto) -> str:
    return "random token ids" if token_input(model) else "random inputs"


def random_sample_inputs(model: onnx.ModelProto, batch: int = 2, seq: int = 16) -> SampleInputs:
    return SampleInputs(sample_inputs(model, batch=batch, seq=seq), random_label(model))


def _token_rows(tokenizer_dir: str, texts: list[str], seq: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [list(tok(t, truncation=True, max_length=seq)["input_ids"]) for t in texts]


def real_sample_inputs(model: onnx.ModelProto, tokenizer_dir: str | os.PathLike | None,
                       text: str | os.PathLike | None = None, samples: int = 4, seq: int = 32,
                       min_tokens: int = 8) -> SampleInputs | None:
    """``samples`` paragraphs of ``text`` (default: the Jargon File), each cut to the same length of at most
    ``seq`` tokens (no padding), as inputs for every graph input of ``model``; None where that cannot be
    done (no tokenizer, no text, no token-id input, a fixed input shape, ids beyond the model's vocabulary).

    Inputs other than the token ids start from ``sample_inputs`` (so caches and positions keep its
    conventions); every mask is set to ones (all tokens real).
    """
    if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
        if tokenizer_dir:
            log.info("real validation inputs: tokenizer folder %s not found", tokenizer_dir)
        return None
    source = Path(text) if text is not None else JARGON_FILE
    if not source.is_file():
        log.info("real validation inputs: no text (%s missing)", source)
        return None
    name = token_input(model)
    if name is None:
        return None
    try:
        texts = paragraphs(read_text(source), count=samples)
        rows = _token_rows(str(tokenizer_dir), texts, seq) if texts else []
    except (QCompilerError, OSError, ValueError) as e:
        log.info("real validation inputs: %s", e)
        return None
    length = min((len(r) for r in rows), default=0)
    if not rows or length < min_tokens:
        log.info("real validation inputs: %d paragraphs of %d+ tokens in %s", len(rows), length, source)
        return None
    ids = np.array([r[:length] for r in rows], dtype=np.int64)
    vocab = vocab_size(model, name)
    if vocab is not None and int(ids.max()) >= vocab:
        log.info("real validation inputs: token id %d beyond the model's %d embeddings", int(ids.max()), vocab)
        return None
    feeds = sample_inputs(model, batch=len(rows), seq=length)
    if feeds[name].shape != ids.shape:
        log.info("real validation inputs: %s has the fixed shape %s", name, list(feeds[name].shape))
        return None
    feeds[name] = ids.astype(feeds[name].dtype)
    for k, v in feeds.items():
        if "mask" in k.lower():
            feeds[k] = np.ones_like(v)
    what = "the Jargon File" if source == JARGON_FILE else source.name
    return SampleInputs(feeds, f"text ({len(rows)} samples of {what}, {length} tokens each)")


def validation_inputs(model: onnx.ModelProto, tokenizer_dir: str | os.PathLike | None,
                      text: str | os.PathLike | None = None, samples: int = 4, seq: int = 32) -> SampleInputs:
    """Real-text inputs where the tokenizer (and text) are known, else ``sample_inputs``' random ones."""
    real = real_sample_inputs(model, tokenizer_dir, text, samples, seq)
    return real if real is not None else random_sample_inputs(model)
