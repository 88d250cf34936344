"""What the transform methods (cafeq, rotate, cafeq+gptaq) share: the matcher's pairs and groups, the
run-time cost their online ops are budgeted against, and the planner (``transform_planner``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

from qcompiler.match.sites import float_weight_bytes
from qcompiler.methods.base import Method, PlanContext, Setup
from qcompiler.methods.online_cost import step_cost
from qcompiler.methods.transform_planner import Recipe, Rounder, Run, plan_transforms, select_online_units
from qcompiler.plan import QuantPlan
from qcompiler.sites import ATTN_VO

log = logging.getLogger(__name__)


class TransformMethod(Method):
    transforms: ClassVar[bool] = True
    stream_chunk_mb: ClassVar[int] = 16  # ~10 float64 copies of a chunk's weights while learning and rounding
    recipe: ClassVar[Recipe]

    def prepare(self, setup: Setup) -> PlanContext:
        ctx = super().prepare(setup)
        regime = setup.config.cafeq.online_regime
        step = step_cost(regime, setup.match.sites, setup.config.quant,
                         float_weight_bytes(setup.graph, setup.match.sites))
        log.info("online transforms: %s regime (%.1f M multiply-adds per token, %.1f MB read per token step)",
                 regime, step.macs / 1e6, step.token_bytes / 2**20)
        return dataclasses.replace(ctx, step=step, sink=self._sink(setup), input_power=self._input_power(setup))

    def _input_power(self, setup: Setup) -> dict | None:
        """``--input-weights noise``: the mean square per channel on random token ids of each site input that reads
        the residual stream (q/k/v, gate/up, V, up). A pair's inner tensor (O's input, after attention; down's,
        after the activation) is left out: random tokens predict its power poorly (``tools/learner_study.py --table
        power``, correlation of logs against text, mean over SmolLM2's 30 layers: q's input 0.88, O's 0.46, down's
        0.50), so its factor stays unweighted."""
        if setup.config.cafeq.input_weights != "noise" or not self.recipe.learned:
            return None
        from qcompiler.runtime.sink import noise_power

        sites = {s.id: s for s in setup.match.sites}
        pairs = setup.analysis.pairs if setup.analysis is not None else ()
        inner = {sites[p.consumer].input for p in pairs if p.consumer in sites}
        # an embedding table's input is token ids, not activations
        tensors = sorted({s.input for s in setup.match.sites if s.role != "embedding"} - inner)
        try:
            return noise_power(setup.loaded.model, tensors, setup.loaded.data_dir)
        except Exception as e:  # noqa: BLE001 - an unusual graph: uniform weights, the compile goes on
            log.warning("input weights: random-token statistics could not be computed (%s); uniform", e)
            return None

    def _sink(self, setup: Setup) -> dict | None:
        """``--joint-rule sink`` or ``sink-loose`` on a decoder: the attention sink's value of the tensors the
        coupled pairs' factors read."""
        cfg = setup.config.cafeq
        if (not self.recipe.joint_rounding or cfg.joint_rule == "pqe" or not cfg.joint_pairs
                or setup.analysis is None or not setup.analysis.pairs):
            return None
        if not setup.loaded.causal:
            log.info("joint rounding: --joint-rule sink applies to decoders; this model is not one (pqe rule)")
            return None
        from qcompiler.runtime.sink import bos_token_id, sink_states

        sites = {s.id: s for s in setup.match.sites}
        # V·O needs V's input alone; up·down also down's input (the activation's factor is read off it)
        tensors = sorted({sites[i].input for p in setup.analysis.pairs
                          for i in ((p.producer,) if p.kind == ATTN_VO else (p.producer, p.consumer)) if i in sites})
        token = bos_token_id(setup.loaded.tokenizer_dir)
        if token is None:
            log.info("joint rounding: no BOS token recorded; the sink state is that of token 0")
        try:
            return sink_states(setup.loaded.model, tensors, token or 0, setup.loaded.data_dir)
        except Exception as e:  # noqa: BLE001 - an unusual graph: the rule falls back, the compile goes on
            log.warning("joint rounding: the attention sink's state could not be computed (%s); pqe rule", e)
            return None

    def for_streaming(self, ctx: PlanContext) -> PlanContext:
        """The online units of the whole model, chosen once from shapes (a whole-model plan's choice)."""
        units = select_online_units(ctx.analysis, ctx.config.cafeq, ctx.step, self.recipe)
        return dataclasses.replace(ctx, online_units=units)

    def rounder(self, ctx: PlanContext) -> Rounder | None:
        """Rounding of the transformed weights other than the planner's own (RTN, then joint rounding)."""
        return None

    def plan(self, ctx: PlanContext) -> QuantPlan:
        cfg = ctx.config
        run = Run(cfg.device, cfg.jobs, cfg.seed, cfg.executor, cfg.ray_address)
        return plan_transforms(ctx.analysis, ctx.weight_of, cfg.quant, cfg.cafeq, self.recipe, ctx.progress,
                               self.rounder(ctx), ctx.online_units, ctx.step, run, ctx.sink, ctx.input_power)
