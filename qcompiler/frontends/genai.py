"""A model that onnxruntime-genai's model builder wrote (``python -m onnxruntime_genai.models.builder``): what
our runtime needs to know about it, read from its ``genai_config.json`` (else from its graph).

The builder's folder holds ``model.onnx`` (+ ``model.onnx.data``), ``genai_config.json`` and the tokenizer
files. Its graph takes ``input_ids``, ``attention_mask`` and ``past_key_values.N.key/value`` (the head size
axis named, not fixed) and gives ``logits`` and ``present.N.key/value``, the names our KV-cache graphs use
(``qcompiler.kv_layout``); attention is ``com.microsoft.GroupQueryAttention``. We record, as we do for our own
exports, the cache layout (so empty pasts can be built), the end-of-sequence ids and the tokenizer folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx

from qcompiler.errors import ModelLoadError
from qcompiler.kv_layout import CacheLayout, is_past, layout_from_graph
from qcompiler.metadata import EOS_TOKEN_IDS, KV_CACHE, MODEL_KIND, TOKENIZER

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
# tokenizer files onnxruntime-genai reads (and the Hugging Face tokenizer reads) from a model folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
ATTENTION_OPS = ("GroupQueryAttention",)


def read_genai_config(folder: str | Path) -> dict | None:
    """The folder's ``genai_config.json``, or None (absent or unreadable)."""
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("cannot read %s: %s", path, e)
        return None


def decoder_file(folder: str | Path) -> Path | None:
    """The decoder ``.onnx`` of an onnxruntime-genai folder (named by its ``genai_config.json``), or None where
    ``folder`` is not one; an error where the config names a file that is not there."""
    folder = Path(folder)
    if not (folder / GENAI_CONFIG).is_file():
        return None
    config = read_genai_config(folder) or {}
    name = config.get("model", {}).get("decoder", {}).get("filename", "model.onnx")
    if not (folder / name).is_file():
        raise ModelLoadError(f"onnxruntime-genai folder without its decoder file {name}: {folder}")
    return folder / name


def has_tokenizer(folder: str | Path) -> bool:
    return (Path(folder) / "tokenizer.json").is_file() or (Path(folder) / "tokenizer.model").is_file()


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _layout_from_config(config: dict) -> CacheLayout | None:
    d = config.get("model", {}).get("decoder", {})
    try:
        return CacheLayout(int(d["num_hidden_layers"]), int(d["num_key_value_heads"]), int(d["head_size"]))
    except (KeyError, TypeError, ValueError):
        return None


def builder_properties(model: onnx.ModelProto, path: str | Path) -> dict[str, str]:
    """Metadata for a graph with GroupQueryAttention and a KV cache (as onnxruntime-genai's builder writes
    them), read from the ``genai_config.json`` beside ``path`` (else from the graph): the cache layout, the
    end-of-sequence ids and the tokenizer folder. Empty for any other graph."""
    if not any(n.op_type in ATTENTION_OPS for n in model.graph.node) or \
            not any(is_past(i.name) for i in model.graph.input):
        return {}
    folder = Path(path).resolve().parent
    config = read_genai_config(folder)
    layout = (_layout_from_config(config) if config else None) or layout_from_graph(model)
    props = {MODEL_KIND: "causal_lm"}
    if layout is not None:
        props[KV_CACHE] = layout.to_json()
    if config:
        props[EOS_TOKEN_IDS] = json.dumps(_ids(config.get("model", {}).get("eos_token_id")))
    if has_tokenizer(folder):
        props[TOKENIZER] = str(folder)
    return props
