"""Activations without data: the attention sink's state (a one-token forward of the BOS token through the
float model), and the mean square per channel of tensors on uniformly random token ids (``noise_power``).

A decoder's first position is the sink every later token's attention reads, and from the third layer on its
state hardly depends on which token it holds (SmolLM2: cosine 0.88-1.00 against real windows' first
positions; docs/methods.md, "Where joint rounding hurts a decoder, layer by layer"). The tensors asked for
(the inputs of a pair's factors) are read from one run of the model on ``[[bos]]`` with an empty cache; a
streamed model runs one stretch at a time (``Stretcher``), so only one stretch's weights are in memory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from qcompiler.errors import QCompilerError
from qcompiler.runtime.inputs import sample_inputs, vocab_size
from qcompiler.runtime.segments import value_types
from qcompiler.runtime.session import SessionOptions
from qcompiler.runtime.stream_validate import Stretcher, cut_states, data_sources
from qcompiler.runtime.text_inputs import token_input

log = logging.getLogger(__name__)


def bos_token_id(folder: str | os.PathLike | None) -> int | None:
    """The BOS token a model folder records (``config.json``, else ``genai_config.json``), or None."""
    if folder is None:
        return None
    for name, path in (("config.json", ("bos_token_id",)), ("genai_config.json", ("model", "bos_token_id"))):
        f = Path(folder) / name
        if not f.is_file():
            continue
        value = json.loads(f.read_text())
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, list):  # some configs list several
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def one_token_feeds(model: onnx.ModelProto, token: int) -> dict[str, np.ndarray]:
    """Feeds of a one-token sequence holding ``token`` at position 0 (an empty cache, a mask of ones)."""
    name = token_input(model)
    if name is None:
        raise QCompilerError("the model has no token-id input to run the BOS token through")
    feeds = sample_inputs(model, batch=1, seq=1)
    feeds[name] = np.full_like(feeds[name], token)
    return feeds


def sink_states(model: onnx.ModelProto, tensors: Sequence[str], token: int, data_dir: str | os.PathLike | None = None,
                options: SessionOptions | None = None) -> dict[str, np.ndarray]:
    """``tensors`` of the one-token forward of ``token``, each as a row vector ``[K]`` (float64). The run is
    cut before each node reading one of them, so a stretch holds about a layer's weights (``data_dir``: where
    a streamed model's external data is)."""
    return _states(model, tensors, one_token_feeds(model, token), data_dir, options, "sink state",
                   lambda x: x.reshape(-1, x.shape[-1])[0])


def noise_feeds(model: onnx.ModelProto, sequences: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds of ``sequences`` x ``length`` uniformly random token ids over the whole vocabulary (an empty cache,
    masks of ones)."""
    name = token_input(model)
    vocab = vocab_size(model, name) if name else None
    if name is None or vocab is None:
        raise QCompilerError("the model has no token-id input with an embedding table to draw random tokens for")
    feeds = sample_inputs(model, batch=sequences, seq=length, seed=seed)
    feeds[name] = np.random.default_rng(seed).integers(0, vocab, size=feeds[name].shape).astype(feeds[name].dtype)
    for k, v in feeds.items():
        if "mask" in k.lower():
            feeds[k] = np.ones_like(v)
    return feeds


def noise_power(model: onnx.ModelProto, tensors: Sequence[str], data_dir: str | os.PathLike | None = None,
                options: SessionOptions | None = None, sequences: int = 4, length: int = 256,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Each of ``tensors``' mean square per channel (``[K]``, float64) in a forward of uniformly random token
    ids (``noise_feeds``): statistics of the model alone, no text. Each tensor is ``[sequences, length, K]`` (a
    weight's input); position 0 (the attention sink, whose state hardly depends on its token) is left out. Run as
    ``sink_states`` is, a stretch at a time."""
    def power(x: np.ndarray) -> np.ndarray:
        x = x.reshape(sequences, -1, x.shape[-1])[:, 1:]
        return (x ** 2).mean(axis=(0, 1))

    return _states(model, tensors, noise_feeds(model, sequences, length, seed), data_dir, options, "noise power",
                   power)


def _states(model: onnx.ModelProto, tensors: Sequence[str], feeds: dict[str, np.ndarray],
            data_dir: str | os.PathLike | None, options: SessionOptions | None, what: str, reduce) -> dict:
    """``reduce`` of each of ``tensors`` (float64) in a forward of ``feeds``. The run is cut before each node
    reading one of them, so a stretch holds about a layer's weights (``data_dir``: where a streamed model's
    external data is)."""
    options = options or SessionOptions(device="cpu")
    want = set(tensors)
    cuts = [n.name for n in model.graph.node if want & set(n.input)]
    stretcher = Stretcher(model, data_sources(model, data_dir), options, value_types(model))
    state = feeds
    out: dict[str, np.ndarray] = {}
    for targets in cut_states(model, cuts)[:-1]:  # the last holds the outputs: not needed
        state = stretcher.run(state, targets)
        for t in want & set(targets):
            out[t] = reduce(np.asarray(state[t], dtype=np.float64))
    missing = want - set(out)
    if missing:
        raise QCompilerError(f"{what}: tensor {sorted(missing)[0]!r} is not computed by the model")
    return out
