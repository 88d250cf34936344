"""Token generation over ONNX Runtime with a KV-cache graph (``qcompiler.frontends.kv_cache``'s contract).

A prefill runs the prompt from an empty past and gives the first new token; each decode step then feeds
that token, the mask grown by one, and the step before's ``present.N.key/value`` as ``past_key_values.N.*``.
Greedy by default (``temperature=0``); sampling with temperature and nucleus (``top_p``) from a seeded
generator. A batch of prompts is padded on the left (the graph computes positions from the mask). The cache
stays where the session computes (ONNX Runtime I/O binding), so a CUDA session does not copy it each step.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from qcompiler.errors import QCompilerError
from qcompiler.kv_layout import is_past, is_present, present_to_past
from qcompiler.metadata import EOS_TOKEN_IDS, TOKENIZER
from qcompiler.runtime.inputs import session_past_feeds
from qcompiler.runtime.session import SessionOptions, make_session

TokenCallback = Callable[[np.ndarray], None]  # called with each step's new ids, shape [batch]


@dataclass(frozen=True)
class GenerationResult:
    tokens: np.ndarray  # [batch, new] generated ids; a row that ended early is filled with the pad id after its end
    lengths: tuple[int, ...]  # new tokens per row, its end token included
    prompt_tokens: int  # real (unpadded) prompt tokens over the batch
    prefill_s: float  # the prompt's run and the first token's choice
    decode_s: float  # every later step
    decode_steps: int  # runs after the prefill (each gives one token per row)
    texts: tuple[str, ...] | None = None  # decoded new tokens, when a tokenizer was at hand

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps (all rows; the prefill's token is not counted)."""
        n = self.decode_steps * self.tokens.shape[0]
        return n / self.decode_s if self.decode_s > 0 else float("nan")


def _session(model: Any, options: SessionOptions | None) -> ort.InferenceSession:
    if isinstance(model, ort.InferenceSession):
        return model
    if isinstance(model, (str, os.PathLike, bytes, onnx.ModelProto)):
        return make_session(model, options)
    raise QCompilerError(f"cannot generate with a {type(model).__name__}: give an .onnx path, a ModelProto or "
                         "an onnxruntime.InferenceSession")


def load_tokenizer(tokenizer: Any):
    """A tokenizer object as it is, else ``AutoTokenizer.from_pretrained`` of a folder."""
    if tokenizer is None or hasattr(tokenizer, "decode"):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a folder without a tokenizer
        raise QCompilerError(f"cannot load a tokenizer from {tokenizer} ({type(e).__name__}: {e})") from None


