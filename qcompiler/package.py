"""Package a compiled causal LM as a folder that onnxruntime-genai's generator loads as it is.

The folder holds ``model.onnx`` (and its external data files, if any), ``genai_config.json`` and the
tokenizer files (``onnxruntime_genai.Model(folder)``, ``onnxruntime_genai.Tokenizer(model)``).

- A model compiled from a folder of onnxruntime-genai's model builder keeps the builder's graph interface
  (GroupQueryAttention with its shared past/present buffer): its ``genai_config.json`` and tokenizer files
  are copied, with the decoder's file name set to ours.
- A Hugging Face causal LM compiled by us (a KV-cache graph, ``qcompiler.frontends.kv_cache``) gets a
  ``genai_config.json`` that describes our graph: inputs ``input_ids``, ``attention_mask`` and
  ``past_key_values.%d.key/value``, outputs ``logits`` and ``present.%d.key/value`` (the builder's names),
  the cache's layout from the model's metadata, the rest from the checkpoint's ``config.json``. Our cache grows
  by concatenation, so ``past_present_share_buffer`` is false (the generator feeds the past at its length). The
  model type is genai's generic ``decoder`` for every family: the graph computes positions (from the mask) and
  everything family-specific itself, and genai's own ``gpt2`` type expects other inputs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import onnx

from qcompiler.errors import ConfigError
from qcompiler.frontends.base import LoadedModel
from qcompiler.frontends.genai import GENAI_CONFIG, TOKENIZER_FILES, has_tokenizer, read_genai_config
from qcompiler.graphio import write_text_atomic
from qcompiler.kv_layout import PAST_PREFIX, PRESENT_PREFIX, CacheLayout, is_past, layout_from_graph
from qcompiler.metadata import EOS_TOKEN_IDS, model_properties

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
# the generator's search defaults (the builder's), greedy
_SEARCH = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
           "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
           "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


def write_genai_folder(model_path: str | os.PathLike, loaded: LoadedModel, out_dir: str | os.PathLike) -> Path:
    """Make ``out_dir`` a folder onnxruntime-genai loads: the compiled model at ``model_path`` (copied there
    as ``model.onnx`` with its external data files unless it is that file already), ``genai_config.json`` and
    the tokenizer files. ``loaded``: the model as the frontend gave it (where its config and tokenizer are).
    Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(model_path), load_external_data=False)
    target = out / MODEL_FILE
    if Path(model_path).resolve() != target.resolve():
        _copy_model(Path(model_path), model, target)
    builder_dir = _builder_folder(loaded)
    if builder_dir is not None:
        config = read_genai_config(builder_dir)
        config["model"]["decoder"]["filename"] = MODEL_FILE
        tokenizer_dir = builder_dir
    else:
        config = genai_config(model, loaded)
        tokenizer_dir = Path(loaded.tokenizer_dir) if loaded.tokenizer_dir else None
    check_interface(config, model)
    write_text_atomic(out / GENAI_CONFIG, json.dumps(config, indent=4) + "\n")
    if tokenizer_dir is None or not has_tokenizer(tokenizer_dir):
        log.warning("no tokenizer files for %s: onnxruntime-genai's Tokenizer will not load from %s",
                    loaded.source, out)
    else:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file() and tokenizer_dir.resolve() != out.resolve():
                shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def check_genai_source(loaded: LoadedModel) -> None:
    """Raise ConfigError, before any work is done, when ``write_genai_folder`` could not package ``loaded``: a
    model that is neither a builder model nor a KV-cache decoder with its Hugging Face config.json."""
    if _builder_folder(loaded) is not None:
        return
    model = loaded.model
    if (CacheLayout.from_properties(model_properties(model)) or layout_from_graph(model)) is None or \
            not any(is_past(i.name) for i in model.graph.input):
        raise ConfigError(f"{loaded.source} is not a KV-cache decoder (a causal LM exported with its cache): "
                          "onnxruntime-genai cannot run it (drop --no-kv-cache)")
    _hf_config(loaded)


