"""``cafeq+gptaq``: CafeQ's transforms learned without data, then the transformed weights rounded by
GPTAQ on calibration data run through the transformed float model."""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from qcompiler.graphio import export_graph, import_graph
from qcompiler.methods.base import PlanContext
from qcompiler.methods.gptq import CalibratedMethod, calibrated_rounder
from qcompiler.methods.transform_planner import Recipe, Rounder
from qcompiler.methods.transforming import TransformMethod
from qcompiler.passes import FoldPairsPass, OnlineTransformPass, PassManager


def transformed_model(model: onnx.ModelProto, pair_transforms: Sequence, online: Sequence,
                      sites: dict) -> onnx.ModelProto:
    """``model`` with exact transforms folded and online ``x T^-1`` ops inserted, weights in float."""
    graph = PassManager([FoldPairsPass(pair_transforms, sites), OnlineTransformPass(online, sites)])(
        import_graph(model)).graph
    out = export_graph(graph)
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.ir_version = model.ir_version
    out.metadata_props.extend(model.metadata_props)  # the cache layout, tokenizer... the calibration reads
    return out


class CafeqGptaq(CalibratedMethod, TransformMethod):
    name = "cafeq+gptaq"
    summary = "cafeq's learned transforms, then GPTAQ rounding of the transformed weights"
    asymmetric = True
    learns = True
    recipe = Recipe("cafeq+gptaq", learned=True, joint_rounding=False)

    def rounder(self, ctx: PlanContext) -> Rounder:
        by_id = {s.id: s for s in ctx.sites}
        return calibrated_rounder(lambda pairs, online: transformed_model(ctx.model, pairs, online, by_id),
                                  ctx.analysis.sites, ctx.config.quant, ctx.calibration, ctx.progress,
                                  ctx.analysis.pairs)

