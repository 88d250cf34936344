"""Task-level evaluation: embedding fidelity for encoders, perplexity on fixed windows for causal LMs."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm.auto import tqdm

from qcompiler.errors import QCompilerError
from qcompiler.kv_layout import is_past
from qcompiler.runtime.inputs import session_past_feeds
from qcompiler.runtime.session import SessionOptions, make_session

log = logging.getLogger(__name__)

_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")
# output names of a [batch, sequence, hidden] state (HF, sentence-transformers, optimum exports)
HIDDEN_NAMES = ("last_hidden_state", "token_embeddings", "hidden_state")
LOGITS_NAMES = ("logits",)


@dataclass(frozen=True)
class FidelityResult:
    mean_cosine: float  # mean-pooled, L2-normalised sentence embedding vs the reference's
    min_cosine: float
    spearman: float  # rank correlation of all pairwise similarities
    nn_agreement: float  # share of paragraphs whose nearest neighbour is the same
    paragraphs: int


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int
    windows: int
    # the most likely next token at every scored position ([windows, length - 1]), when asked for
    top1: np.ndarray | None = None


@functools.lru_cache(maxsize=4)  # windows, their prefix and the prompts read one tokenizer, loaded once
def _tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def session_feeds(sess, enc: dict) -> dict[str, np.ndarray]:
    """The token inputs ``sess`` takes, as int64; zero token types and 0..S-1 positions when not given; an
    empty past (length 0) for every ``past_key_values.*`` input of a KV-cache graph."""
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in names and not is_past(k)}
    if "token_type_ids" in names and "token_type_ids" not in feeds:
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    if "position_ids" in names and "position_ids" not in feeds:
        ids = feeds["input_ids"]
        feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
    # a KV-cache graph runs the whole sequence from an empty past
    batch = len(next(iter(feeds.values()))) if feeds else 1
    feeds.update({k: enc.get(k, v) for k, v in session_past_feeds(sess, batch).items()})
    return feeds


def _describe(o) -> str:
    shape = "?" if o.shape is None else "[" + ", ".join(str(d) for d in o.shape) + "]"
    return f"{o.name} {o.type[7:-1] if o.type.startswith('tensor(') else o.type} {shape}"


def pick_output(sess, prefer: Sequence[str] = HIDDEN_NAMES, what: str = "hidden-state", name: str = "the model") -> str:
    """The name of the float ``[batch, sequence, features]`` output of ``sess`` to read.

    A model we did not export may put other outputs first (e.g. the ``input_ids`` passed through, or a
    pooled ``[batch, hidden]`` vector). Preference: a float rank-3 output named like ``prefer``, then
    the first float rank-3 output, then a float output of unknown rank (named like ``prefer`` first).
    Raises ``QCompilerError`` naming the outputs when there is none.
    """
    outs = sess.get_outputs()
    floats = [o for o in outs if o.type in _FLOAT_TYPES]
    rank3 = [o for o in floats if o.shape is not None and len(o.shape) == 3]
    unknown = [o for o in floats if o.shape is None]

    def named(cands):
        return [o for p in prefer for o in cands if p in o.name.lower()]

    for cands in (named(rank3), rank3, named(unknown), unknown):
        if cands:
            chosen = cands[0].name
            if chosen != outs[0].name:
                log.info("%s: reading output %r (output 0 is %s)", name, chosen, _describe(outs[0]))
            return chosen
    raise QCompilerError(f"{name} has no float [batch, sequence, {'vocab' if what == 'logits' else 'hidden'}] "
                         f"output to read the {what} from (outputs: {'; '.join(_describe(o) for o in outs)})")


def _rank3(x: np.ndarray, output: str, what: str, name: str) -> np.ndarray:
    if x.ndim != 3 or not np.issubdtype(x.dtype, np.floating):
        raise QCompilerError(f"{name}'s output {output!r} is {x.dtype} of shape {list(x.shape)}, "
                             f"not the float [batch, sequence, features] {what} expected")
    return x


def sentence_embeddings(model: onnx.ModelProto | str, tokenizer_dir: str, texts: list[str],
                        max_length: int = 128, batch_size: int = 32, options: SessionOptions | None = None,
                        progress: bool = False, name: str = "the model") -> np.ndarray:
    """Mean pooling over the attention mask, then L2 normalisation (sentence-transformers' recipe)."""
    return pooled_embeddings(model, encode_texts(tokenizer_dir, texts, max_length, batch_size), options, progress,
                             name)


def encode_texts(tokenizer_dir: str, texts: list[str], max_length: int = 128,
                 batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """Tokenized batches (``input_ids``, ``attention_mask``, ...) of ``texts``, padded per batch."""
    tok = _tokenizer(tokenizer_dir)
    return [dict(tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                     return_tensors="np")) for i in range(0, len(texts), batch_size)]


def pooled_embeddings(model: onnx.ModelProto | str, batches: list[dict[str, np.ndarray]],
                      options: SessionOptions | None = None, progress: bool = False,
                      name: str = "the model") -> np.ndarray:
    """Mean-pooled, L2-normalised hidden states (``pick_output``) of an encoder over tokenized ``batches``."""
    sess = make_session(model, options)
    output = pick_output(sess, HIDDEN_NAMES, "hidden states", name)
    out = []
    for enc in tqdm(batches, desc="embed", disable=not progress, leave=False):
        feeds = session_feeds(sess, enc)
        hidden = _rank3(sess.run([output], feeds)[0], output, "hidden states", name).astype(np.float64)
        mask = np.asarray(enc.get("attention_mask", np.ones(hidden.shape[:2])))[..., None].astype(np.float64)
        if mask.shape[:2] != hidden.shape[:2]:
            raise QCompilerError(f"{name}'s output {output!r} has shape {list(hidden.shape)}, which does not "
                                 f"match the {list(mask.shape[:2])} tokens fed")
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
    return np.concatenate(out)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(len(x), dtype=np.float64)
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    return float(ra @ rb / math.sqrt((ra @ ra) * (rb @ rb)))


def fidelity(emb: np.ndarray, ref: np.ndarray) -> FidelityResult:
    cos = np.sum(emb * ref, axis=1)
    sim_e, sim_r = emb @ emb.T, ref @ ref.T
    iu = np.triu_indices(len(emb), k=1)
    np.fill_diagonal(sim_e, -np.inf)
    np.fill_diagonal(sim_r, -np.inf)
    nn = float(np.mean(sim_e.argmax(1) == sim_r.argmax(1)))
    rho = spearman(sim_e[iu], sim_r[iu]) if len(emb) > 2 else 1.0
    return FidelityResult(float(cos.mean()), float(cos.min()), rho, nn, len(emb))


def embedding_fidelity(model: onnx.ModelProto | str, reference: onnx.ModelProto | str, tokenizer_dir: str,
                       texts: list[str], max_length: int = 128, options: SessionOptions | None = None,
                       progress: bool = False) -> FidelityResult:
    ref = sentence_embeddings(reference, tokenizer_dir, texts, max_length, options=options, progress=progress,
                              name="the reference")
    emb = sentence_embeddings(model, tokenizer_dir, texts, max_length, options=options, progress=progress)
    return fidelity(emb, ref)


def window_prefix(tokenizer_dir: str) -> list[int]:
    """The special tokens the model's tokenizer puts before a text (BOS for Llama, Gemma; none for GPT-2 or
    SmolLM2's tokenizer), found by tokenizing one word with and without special tokens."""
    return _prefix(_tokenizer(tokenizer_dir))


def _prefix(tok) -> list[int]:
    plain = tok("hello", add_special_tokens=False)["input_ids"]
    full = tok("hello", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


def token_windows(tokenizer_dir: str, text: str, windows: int = 8, length: int = 512,
                  bos: bool = True) -> np.ndarray:
    """``windows`` consecutive, non-overlapping windows of ``length`` tokens from the text's start, each
    begun as the model's tokenizer begins a text (``window_prefix``: BOS where it adds one; ``bos=False``:
    text tokens only). Perplexity scores every token after the first, so a BOS-led window scores all of
    its text tokens, as common evaluation harnesses do."""
    tok = _tokenizer(tokenizer_dir)
    prefix = _prefix(tok) if bos else []
    body = length - len(prefix)
    if body < 2:
        raise ValueError(f"windows of {length} tokens leave no room for text after {len(prefix)} prefix tokens")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    need = windows * body
    if len(ids) < need:
        raise ValueError(f"text has {len(ids)} tokens, {need} needed for {windows} x {body}")
    rows = np.asarray(ids[:need], dtype=np.int64).reshape(windows, body)
    return np.concatenate([np.tile(np.asarray(prefix, dtype=np.int64), (windows, 1)), rows], axis=1)


def perplexity(model: onnx.ModelProto | str, windows: np.ndarray, options: SessionOptions | None = None,
               progress: bool = False, name: str = "the model", top1: bool = False) -> PerplexityResult:
    """``top1``: also keep the argmax token of every scored position (teacher-forced agreement between models)."""
    sess = make_session(model, options)
    output = pick_output(sess, LOGITS_NAMES, "logits", name)
    total, count, best = 0.0, 0, []
    for w in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
        ids = w[None, :]
        feeds = session_feeds(sess, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        logits = _rank3(sess.run([output], feeds)[0], output, "logits", name)[0, :-1].astype(np.float64)
        target = ids[0, 1:]
        m = logits.max(-1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
        total += float(np.sum(logz - logits[np.arange(len(target)), target]))
        count += len(target)
        if top1:
            best.append(logits.argmax(-1))
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, len(windows), np.stack(best) if top1 else None)