def _builder_folder(loaded: LoadedModel) -> Path | None:
    """The folder of an onnxruntime-genai builder model we compiled (its ``genai_config.json`` beside it)."""
    if not loaded.onnx_path or not str(loaded.source).endswith(".onnx"):
        return None
    folder = Path(loaded.onnx_path).resolve().parent
    return folder if read_genai_config(folder) is not None else None


def _copy_model(source: Path, model: onnx.ModelProto, target: Path) -> None:
    """The model file and the external data files it names (their names kept: they are relative paths)."""
    shutil.copyfile(source, target)
    files = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    for name in sorted(files):
        shutil.copyfile(source.parent / name, target.parent / name)


def _hf_config(loaded: LoadedModel) -> dict:
    folder = Path(loaded.tokenizer_dir) if loaded.tokenizer_dir else None
    path = folder / "config.json" if folder else None
    if path is None or not path.is_file():
        raise ConfigError(f"a genai folder for {loaded.source} needs its Hugging Face config.json (the model "
                          "records no checkpoint folder)")
    config = json.loads(path.read_text())
    return config.get("text_config", config) if "num_attention_heads" not in config else config


def _one(ids: list[int]) -> int | list[int] | None:
    return None if not ids else ids[0] if len(ids) == 1 else ids


def genai_config(model: onnx.ModelProto, loaded: LoadedModel) -> dict:
    """``genai_config.json`` for a KV-cache graph of ours (``model``: the compiled model, weights not read)."""
    props = model_properties(model)
    layout = CacheLayout.from_properties(props) or layout_from_graph(model)
    if layout is None or not any(is_past(i.name) for i in model.graph.input):
        raise ConfigError(f"{loaded.source} is not a KV-cache decoder (a causal LM exported with its cache): "
                          "onnxruntime-genai cannot run it (drop --no-kv-cache)")
    hf = _hf_config(loaded)
    heads = int(hf.get("num_attention_heads") or hf.get("n_head"))
    hidden = int(hf.get("hidden_size") or hf.get("n_embd"))
    try:
        eos = [int(e) for e in json.loads(props.get(EOS_TOKEN_IDS, "[]"))]
    except (ValueError, TypeError):
        eos = []
    eos = eos or [int(e) for e in _as_list(hf.get("eos_token_id"))]
    pad = hf.get("pad_token_id")
    pad = int(_as_list(pad)[0]) if pad is not None else (eos[0] if eos else 0)
    context = int(hf.get("max_position_embeddings") or hf.get("n_positions") or 2048)
    logits = next(o for o in model.graph.output if o.name == "logits")
    vocab_dim = logits.type.tensor_type.shape.dim[-1]
    vocab = int(vocab_dim.dim_value) if vocab_dim.dim_value else int(hf.get("vocab_size", 0))
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": MODEL_FILE,
        "head_size": layout.head_dim,
        "hidden_size": hidden,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": PAST_PREFIX + "%d.key", "past_value_names": PAST_PREFIX + "%d.value"},
        "outputs": {"logits": "logits", "present_key_names": PRESENT_PREFIX + "%d.key",
                    "present_value_names": PRESENT_PREFIX + "%d.value"},
        "num_attention_heads": heads,
        "num_hidden_layers": layout.layers,
        "num_key_value_heads": layout.kv_heads,
    }
    body = {"bos_token_id": hf.get("bos_token_id"), "context_length": context, "decoder": decoder,
            "eos_token_id": _one(eos), "pad_token_id": pad, "type": "decoder",
            "vocab_size": vocab}
    body = {k: v for k, v in body.items() if v is not None}
    return {"model": body, "search": {**_SEARCH, "max_length": context, "past_present_share_buffer": False}}


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def check_interface(config: dict, model: onnx.ModelProto) -> None:
    """Raise ConfigError when ``config``'s decoder names an input or output the graph lacks."""
    d = config["model"]["decoder"]
    layers = int(d["num_hidden_layers"])
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}

    def expand(names: dict) -> list[str]:
        return [n % i if "%d" in n else n for n in names.values() for i in (range(layers) if "%d" in n else [0])]

    missing = [n for n in expand(d["inputs"]) if n not in inputs]
    missing += [n for n in expand(d["outputs"]) if n not in outputs]
    if missing:
        raise ConfigError(f"genai_config.json names {', '.join(missing[:4])}, which the compiled graph lacks")
