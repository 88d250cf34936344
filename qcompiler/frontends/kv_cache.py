"""Causal LMs exported with a KV cache: the graph's contract, the wrapper torch.export traces, and the check
of an export against torch over a prefill and decode steps.

The graph, for every family (``N`` = 0 .. layers - 1)::

    inputs   input_ids                    int64    [batch, sequence]
             attention_mask               int64    [batch, past_sequence + sequence]   1 = a real token
             past_key_values.N.key/value  float32  [batch, kv_heads, past_sequence, head_dim]
    outputs  logits                       float32  [batch, sequence, vocab]
             present.N.key/value          float32  [batch, kv_heads, past_sequence + sequence, head_dim]

A prefill feeds an empty past (``past_sequence`` = 0); each step then feeds ``present`` back as ``past`` and
the mask grows by the new tokens. Positions are not an input: the graph computes them from the mask as
``cumsum(mask) - 1`` (what Hugging Face's ``generate`` feeds), so batches are padded on the *left* and a
padded row's first real token is at position 0 in every step. Sliding-window layers (Gemma 2) keep the whole
past; the mask applies their window, so ``present`` always grows by ``sequence``. The layout is recorded in
the model's metadata (``KV_CACHE``) so a generator can build empty past tensors without reading the graph.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import onnx
import torch

from qcompiler.errors import ModelLoadError
from qcompiler.frontends.export import WRAPPER_ATTR, export_wrapper
from qcompiler.kv_layout import CacheLayout

__all__ = ["CacheLayout", "CacheWrapper", "check_cache_export", "export_cache_program", "eos_token_ids"]


class CacheWrapper(torch.nn.Module):
    """``forward(input_ids, attention_mask, *past)`` -> ``(logits, *present)`` over flat tensors: the past is
    put in a ``DynamicCache``, the model runs with ``use_cache=True``, the grown cache comes back flat."""

    def __init__(self, inner: torch.nn.Module, layers: int):
        super().__init__()
        setattr(self, WRAPPER_ATTR, inner)
        self.layers = layers
        params = inspect.signature(inner.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
        self._positions = "position_ids" in params

    def forward(self, *args):
        from transformers import DynamicCache

        input_ids, attention_mask, past = args[0], args[1], args[2:]
        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs = {self._cache_arg: cache}
        if self._positions:
            seq = input_ids.shape[1]
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        out = getattr(self, WRAPPER_ATTR)(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                                          **kwargs)
        flat = []
        for layer in cache.layers[: self.layers]:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def cache_inputs(layout: CacheLayout, vocab: int, batch: int, seq: int, past: int, seed: int) -> dict:
    """Example inputs: random token ids, a full mask over past + new tokens, random past tensors (each its own
    tensor: aliased example inputs break the export)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(5, max(6, min(vocab, 1000)), (batch, seq), generator=g),
              "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64)}
    for name in layout.past_names():
        inputs[name] = torch.randn(batch, layout.kv_heads, past, layout.head_dim, generator=g)
    return inputs


def dynamic_shapes(layout: CacheLayout) -> list[dict]:
    dim = torch.export.Dim
    batch, seq, past, total = dim("batch"), dim("sequence"), dim("past_sequence"), dim("total_sequence")
    return [{0: batch, 1: seq}, {0: batch, 1: total}] + [{0: batch, 2: past} for _ in range(2 * layout.layers)]


def export_cache_program(module: torch.nn.Module, vocab: int, optimize: bool = True):
    """``(torch.onnx.ONNXProgram, CacheLayout, wrapper)`` of a causal LM with a KV cache (the contract above)."""
    layout = CacheLayout.from_config(module.config)
    wrapper = CacheWrapper(module.eval(), layout.layers).eval()
    # sizes unlike each other (torch.export would otherwise tie equal dims together)
    inputs = cache_inputs(layout, vocab, batch=2, seq=7, past=5, seed=0)
    program = export_wrapper(wrapper, inputs, ["logits", *layout.present_names()], dynamic_shapes(layout),
                             optimize)
    check_layout(program.model.graph, layout)
    return program, layout, wrapper


def check_layout(graph, layout: CacheLayout) -> None:
    """ModelLoadError when the exported graph's (an ``onnx_ir`` graph: its weights may be fake) inputs and
    outputs are not the contract's."""
    inputs = [v.name for v in graph.inputs]
    outputs = {v.name: v for v in graph.outputs}
    if inputs != ["input_ids", "attention_mask", *layout.past_names()] or \
            list(outputs) != ["logits", *layout.present_names()]:
        raise ModelLoadError(f"the cache export has inputs {inputs} and outputs {list(outputs)}, not the expected "
                             f"{layout.layers}-layer cache")
    for name in layout.present_names():
        shape = outputs[name].shape
        fixed = [d if isinstance(d, int) else None for d in shape] if shape is not None else []
        if len(fixed) != 4 or fixed[1] not in (None, layout.kv_heads) or fixed[3] not in (None, layout.head_dim):
            raise ModelLoadError(f"{name} has shape {fixed}, the config says [batch, {layout.kv_heads}, length, "
                                 f"{layout.head_dim}]")


def eos_token_ids(folder: Path, config: dict) -> list[int]:
    """The ids that end a generation: the folder's ``generation_config.json``, else its ``config.json``."""
    value = None
    gen = folder / "generation_config.json"
    if gen.is_file():
        try:
            value = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            value = None
    if value is None:
        value = config.get("eos_token_id")
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_cache_export(model: onnx.ModelProto, wrapper: CacheWrapper, layout: CacheLayout, vocab: int,
                       decode_steps: int = 3, seed: int = 1) -> float:
    """ONNX Runtime against torch on a left-padded batch: a prefill of 3 rows of 11 tokens (4 and 7 of them
    padding in two rows) from an empty past, then ``decode_steps`` steps of one token (torch's greedy choice,
    fed to both), each side feeding its own ``present`` back as ``past``. Returns the largest relative error
    over the steps, of the logits at real positions and of every ``present`` at real positions (padding's
    entries are never read)."""
    from qcompiler.runtime.session import SessionOptions, make_session

    sess = make_session(model, SessionOptions(device="cpu", optimize=False))
    g = torch.Generator().manual_seed(seed)
    batch, seq = 3, 11
    ids = torch.randint(5, max(6, min(vocab, 1000)), (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ref_past = [torch.zeros(batch, layout.kv_heads, 0, layout.head_dim) for _ in layout.past_names()]
    got_past = [p.numpy() for p in ref_past]
    worst = 0.0
    for _ in range(decode_steps + 1):
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(ids, mask, *ref_past)]
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                 **dict(zip(layout.past_names(), got_past, strict=True))}
        got = sess.run(None, feeds)
        real = mask.numpy().astype(bool)
        new = real[:, -ids.shape[1]:]
        errors = [_rel(got[0][new], ref[0][new])]
        errors += [_rel(a.transpose(0, 2, 1, 3)[real], b.transpose(0, 2, 1, 3)[real])
                   for a, b in zip(got[1:], ref[1:], strict=True)]
        worst = max(worst, *(e if np.isfinite(e) else float("inf") for e in errors))
        ids = torch.from_numpy(ref[0][:, -1].argmax(-1))[:, None]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], 1)
        ref_past = [torch.from_numpy(t) for t in ref[1:]]
        got_past = got[1:]
    return worst
