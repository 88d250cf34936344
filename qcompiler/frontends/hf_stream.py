"""A Hugging Face checkpoint too large for memory -> ONNX with external data, without loading its weights.

The model is built with fake parameters (buffers, such as rotary frequencies, are
real: they are computed, not stored) and exported unoptimized, so every parameter is an initializer
without data. Each one is then copied from the checkpoint's safetensors files (one file or shards) into
the export's data file, in pieces of at most 64 MB, as fp32; a parameter whose only use is a 2-D ``Transpose``
(a Linear's weight) is written transposed and the ``Transpose`` dropped, which is the fold the
exporter's optimizer makes in memory. The optimizer then runs on the graph with those tensors left in
the file (it folds only small constants), so the graph is the in-memory export's. The result goes
through the streaming compile like any ``.onnx`` with external data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from qcompiler.errors import ModelLoadError
from qcompiler.frontends.base import LoadedModel
from qcompiler.frontends.cache import ExportCache
from qcompiler.frontends.hf import cache_key, example_inputs, model_kind, read_config, select, uses_kv_cache
from qcompiler.frontends.safetensors_index import StoredTensor, checkpoint_tensors, read_fp32_pieces
from qcompiler.metadata import EOS_TOKEN_IDS, KV_CACHE, MODEL_KIND, SCOPE_PREFIX, TOKENIZER

log = logging.getLogger(__name__)

DATA_NAME = "model.onnx.data"
ALIGN = 4096


@contextlib.contextmanager
def fake_parameters(mode) -> Iterator[None]:
    """Modules built inside get fake parameters of ``mode`` (a FakeTensorMode): shape, type and device
    (cpu, so the export traces the CPU kernels' layouts) but no data; each is real only while its module's
    constructor runs. Buffers stay real: they are computed (rotary frequencies, position ids), not stored."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    register = torch.nn.Module.register_parameter

    def to_fake(module, name, param):
        register(module, name, param)
        if param is not None and not isinstance(param.data, FakeTensor):  # a tied one is already fake
            p = module._parameters[name]
            module._parameters[name] = type(p)(mode.from_tensor(p.data), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = to_fake
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _build_fake_model(folder: Path, kind: str):
    import torch
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode

    cls = transformers.AutoModelForCausalLM if kind == "causal_lm" else transformers.AutoModel
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        with fake_parameters(FakeTensorMode(allow_non_fake_inputs=True)):
            model = cls.from_config(config, dtype=torch.float32)
        model.tie_weights()
    except Exception as e:
        raise ModelLoadError(f"cannot build the model of {folder}: {type(e).__name__}: {e}") from None
    return model.eval()


def _checkpoint_key(module_name: str, aliases: list[str], stored: dict[str, StoredTensor],
                    prefix: str) -> StoredTensor | None:
    """The checkpoint tensor of a parameter (any of its tied names, with or without the base model's prefix)."""
    for name in [module_name, *aliases]:
        keys = [name]
        if prefix:
            keys.append(name[len(prefix) + 1:] if name.startswith(prefix + ".") else f"{prefix}.{name}")
        for key in keys:
            if key in stored:
                return stored[key]
    return None


def _parameter_sources(module, stored: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """Module parameter name -> its checkpoint tensor, for every parameter; ModelLoadError names one missing."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    prefix = getattr(module, "base_model_prefix", "") or ""
    out: dict[str, StoredTensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        t = _checkpoint_key(name, by_id[id(p)], stored, prefix)
        if t is None:
            raise ModelLoadError(f"the checkpoint has no tensor for parameter {name!r}")
        if t.shape != tuple(p.shape):
            raise ModelLoadError(f"checkpoint tensor {t.name!r} has shape {list(t.shape)}, the model's "
                                 f"{name!r} {list(p.shape)}")
        out[name] = t
    return out


def _lone_transpose(value):
    """The node of a lone 2-D ``Transpose`` (perm 1,0) that is ``value``'s only use, else None."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output() or value.shape is None or len(value.shape) != 2:
        return None
    node = uses[0].node
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    return node if tuple(node.attributes.get_ints("perm", (1, 0))) == (1, 0) else None


def _write_weights(graph, sources: dict[str, StoredTensor], scope: str, staging: Path) -> tuple[int, int]:
    """Copy every fake initializer's tensor from the checkpoint into ``staging / DATA_NAME``, a piece at a
    time, and point the initializer at it; a lone 2-D Transpose is folded into the copy (the tensor is
    written transposed and the Transpose's output becomes the initializer). Returns (tensors, bytes)."""
    import onnx_ir as ir
    from torch._subclasses.fake_tensor import FakeTensor

    fake = [(name, value) for name, value in graph.initializers.items()
            if isinstance(getattr(value.const_value, "raw", None), FakeTensor)]
    sourced = []
    for name, value in fake:
        stored = sources.get(name[len(scope):] if name.startswith(scope) else name)
        if stored is None:
            raise ModelLoadError(f"initializer {name!r} is not a parameter of the model")
        sourced.append((name, value, stored))
    written = 0
    with open(staging / DATA_NAME, "wb") as out, tqdm(total=sum(4 * t.numel for *_, t in sourced), unit="B",
                                                       unit_scale=True, desc="weights",
                                                       disable=not log.isEnabledFor(logging.INFO)) as bar:
        for name, value, stored in sourced:
            node = _lone_transpose(value)
            shape = tuple(reversed(stored.shape)) if node else stored.shape
            out.write(b"\0" * ((-out.tell()) % ALIGN))
            offset = out.tell()
            for piece in read_fp32_pieces(stored, transpose=node is not None):
                out.write(memoryview(piece).cast("B"))  # no bytes copy
                bar.update(piece.nbytes)
                del piece
            length = out.tell() - offset
            written += length
            target = node.outputs[0] if node else value
            tensor = ir.ExternalTensor(DATA_NAME, offset, length, ir.DataType.FLOAT, shape=ir.Shape(shape),
                                       name=target.name, base_dir=staging)
            if node is None:
                value.const_value = tensor
                continue
            new = ir.Value(name=target.name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT),
                           const_value=tensor)
            ir.convenience.replace_all_uses_with(target, new)
            graph.remove(node, safe=True)
            graph.initializers.pop(name)
            graph.register_initializer(new)
    return len(sourced), written


def load_hf_streamed(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                     name: str | None = None, stored: dict[str, StoredTensor] | None = None,
                     kv_cache: bool = True) -> LoadedModel:
    """Export ``folder`` (safetensors weights; ``stored``: its ``checkpoint_tensors`` when already read) to an
    ONNX file whose weights are external, without holding them in memory; cached by the files' names, sizes
    and times. A causal LM gets a KV cache (``frontends.kv_cache``) unless ``kv_cache`` is false. The result
    streams (``data_dir`` set)."""
    import onnx
    import torch

    from qcompiler.frontends.export import WRAPPER_ATTR, export_program
    from qcompiler.frontends.onnx_file import load_onnx_model
    from qcompiler.metadata import set_model_properties

    folder = Path(folder).resolve()
    config = read_config(folder)
    kind = model_kind(config)
    with_cache = uses_kv_cache(kind, kv_cache)
    stored = checkpoint_tensors(folder) if stored is None else stored
    key = cache_key(folder, kind, with_cache, by_stat=True, route="streamed")
    cache = ExportCache(Path(cache_dir) / "exports" if cache_dir else None)
    hit = cache.get(key)
    if hit is None:
        t0 = time.perf_counter()
        log.info("exporting %s (%s%s) with its weights left on disk", folder, kind, ", KV cache" if with_cache else "")
        module = _build_fake_model(folder, kind)
        sources = _parameter_sources(module, stored)
        props = {SCOPE_PREFIX: WRAPPER_ATTR + ".", TOKENIZER: str(folder), MODEL_KIND: kind}
        with torch.no_grad():
            if with_cache:
                from qcompiler.frontends.kv_cache import eos_token_ids, export_cache_program

                program, layout, _ = export_cache_program(module, int(config.get("vocab_size") or 1000),
                                                          optimize=False)
                props.update({KV_CACHE: layout.to_json(), EOS_TOKEN_IDS: json.dumps(eos_token_ids(folder, config))})
            else:
                inputs = example_inputs(module, config, batch=2, seq=16, pad=0, seed=0)
                output = "logits" if kind == "causal_lm" else "last_hidden_state"
                program = export_program(module, inputs, [output], {n: {0: "batch", 1: "sequence"} for n in inputs},
                                         select=select(kind), optimize=False,
                                         extra_kwargs={"use_cache": False} if kind == "causal_lm" else {})
        with cache.staging(key) as staging:
            n, nbytes = _write_weights(program.model.graph, sources, WRAPPER_ATTR + ".", staging)
            program.optimize()
            proto = program.model_proto
            set_model_properties(proto, props)
            onnx.save_model(proto, str(staging / "model.onnx"))
            (staging / "info.json").write_text(json.dumps({"kind": kind, "source": str(folder), "route": "streamed",
                                                           "kv_cache": with_cache, "export_check_rel_error": None},
                                                          indent=1))
        log.info("exported in %.1fs: %d weights, %.2f GB copied from the checkpoint", time.perf_counter() - t0,
                 n, nbytes / 1e9)
        path, cached = cache.root / key / "model.onnx", False
    else:
        path, cached = hit[0], True
        log.info("export cache hit: %s", path)
    loaded = load_onnx_model(path, stream=True)
    return replace(loaded, source=name or str(folder), kind=kind, cached=cached)
