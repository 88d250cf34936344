"""The one flow: load -> match -> plan -> rewrite -> emit -> validate -> save.

Each step is a function of what the steps before it produced; a method (``qcompiler.methods``) says
what it needs and makes the plan; a streamed compile (``qcompiler.stream``) is another strategy for the
plan and rewrite steps, with the same steps around it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from qcompiler.analyze import analyze_graph
from qcompiler.config import CompileConfig, QuantConfig
from qcompiler.emit import emit_model
from qcompiler.errors import ConfigError, NothingToQuantizeError, OutputError, ValidationFailed
from qcompiler.external import SPILL_NAME, DataSink, external_sources, save_with_external_data
from qcompiler.frontends import LoadedModel, load_model
from qcompiler.graphio import (
    check_writable,
    import_graph,
    save_onnx_atomic,
    saved_bytes,
    share_constants,
    write_text_atomic,
)
from qcompiler.match.sites import find_linear_sites, head_is_quantized, reads_table, serves_tokens, weight_reader
from qcompiler.metadata import KV_CACHE_TRANSFORMED, MODEL_KIND, SITES, TOKENIZER, module_paths
from qcompiler.methods.base import Method, PlanContext, Setup
from qcompiler.methods.registry import REGISTRY, get_method
from qcompiler.package import MODEL_FILE, check_genai_source, write_genai_folder
from qcompiler.passes import EmbeddingPass, FoldPairsPass, MatMulNBitsPass, OnlineTransformPass, PassManager, QDQPass
from qcompiler.passes.embedding import gather_block, gatherable
from qcompiler.passes.precision import PrecisionPass
from qcompiler.plan import QuantPlan, own_grid_site, scaled_site
from qcompiler.report import CompileResult
from qcompiler.runtime.calib_data import check_source
from qcompiler.runtime.session import SessionOptions, compile_session_device
from qcompiler.runtime.stream_validate import validate_streamed
from qcompiler.runtime.text_inputs import validation_inputs
from qcompiler.runtime.validate import ValidationResult, validate
from qcompiler.sites import Analysis, MatchResult
from qcompiler.stream import ChunkStore, Streamed, chunk_key, stream_plan_rewrite

log = logging.getLogger(__name__)


class _Timings(dict):
    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self[step] = time.perf_counter() - t


def compile_model(source: Any = None, output: str | os.PathLike | None = None,
                  config: CompileConfig | None = None, *, example_inputs: dict | None = None,
                  cache_dir: str | os.PathLike | None = None, progress: bool = False) -> CompileResult:
    """Compile ``source`` to a weight-quantized ONNX model; write it to ``output`` when given.

    ``source``: an ``.onnx`` path, a Hugging Face folder, a bundled name, or an ``nn.Module`` (with
    ``example_inputs``). Nothing is written unless every step succeeded.
    """
    config = config or CompileConfig()
    method = get_method(config.method)
    if config.stream:
        _check_streamable(method)
    if method.needs_calibration:
        check_source(config.calib.source)
    folder = None
    if config.package == "genai":  # the model file goes into a staging folder, renamed to ``output`` at the end
        if output is None:
            raise ConfigError("--package genai writes a folder: give it as the output (-o DIR)")
        folder = _check_folder(output)
    elif output is not None:
        check_writable(output)
    timings = _Timings()
    staging = None
    try:
        if folder is not None:
            staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            output = staging / MODEL_FILE
        result = _compile(source, output, config, method, timings, example_inputs, cache_dir, progress)
        if folder is not None:
            with timings("package"):
                write_genai_folder(output, result.loaded, staging)
                os.replace(staging, folder)
            result.output = str(folder)
        return result
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _check_folder(output) -> Path:
    """A folder output: absent (or empty), in a writable folder."""
    folder = Path(output)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise OutputError(f"output {folder} exists and is not an empty folder")
    check_writable(folder.parent / f"{folder.name}.probe")
    return folder


def _compile(source: Any, output, config: CompileConfig, method: Method, timings: _Timings,
             example_inputs: dict | None, cache_dir, progress: bool) -> CompileResult:
    with timings("load"):
        loaded = load(source, config, method, output, example_inputs, cache_dir)
    if config.package == "genai":
        check_genai_source(loaded)
    config = _resolve_layout(config, loaded)
    with timings("match"):
        graph = import_graph(loaded.model, loaded.data_dir)
        config = _resolve_embeddings(_resolve_head(config, graph), graph)
        match, analysis = match_sites(graph, loaded, config, method)
    with timings("prepare"):
        ctx = method.prepare(Setup(config, loaded, graph, match, analysis, weight_reader(graph), progress))

    streamed, sink_dir = None, None
    try:
        if loaded.data_dir is not None:
            with timings("plan + rewrite (streamed)"):
                sink_dir = Path(tempfile.mkdtemp(prefix=f".{Path(output).name}.", dir=Path(output).parent))
                folder = ChunkStore.folder_for(output)
                store = None if not config.resume else (
                    lambda chunks: ChunkStore(folder, chunk_key(loaded.source, config, chunks)))
                graph, plan = stream_plan_rewrite(graph, method, ctx, config.stream_chunk_mb or method.stream_chunk_mb,
                                                  DataSink(sink_dir / SPILL_NAME), lambda g, p: rewrite(g, p, config),
                                                  make_plan, store)
                streamed = Streamed(external_sources(graph), tuple(s.node for s in match.sites))
        else:
            if config.resume:
                log.warning("--resume keeps chunk plans of streamed compiles only; this compile is not streamed")
            with timings("plan"):
                plan = make_plan(method, ctx)
            with timings("rewrite"):
                graph = rewrite(graph, plan, config)
        with timings("emit"):
            model = emit(graph, plan, loaded, config)
        validation = None
        if config.validate:
            with timings("validate"):
                validation = check(model, loaded, config, streamed)
        out_path = None
        if output is not None:
            with timings("save"):
                out_path = save(model, output, streamed)
            if streamed is not None and config.resume:  # done: the finished chunks' plans are not needed again
                shutil.rmtree(ChunkStore.folder_for(output), ignore_errors=True)
    finally:
        if sink_dir is not None:
            shutil.rmtree(sink_dir, ignore_errors=True)
    return CompileResult(out_path, model, plan, match, validation,
                         size_before=_model_bytes(loaded.model, loaded.onnx_path),
                         size_after=_model_bytes(model, out_path), timings=timings,
                         source=loaded.source, cached_export=loaded.cached, loaded=loaded)


def head_grid(cfg: CompileConfig) -> QuantConfig | None:
    """The output head's own grid (``MatchConfig.head_bits``, ``head_group_size``, ``head_symmetric``); None
    where the head is the method's like any other weight (all three None, or the same grid as the model's and
    no scales to add)."""
    m = cfg.match
    if m.head_bits is None and m.head_group_size is None and m.head_symmetric is None:
        return None
    grid = dataclasses.replace(cfg.quant, bits=m.head_bits or cfg.quant.bits,
                               group_size=cfg.quant.group_size if m.head_group_size is None else m.head_group_size,
                               symmetric=cfg.quant.symmetric if m.head_symmetric is None else m.head_symmetric)
    return None if grid == cfg.quant and not head_scaled(cfg, grid) else grid


def head_scaled(cfg: CompileConfig, grid: QuantConfig) -> bool:
    return cfg.match.head_scales and grid.bits < 8


def make_plan(method: Method, ctx: PlanContext) -> QuantPlan:
    """The method's plan; the output head on its own grid when ``head_grid`` gives one, and the embedding tables on
    that grid or the model's (rounded to nearest; a head below 8 bits balanced by SINQ's scales unless
    ``--no-head-scales``; a table read by GatherBlockQuantized in blocks that divide its width): the method never
    plans them, so no calibration solve or learning is spent on them."""
    cfg = ctx.config
    grid = head_grid(cfg)
    own = [s for s in ctx.sites if s.role == "embedding" or (s.role == "head" and grid is not None)]
    if not own:
        return method.plan(ctx)
    ids = {s.id for s in own}
    rest = tuple(s for s in ctx.sites if s.id not in ids)
    analysis = ctx.analysis and dataclasses.replace(
        ctx.analysis, sites=tuple(s for s in ctx.analysis.sites if s.id not in ids))
    plan = (method.plan(dataclasses.replace(ctx, sites=rest, analysis=analysis)) if rest
            else QuantPlan(method.name, cfg.quant, ()))
    like = plan.sites[0].stats if plan.sites else None
    order = {s.id: i for i, s in enumerate(ctx.sites)}
    heads, online = [], []
    tables = {s.weight for s in own if s.role == "embedding"}
    for s in own:
        w = ctx.weight_of(s)
        site_grid = grid or cfg.quant
        # a table GatherBlockQuantized reads, and a head tied to it that is not scaled (EmbeddingPass then stores
        # the codes once), in whole blocks that divide the hidden size
        tied = s.role == "head" and s.weight in tables and site_grid.symmetric and not head_scaled(cfg, site_grid)
        if cfg.match.gather_embeddings and (s.role == "embedding" or tied):
            block = gather_block(site_grid.group_size, s.k)
            site_grid = dataclasses.replace(site_grid, group_size=block or site_grid.group_size)
        planned = own_grid_site(s, site_grid, lambda _, w=w: w, like)
        scaled = scaled_site(planned, grid, w) if s.role == "head" and head_scaled(cfg, grid) else None
        if scaled is not None:
            planned = scaled[0]
            online.append(scaled[1])
        heads.append(planned)
    sites = sorted([*plan.sites, *heads], key=lambda p: order[p.site.id])
    return dataclasses.replace(plan, sites=tuple(sites), online=(*plan.online, *online))


def _check_streamable(method: Method) -> None:
    if not method.streamable:
        raise ConfigError(f"--method {method.name} runs the whole model on calibration data: a streaming compile "
                          f"supports {', '.join(name for name, m in REGISTRY.items() if m.streamable)}")


def load(source: Any, config: CompileConfig, method: Method, output, example_inputs: dict | None,
         cache_dir) -> LoadedModel:
    """The frontend step: the model as one ONNX graph (its weights left on disk when streaming)."""
    loaded = load_model(source, example_inputs=example_inputs, cache_dir=cache_dir, stream=config.stream,
                        kv_cache=config.kv_cache)
    if loaded.data_dir is not None:
        _check_streamable(method)
        if config.dtype != "float32":  # the precision pass would read every spilled weight back
            raise ConfigError(f"--dtype {config.dtype} is not supported with a streamed compile: this model "
                              "streams by default (its weights exceed 2 GiB); --no-stream compiles it in memory")
        if output is None:
            raise ConfigError("a streaming compile writes its weights as it goes: give an output path")
        log.info("streaming compile: weights stay in %s; chunks of %d MB", loaded.data_dir,
                 config.stream_chunk_mb or method.stream_chunk_mb)
    return loaded


def match_sites(graph: gs.Graph, loaded: LoadedModel, config: CompileConfig,
                method: Method) -> tuple[MatchResult, Analysis | None]:
    """The matcher step: the sites (and, when the method needs them, pairs and sibling groups)."""
    analysis = None
    if method.needs_analysis(config):
        analysis = analyze_graph(graph, loaded.model, config.match)
        match = MatchResult(analysis.sites, analysis.rejected)
    else:
        match = find_linear_sites(graph, config.match, module_paths(loaded.model))
    if not match.sites:
        raise NothingToQuantizeError(f"nothing to quantize in {loaded.source}: no MatMul/Gemm with a "
                                     f"constant 2-D weight ({len(match.rejected)} candidates rejected)")
    return match, analysis


def _resolve_head(config: CompileConfig, graph: gs.Graph) -> CompileConfig:
    """``--quantize-lm-head`` unset on a KV-cache decoder: an 8-bit head only where MatMulNBits runs it on
    its int8 kernel (``--accuracy-level 4``). At the other levels ONNX Runtime's CPU kernel dequantizes
    an 8-bit weight every run: SmolLM2's token step took 190 ms with it against 44 ms with the float head
    at level 1 (17-19 ms at level 4), so the head stays float there (a 4-bit ``--head-bits`` is quantized
    at any level: 35 ms)."""
    m = config.match
    bits = m.head_bits or config.quant.bits
    if (m.quantize_lm_head is not None or config.format != "matmulnbits" or bits != 8
            or config.accuracy_level == 4 or not head_is_quantized(graph, m)):
        return config
    why = (f"an 8-bit head is slow at --accuracy-level {config.accuracy_level}, ONNX Runtime's int8 kernel needs "
           f"level 4; --accuracy-level 4, --head-bits 4 or --quantize-lm-head quantize it")
    log.info("output head kept float: %s", why)
    return dataclasses.replace(config, match=dataclasses.replace(m, quantize_lm_head=False, head_float_reason=why))


def _resolve_embeddings(config: CompileConfig, graph: gs.Graph) -> CompileConfig:
    """``--quantize-embeddings`` / ``--gather-embeddings`` unset: on for a KV-cache decoder (it reads one row of
    each table per token, and a float table is most of a small LLM's file: SmolLM2's 113 of 198 MB) where every
    table can be read by GatherBlockQuantized on the head's grid (``EmbeddingPass``: 4- or 8-bit containers in
    blocks of a power of two >= 16 dividing the hidden size); off for any other graph, where a whole-table
    DequantizeLinear on every run would cost more than the float table, and for ``--format qdq``, whose
    users may run it where com.microsoft ops are not."""
    m = config.match
    decoder = serves_tokens(graph)
    gather = decoder if m.gather_embeddings is None else m.gather_embeddings
    quantize = m.quantize_embeddings
    if quantize is None:
        grid = head_grid(config) or config.quant
        tables = [n.inputs[0] for n in graph.nodes if reads_table(n)]
        widths = [int(t.shape[1]) for t in tables]
        quantize = (decoder and gather and bool(widths) and config.quantize_weights and config.format == "matmulnbits"
                    and all(gatherable(grid.bits, gather_block(grid.group_size, w) or 0, w) for w in widths))
        # a tied head kept in float would read the whole table dequantized on every token step (SmolLM2 at
        # --accuracy-level 1): the one float table serves both instead
        if quantize and not head_is_quantized(graph, m) and any(c.op != "Gather" for t in tables for c in t.outputs):
            log.info("embedding tables kept float: the output head tied to one stays float (--accuracy-level 4, "
                     "--head-bits 4 or --quantize-lm-head quantize both)")
            quantize = False
        if quantize:
            log.info("embedding tables quantized on the head's grid (%s), read with GatherBlockQuantized",
                     grid.describe())
    if (quantize, gather) == (m.quantize_embeddings, m.gather_embeddings):
        return config
    return dataclasses.replace(config, match=dataclasses.replace(m, quantize_embeddings=quantize,
                                                                 gather_embeddings=gather))


def _resolve_layout(config: CompileConfig, loaded: LoadedModel) -> CompileConfig:
    """``--online-layout auto``: conv for a causal LM (a Hugging Face causal LM, or an ONNX file with a
    ``logits`` output), whose batch-1 token steps it makes cheaper; matmul otherwise."""
    if config.cafeq.online_layout != "auto":
        return config
    layout = "conv" if loaded.causal else "matmul"
    return dataclasses.replace(config, cafeq=dataclasses.replace(config.cafeq, online_layout=layout))


def rewrite(graph: gs.Graph, plan: QuantPlan, config: CompileConfig) -> gs.Graph:
    """The passes that apply ``plan``: fold pair transforms, insert online transforms, quantize."""
    sites = {sp.site.id: sp.site for sp in plan.sites}
    passes: list = [FoldPairsPass(plan.pair_transforms, sites),
                    OnlineTransformPass(plan.online, sites, config.cafeq.online_layout, fold_scale=True)]
    embed = EmbeddingPass(plan, gather=config.match.gather_embeddings)
    if config.quantize_weights:
        quantize = MatMulNBitsPass(plan, config.accuracy_level) if config.format == "matmulnbits" else QDQPass(plan)
        passes += [embed, quantize]
    if config.dtype != "float32":  # last: the scales the quantizing passes wrote follow too
        passes.append(PrecisionPass(config.dtype))
    graph = PassManager(passes)(graph).graph
    if share_constants(graph, embed.shared):
        log.info("a tied head and its table store their codes once")
    return graph


def emit(graph: gs.Graph, plan: QuantPlan, loaded: LoadedModel, config: CompileConfig) -> onnx.ModelProto:
    """The ONNX model, with what the compile did recorded in its metadata."""
    props = {"qcompiler.method": config.method, "qcompiler.quant": config.quant.describe(),
             "qcompiler.format": config.format, MODEL_KIND: loaded.kind,
             SITES: json.dumps(plan.summary(), separators=(",", ":"))}
    props["qcompiler.dtype"] = config.dtype
    if plan.online:
        props["qcompiler.online_layout"] = config.cafeq.online_layout
    cached = [name for t in plan.pair_transforms for name in t.pair.cache]
    if cached:  # V's values folded with M_h: the cache holds V M_h
        props[KV_CACHE_TRANSFORMED] = json.dumps(cached)
    if loaded.tokenizer_dir:
        props[TOKENIZER] = loaded.tokenizer_dir
    return emit_model(graph, loaded.model, props)


def check(model: onnx.ModelProto, loaded: LoadedModel, config: CompileConfig,
          streamed: Streamed | None) -> ValidationResult:
    """Run the compiled model against the original; raise ValidationFailed past the gate (unless forced)."""
    options = SessionOptions(device=compile_session_device(config.device))
    # a few real samples when the model's tokenizer is known (random token ids do not rank methods)
    inputs = validation_inputs(loaded.model, loaded.tokenizer_dir)
    if streamed is not None:  # the original does not fit the memory bound: both run stretch by stretch
        validation = validate_streamed(loaded.model, loaded.data_dir, model, streamed.sources, list(streamed.cuts),
                                       inputs.feeds, options, label=inputs.label)
    else:
        validation = validate(model, loaded.model, inputs)
    log.info("validation on %s: max relative error %.3e, min cosine %.5f", validation.inputs,
             validation.max_rel_error, validation.min_cosine)
    problem = validation.problem(config.max_error)
    if problem and not config.force:
        raise ValidationFailed(f"validation failed: {problem}; nothing written (--force writes it anyway)")
    if problem:
        log.warning("validation failed: %s; written anyway (--force)", problem)
    return validation


def save(model: onnx.ModelProto, output, streamed: Streamed | None) -> str:
    """Atomic write (a streamed model's tensors go to ``OUT.onnx.data``)."""
    if streamed is not None:
        return str(save_with_external_data(model, output, streamed.sources))
    return str(save_onnx_atomic(model, output))


def _model_bytes(model: onnx.ModelProto, path: str | None) -> int:
    return saved_bytes(path) if path and Path(path).is_file() else model.ByteSize()


def write_report(report: dict, path: str | os.PathLike) -> None:
    """Atomic JSON write."""
    write_text_atomic(check_writable(path), json.dumps(report, indent=1))