def _encode(prompt: Any, attention_mask: Any, tok) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` [batch, length], int64, padded on the left."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str)):
        if tok is None:
            raise QCompilerError("a text prompt needs a tokenizer: pass tokenizer=FOLDER (the model records none)")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        saved = getattr(tok, "padding_side", None), getattr(tok, "pad_token", None)
        try:
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
            enc = tok(texts, padding=True, return_tensors="np")
        finally:
            tok.padding_side, tok.pad_token = saved
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0 or (mask.sum(1) == 0).any():
            where = getattr(tok, "name_or_path", "") or type(tok).__name__
            raise QCompilerError(f"a prompt encodes to no tokens with the tokenizer of {where} "
                                 "(does the folder hold tokenizer files?)")
        return ids, mask
    ids = np.asarray(prompt, dtype=np.int64)
    ids = ids[None, :] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise QCompilerError(f"input ids must be [batch, length] with length > 0, got shape {list(ids.shape)}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask.shape != ids.shape:
        raise QCompilerError(f"attention_mask {list(mask.shape)} does not match input ids {list(ids.shape)}")
    if (mask[:, -1] == 0).any():
        raise QCompilerError("pad the prompts on the left: the last position of every row must be a real token")
    return ids, mask


def choose(logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Next ids [batch] from last-position logits [batch, vocab]: argmax at ``temperature`` 0, else a draw
    from the softmax at ``temperature`` restricted to the smallest set of tokens holding ``top_p``."""
    if temperature <= 0:
        return logits.argmax(-1).astype(np.int64)
    rng = rng or np.random.default_rng(0)
    z = logits.astype(np.float64) / temperature
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")
    sp = np.take_along_axis(p, order, -1)
    if top_p < 1.0:
        keep = np.cumsum(sp, -1) - sp < top_p  # the first token is always kept
        sp = np.where(keep, sp, 0.0)
        sp /= sp.sum(-1, keepdims=True)
    u = rng.random(len(sp))[:, None]
    pick = np.minimum((np.cumsum(sp, -1) < u).sum(-1), sp.shape[-1] - 1)
    return order[np.arange(len(sp)), pick].astype(np.int64)


def _eos_ids(sess: ort.InferenceSession, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is not None:
        return [int(eos_token_id)] if isinstance(eos_token_id, (int, np.integer)) else [int(e) for e in eos_token_id]
    try:
        return [int(e) for e in json.loads(sess.get_modelmeta().custom_metadata_map.get(EOS_TOKEN_IDS, "[]"))]
    except (ValueError, TypeError):
        return []


class _Stepper:
    """Runs one step of a cache graph through I/O binding; the cache stays on the session's device."""

    def __init__(self, sess: ort.InferenceSession):
        self.sess = sess
        self.device = "cuda" if sess.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.outputs = [o.name for o in sess.get_outputs()]
        inputs = [i.name for i in sess.get_inputs()]
        self.past = [n for n in inputs if is_past(n)]
        presents = {present_to_past(o): o for o in self.outputs if is_present(o)}
        missing = [n for n in self.past if n not in presents]
        extra = [n for n in inputs if n not in ("input_ids", "attention_mask") and not is_past(n)]
        if not self.past or missing or extra or "logits" not in self.outputs:
            raise QCompilerError("the model is not a KV-cache decoder (inputs input_ids, attention_mask, "
                                 "past_key_values.N.key/value; outputs logits, present.N.key/value): "
                                 f"inputs {inputs}, outputs {self.outputs}. Export it with kv_cache=True")
        self.present_of = presents

    def run(self, ids: np.ndarray, mask: np.ndarray, past: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Last-position logits [batch, vocab] (on the host) and the new past (OrtValues) of one step."""
        io = self.sess.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        for name in self.past:
            value = past[name]
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, self.device, 0)
            io.bind_ortvalue_input(name, value)
        for name in self.outputs:  # the logits come to the host, the cache stays where it was computed
            io.bind_output(name, "cpu" if name == "logits" else self.device)
        self.sess.run_with_iobinding(io)
        values = dict(zip(self.outputs, io.get_outputs(), strict=True))
        logits = values["logits"].numpy()[:, -1]
        return logits, {name: values[self.present_of[name]] for name in self.past}


def generate(model: Any, prompt: Any, *, tokenizer: Any = None, attention_mask: Any = None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None, on_token: TokenCallback | None = None,
             options: SessionOptions | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` with a KV-cache graph.

    ``model``: an ``.onnx`` path, a ModelProto or an ``onnxruntime.InferenceSession`` (``options`` builds the
    session otherwise). ``prompt``: text or a list of texts (tokenized with ``tokenizer``, a folder or a
    tokenizer object; by default the folder the model records), or token ids ``[length]`` / ``[batch, length]``
    (with ``attention_mask`` when padded: on the left). ``eos_token_id``: the ids that end a row (None: the
    ones the model records; ``()``: never stop early). ``on_token`` gets each step's new ids, shape [batch].
    """
    if max_new_tokens < 1:
        raise QCompilerError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    sess = _session(model, options)
    stepper = _Stepper(sess)
    is_text = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str))
    if tokenizer is None and is_text:
        tokenizer = sess.get_modelmeta().custom_metadata_map.get(TOKENIZER)
    tok = load_tokenizer(tokenizer) if (is_text or tokenizer is not None) else None
    ids, mask = _encode(prompt, attention_mask, tok)
    eos = np.asarray(_eos_ids(sess, eos_token_id), dtype=np.int64)
    pad = int(eos[0]) if len(eos) else 0
    rng = np.random.default_rng(seed)
    batch = len(ids)

    t0 = time.perf_counter()
    logits, past = stepper.run(ids, mask, session_past_feeds(sess, batch))
    token = choose(logits, temperature, top_p, rng)
    prefill_s = time.perf_counter() - t0
    out, finished = [token], np.isin(token, eos)
    lengths = np.ones(batch, dtype=np.int64)
    if on_token is not None:
        on_token(token)
    steps, t1 = 0, time.perf_counter()
    while len(out) < max_new_tokens and not finished.all():
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        logits, past = stepper.run(token[:, None], mask, past)
        token = np.where(finished, pad, choose(logits, temperature, top_p, rng))
        steps += 1
        lengths += ~finished
        finished |= np.isin(token, eos)
        out.append(token)
        if on_token is not None:
            on_token(token)
    decode_s = time.perf_counter() - t1
    tokens = np.stack(out, axis=1)
    texts = None
    if tok is not None:
        texts = tuple(tok.decode(row[:n].tolist(), skip_special_tokens=True)
                      for row, n in zip(tokens, lengths, strict=True))
    return GenerationResult(tokens, tuple(int(n) for n in lengths), int(mask[:, :ids.shape[1]].sum()), prefill_s,
                            decode_s, steps, texts)


def text_streamer(tokenizer: Any, write: Callable[[str], Any]) -> TokenCallback:
    """An ``on_token`` callback for batch 1 that writes the text of each new token as it comes (the whole
    output is decoded each time and the new part written, so multi-token characters come out whole)."""
    tok = load_tokenizer(tokenizer)
    ids: list[int] = []
    shown = [0]

    def on_token(new: np.ndarray) -> None:
        ids.append(int(new[0]))
        text = tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its next byte
            return
        write(text[shown[0]:])
        shown[0] = len(text)

    return on_token
