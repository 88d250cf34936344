"""The KV cache's layout and names, shared by the frontend that exports a cache graph and the runtime that
feeds one (no torch here). The contract is described in ``qcompiler.frontends.kv_cache``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import onnx

from qcompiler.metadata import KV_CACHE

PAST_NAME = "past_key_values.{layer}.{kind}"
PRESENT_NAME = "present.{layer}.{kind}"
KINDS = ("key", "value")
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
POSITIONS = "cumsum(attention_mask) - 1"  # how the graph derives positions (recorded in the metadata)


@dataclass(frozen=True)
class CacheLayout:
    """Shape of one model's cache: ``layers`` pairs of [batch, kv_heads, length, head_dim] tensors."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"

    def past_names(self) -> list[str]:
        return [PAST_NAME.format(layer=i, kind=k) for i in range(self.layers) for k in KINDS]

    def present_names(self) -> list[str]:
        return [PRESENT_NAME.format(layer=i, kind=k) for i in range(self.layers) for k in KINDS]

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "past": PAST_NAME, "present": PRESENT_NAME, "positions": POSITIONS})

    @classmethod
    def from_json(cls, text: str) -> CacheLayout:
        d = json.loads(text)
        return cls(int(d["layers"]), int(d["kv_heads"]), int(d["head_dim"]), str(d.get("dtype", "float32")))

    @classmethod
    def from_config(cls, config) -> CacheLayout:
        """From a transformers config (GPT-2's ``n_layer``/``n_head`` names are mapped by the config itself)."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        return cls(int(text.num_hidden_layers), kv_heads, head_dim)

    def to_properties(self) -> dict[str, str]:
        return {KV_CACHE: self.to_json()}

    @classmethod
    def from_properties(cls, props: dict[str, str]) -> CacheLayout | None:
        """The layout a model's metadata records, or None (no cache, or an unreadable record)."""
        text = props.get(KV_CACHE)
        if not text:
            return None
        try:
            return cls.from_json(text)
        except (ValueError, KeyError, TypeError):
            return None


def layout_from_graph(model: onnx.ModelProto) -> CacheLayout | None:
    """The layout of a graph whose attention is ``com.microsoft.GroupQueryAttention`` (onnxruntime-genai's
    builder writes the head size axis of its cache as a name): layers from the ``past_key_values.N.*`` inputs,
    KV heads from ``kv_num_heads``, the head size from the width of the projection that reads the attention's
    output (``num_heads`` heads). None for another graph. ``model``: an ``onnx.ModelProto`` (weights not read)."""
    layers = len({i.name.split(".")[1] for i in model.graph.input if is_past(i.name)})
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if not layers or not gqa:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    heads = int(attrs.get("num_heads", 0))
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[0] == gqa[0].output[0] and len(dims.get(node.input[1], [])) == 2:
            width = dims[node.input[1]][0]
            if heads and width % heads == 0:
                return CacheLayout(layers, int(attrs.get("kv_num_heads", heads)), width // heads)
    return None


def is_past(name: str) -> bool:
    return name.startswith(PAST_PREFIX)


def is_present(name: str) -> bool:
    return name.startswith(PRESENT_PREFIX)


def present_to_past(name: str) -> str:
    """``present.3.key`` -> ``past_key_values.3.key``."""
    return PAST_PREFIX + name[len(PRESENT_PREFIX):]
