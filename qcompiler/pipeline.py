"""The one flow: frontend -> graph -> match -> plan -> passes -> emit -> validate -> save."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from qcompiler import __version__
from qcompiler.config import CALIBRATED_METHODS, CompileConfig
from qcompiler.emit import emit_model
from qcompiler.errors import ConfigError, NothingToQuantizeError, ValidationFailed
from qcompiler.external import SPILL_NAME, DataSink, external_sources, save_with_external_data
from qcompiler.frontends import LoadedModel, load_model
from qcompiler.graphio import (
    check_writable,
    export_graph,
    import_graph,
    save_onnx_atomic,
    saved_bytes,
    write_text_atomic,
)
from qcompiler.match.analysis import analyze_graph
from qcompiler.match.sites import MatchResult, find_linear_sites, float_weight_bytes, weight_reader
from qcompiler.metadata import MODEL_KIND, SITES, TOKENIZER, module_paths
from qcompiler.methods import TRANSFORM_METHODS, make_plan
from qcompiler.methods.gptq import Calibration
from qcompiler.methods.online_cost import StepCost, step_cost
from qcompiler.passes import (
    EmbeddingPass,
    FoldPairsPass,
    MatMulNBitsPass,
    OnlineTransformPass,
    PassManager,
    QDQPass,
)
from qcompiler.plan import QuantPlan
from qcompiler.resources import compile_peak_mb, note_workers_peak
from qcompiler.runtime.calib_data import calibration_tokens
from qcompiler.runtime.inputs import sample_inputs
from qcompiler.runtime.session import SessionOptions
from qcompiler.runtime.stream_validate import validate_streamed
from qcompiler.runtime.validate import ValidationResult, validate
from qcompiler.stream import Chunk, chunk_sites, stream_compile
from qcompiler.workers import TaskPool, resolve_jobs

log = logging.getLogger(__name__)


@dataclass
class CompileResult:
    output: str | None
    model: onnx.ModelProto
    plan: QuantPlan
    match: MatchResult
    validation: ValidationResult | None
    size_before: int
    size_after: int
    timings: dict[str, float] = field(default_factory=dict)
    source: str = ""
    cached_export: bool = False

    def report(self, config: CompileConfig) -> dict[str, Any]:
        quantized_weight_bits = sum(p.site.k * p.site.n * 32 for p in self.plan.sites)
        true_bits = sum(p.weight.storage_bits() for p in self.plan.sites)
        return {
            "qcompiler": __version__,
            "source": self.source,
            "output": self.output,
            "config": asdict(config),
            "sites": self.plan.summary(),
            "pairs": [asdict(p) for p in self.plan.pair_stats],
            "transforms": {"pairs": [t.pair.id for t in self.plan.pair_transforms],
                           "online": [{"id": o.id, "sites": list(o.sites), "block_size": o.block_size}
                                      for o in self.plan.online]},
            "skipped": [asdict(r) for r in self.match.rejected],
            "size": {"before_bytes": self.size_before, "after_bytes": self.size_after,
                     "quantized_weights_fp32_bytes": quantized_weight_bits // 8,
                     "quantized_weights_true_bytes": true_bits // 8},
            "validation": None if self.validation is None else {
                "max_rel_error": self.validation.max_rel_error, "min_cosine": self.validation.min_cosine,
                "outputs": [asdict(o) for o in self.validation.outputs]},
            "timings_s": self.timings,
            "peak_rss_mb": compile_peak_mb(),
            "cached_export": self.cached_export,
        }


def _calibration(config: CompileConfig, loaded: LoadedModel) -> Calibration:
    """The calibration tokens (model's tokenizer unless ``--tokenizer``) and how to run the segments."""
    from qcompiler.methods.cafeq import _device

    cfg = config.calib
    tokens = calibration_tokens(cfg.source, cfg.tokenizer or loaded.tokenizer_dir, cfg.samples + cfg.holdout,
                                cfg.seqlen, cfg.seed)
    return Calibration(tokens, cfg, asymmetric=config.method != "gptq",
                       options=SessionOptions(device=config.cafeq.device), device=_device(config.cafeq.device))


def _transformed_model(model: onnx.ModelProto, pair_transforms, online, sites) -> onnx.ModelProto:
    """``model`` with exact transforms folded and online ``x T^-1`` ops inserted, weights in float."""
    graph = PassManager([FoldPairsPass(pair_transforms, sites), OnlineTransformPass(online, sites)])(
        import_graph(model)).graph
    out = export_graph(graph)
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.ir_version = model.ir_version
    return out


def _model_bytes(model: onnx.ModelProto, path: str | None) -> int:
    return saved_bytes(path) if path and Path(path).is_file() else model.ByteSize()


def compile_model(source: Any = None, output: str | os.PathLike | None = None,
                  config: CompileConfig | None = None, *, example_inputs: dict | None = None,
                  cache_dir: str | os.PathLike | None = None, progress: bool = False) -> CompileResult:
    """Compile ``source`` to a weight-quantized ONNX model; write it to ``output`` when given.

    Nothing is written unless every step succeeded.
    """
    config = config or CompileConfig()
    if output is not None:
        check_writable(output)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    loaded: LoadedModel = load_model(source, example_inputs=example_inputs, cache_dir=cache_dir,
                                     stream=config.stream)
    timings["load"] = time.perf_counter() - t
    streaming = loaded.data_dir is not None
    if streaming:
        config.check_streamable()
        if output is None:
            raise ConfigError("a streaming compile writes its weights as it goes: give an output path")
        log.info("streaming compile: weights stay in %s; chunks of %d MB", loaded.data_dir, config.chunk_mb)

    config = _resolve_layout(config, loaded)
    t = time.perf_counter()
    graph = import_graph(loaded.model, loaded.data_dir)
    analysis = None
    # transform methods need the pairs and groups; calibrated ones the V·O pairs' heads and attention weights
    if config.method in TRANSFORM_METHODS or (config.method in CALIBRATED_METHODS and config.calib.attention_values):
        analysis = analyze_graph(graph, loaded.model, config.match)
        match = MatchResult(analysis.sites, analysis.rejected)
    else:
        match = find_linear_sites(graph, config.match, module_paths(loaded.model))
    if not match.sites:
        raise NothingToQuantizeError(f"nothing to quantize in {loaded.source}: no MatMul/Gemm with a "
                                     f"constant 2-D weight ({len(match.rejected)} candidates rejected)")
    timings["match"] = time.perf_counter() - t
    step = _step_cost(config, graph, match) if config.method in TRANSFORM_METHODS else None
    calibration = None
    if config.method in CALIBRATED_METHODS:
        t = time.perf_counter()
        calibration = _calibration(config, loaded)
        timings["calibration data"] = time.perf_counter() - t
    sink_dir = None
    try:
        if streaming:
            t = time.perf_counter()
            sink_dir = Path(tempfile.mkdtemp(prefix=f".{Path(output).name}.", dir=Path(output).parent))
            graph, plan, cuts = _stream(graph, match, analysis, config, DataSink(sink_dir / SPILL_NAME), progress,
                                        step)
            timings["plan + rewrite (streamed)"] = time.perf_counter() - t
        else:
            t = time.perf_counter()
            sites_by_id = {s.id: s for s in match.sites}
            plan = make_plan(config, match.sites, weight_reader(graph), analysis, progress, model=loaded.model,
                             calibration=calibration, step=step,
                             transformed=lambda pairs, online: _transformed_model(loaded.model, pairs, online,
                                                                                  sites_by_id))
            timings["plan"] = time.perf_counter() - t
            t = time.perf_counter()
            graph = _rewrite(graph, plan, config)
            timings["rewrite"] = time.perf_counter() - t
            cuts = None
        return _finish(graph, plan, match, loaded, config, output, timings, cuts)
    finally:
        if sink_dir is not None:
            shutil.rmtree(sink_dir, ignore_errors=True)


def _resolve_layout(config: CompileConfig, loaded: LoadedModel) -> CompileConfig:
    """``--online-layout auto``: conv for a causal LM (a Hugging Face causal LM, or an ONNX file with a
    ``logits`` output), whose batch-1 token steps it makes cheaper; matmul otherwise."""
    if config.cafeq.online_layout != "auto":
        return config
    causal = loaded.kind == "causal_lm" or (
        loaded.kind == "onnx" and any(o.name == "logits" for o in loaded.model.graph.output))
    layout = "conv" if causal else "matmul"
    return dataclasses.replace(config, cafeq=dataclasses.replace(config.cafeq, online_layout=layout))


def _rewrite(graph: gs.Graph, plan: QuantPlan, config: CompileConfig) -> gs.Graph:
    """The passes that apply ``plan``: fold pair transforms, insert online transforms, quantize."""
    sites = {sp.site.id: sp.site for sp in plan.sites}
    passes: list = [FoldPairsPass(plan.pair_transforms, sites),
                    OnlineTransformPass(plan.online, sites, config.cafeq.online_layout, fold_scale=True)]
    if config.quantize_weights:
        passes += [EmbeddingPass(plan), MatMulNBitsPass(plan, config.accuracy_level)
                   if config.format == "matmulnbits" else QDQPass(plan)]
    return PassManager(passes)(graph).graph


def _step_cost(config: CompileConfig, graph: gs.Graph, match: MatchResult) -> StepCost:
    """The model's run-time cost that the online-transform budget is a fraction of."""
    regime = config.cafeq.online_regime
    step = step_cost(regime, match.sites, config.quant, float_weight_bytes(graph, match.sites))
    log.info("online transforms: %s regime (%.1f M multiply-adds per token, %.1f MB read per token step)",
             regime, step.macs / 1e6, step.token_bytes / 2**20)
    return step


def _stream(graph: gs.Graph, match: MatchResult, analysis, config: CompileConfig, sink: DataSink,
            progress: bool, step: StepCost | None) -> tuple[gs.Graph, QuantPlan, list[str]]:
    """Plan and rewrite chunk by chunk; also returns where validation cuts the models (node names)."""
    chunks = chunk_sites(match.sites, config.chunk_mb * 2**20,
                         analysis.pairs if analysis else (), analysis.groups if analysis else ())
    log.info("%d sites in %d chunks", len(match.sites), len(chunks))

    online_units = None
    if analysis is not None:
        from qcompiler.methods.cafeq import select_online_units

        online_units = select_online_units(analysis, config.cafeq, step) if step is not None else None

    def plan_chunk(g: gs.Graph, chunk: Chunk) -> QuantPlan:
        return make_plan(config, chunk.sites, weight_reader(g), chunk.analysis() if analysis else None,
                         online_units=online_units)

    learns = config.method in ("cafeq", "cafeq+gptaq")
    jobs = resolve_jobs(config.cafeq.jobs, sum(s.k * s.n for s in match.sites), config.cafeq.device) if learns else 1
    try:
        with TaskPool(jobs) as pool:  # one set of workers for every chunk
            graph, plan = stream_compile(graph, chunks, plan_chunk, lambda g, p: _rewrite(g, p, config), sink,
                                         config.method, config.quant, progress)
        note_workers_peak(pool.workers_peak_mb)
        # validation cuts before every site: a stretch holds one weight's worth (either model's basis is its own)
        return graph, plan, [s.node for s in match.sites]
    finally:
        sink.close()


def _finish(graph: gs.Graph, plan: QuantPlan, match: MatchResult, loaded: LoadedModel, config: CompileConfig,
            output, timings: dict[str, float], cuts: list[str] | None) -> CompileResult:
    """Emit, validate (whole, or stretch by stretch when streamed: ``cuts``) and save."""
    streaming = cuts is not None
    t = time.perf_counter()
    sources = external_sources(graph) if streaming else {}
    props = {"qcompiler.method": config.method, "qcompiler.quant": config.quant.describe(),
             "qcompiler.format": config.format, MODEL_KIND: loaded.kind,
             SITES: json.dumps(plan.summary(), separators=(",", ":"))}
    if plan.online:
        props["qcompiler.online_layout"] = config.cafeq.online_layout
    if loaded.tokenizer_dir:
        props[TOKENIZER] = loaded.tokenizer_dir
    model = emit_model(graph, loaded.model, props)
    timings["emit"] = time.perf_counter() - t

    validation = None
    if config.validate:
        t = time.perf_counter()
        if streaming:  # the original does not fit the memory bound: both models run stretch by stretch
            validation = validate_streamed(loaded.model, loaded.data_dir, model, sources, cuts,
                                           sample_inputs(loaded.model), SessionOptions(device=config.cafeq.device))
        else:
            validation = validate(model, loaded.model)
        timings["validate"] = time.perf_counter() - t
        log.info("validation: max relative error %.3e, min cosine %.5f",
                 validation.max_rel_error, validation.min_cosine)
        problem = validation.problem(config.max_error)
        if problem and not config.force:
            raise ValidationFailed(f"validation failed: {problem}; nothing written (--force writes it anyway)")
        if problem:
            log.warning("validation failed: %s; written anyway (--force)", problem)

    out_path = None
    if output is not None:
        t = time.perf_counter()
        out_path = str(save_with_external_data(model, output, sources) if streaming
                       else save_onnx_atomic(model, output))
        timings["save"] = time.perf_counter() - t
    return CompileResult(out_path, model, plan, match, validation,
                         size_before=_model_bytes(loaded.model, loaded.onnx_path),
                         size_after=_model_bytes(model, out_path), timings=timings,
                         source=loaded.source, cached_export=loaded.cached)


def write_report(report: dict, path: str | os.PathLike) -> None:
    """Atomic JSON write."""
    write_text_atomic(check_writable(path), json.dumps(report, indent=1))
