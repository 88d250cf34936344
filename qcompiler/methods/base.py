"""What a method is: an object that says what it needs and turns a :class:`PlanContext` into a
:class:`~qcompiler.plan.QuantPlan`. The pipeline asks a method what it needs, never for its name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx

from qcompiler.config import CompileConfig
from qcompiler.errors import InvalidWeightsError
from qcompiler.plan import QuantPlan
from qcompiler.sites import Analysis, LinearSite, MatchResult

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from qcompiler.frontends.base import LoadedModel
    from qcompiler.methods.gptq import Calibration
    from qcompiler.methods.online_cost import StepCost

WeightFn = Callable[[LinearSite], np.ndarray]


def finite_weights(weight_of: WeightFn) -> WeightFn:
    """``weight_of`` that refuses NaN/Inf weights, naming the site: no method can round them."""
    def read(site: LinearSite) -> np.ndarray:
        w = weight_of(site)
        if not np.all(np.isfinite(w)):
            bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
            raise InvalidWeightsError(f"weight of {site.id} ({site.weight}) has {bad} NaN/Inf values")
        return w
    return read


@dataclass(frozen=True)
class PlanContext:
    """Everything a method plans from. ``sites`` and ``analysis`` may be a part of the model (a chunk of
    a streamed compile: then ``online_units`` names the units the whole model's budget gives online
    transforms); ``model`` is the float model (calibrated methods run it); ``step`` is the run-time cost
    an online-transform budget is a fraction of."""

    config: CompileConfig
    sites: tuple[LinearSite, ...]
    weight_of: WeightFn
    analysis: Analysis | None = None
    model: onnx.ModelProto | None = None
    calibration: Calibration | None = None
    step: StepCost | None = None
    online_units: frozenset[str] | None = None
    progress: bool = False
    # a decoder's attention-sink state (runtime/sink.py): tensor name -> its value ``[K]`` in a one-token
    # forward of BOS, for the tensors the factors of coupled pairs read (``--joint-rule sink``, ``sink-loose``)
    sink: Mapping[str, np.ndarray] | None = None
    # tensor name -> its mean square per channel ``[K]`` on random token ids (runtime/sink.py ``noise_power``), for
    # the site inputs that read the residual stream (``--input-weights noise``; methods/transforming.py)
    input_power: Mapping[str, np.ndarray] | None = None

    def part(self, sites: Sequence[LinearSite], analysis: Analysis | None, weight_of: WeightFn) -> PlanContext:
        """The same context over part of the model (a streamed chunk)."""
        return dataclasses.replace(self, sites=tuple(sites), analysis=analysis, weight_of=finite_weights(weight_of),
                                   progress=False)


@dataclass(frozen=True)
class Setup:
    """What the pipeline has when a method prepares: the loaded model, its graph and the matcher's result."""

    config: CompileConfig
    loaded: LoadedModel
    graph: gs.Graph
    match: MatchResult
    analysis: Analysis | None
    weight_of: WeightFn
    progress: bool = False


class Method:
    """A quantization method. Subclasses set the class attributes and implement :meth:`plan`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what it does
    needs_calibration: ClassVar[bool] = False
    streamable: ClassVar[bool] = True  # can plan a model a chunk at a time
    transforms: ClassVar[bool] = False  # pairs and groups from the matcher, online ops within a budget
    learns: ClassVar[bool] = False  # runs learners on worker processes
    stream_chunk_mb: ClassVar[int] = 64  # default --stream-chunk-mb

    def needs_analysis(self, config: CompileConfig) -> bool:
        """Whether the plan needs the matcher's pairs and groups (not just the sites)."""
        return self.transforms

    def prepare(self, setup: Setup) -> PlanContext:
        """The context the plan is made from (calibration data, cost models...)."""
        return PlanContext(setup.config, tuple(setup.match.sites), finite_weights(setup.weight_of), setup.analysis,
                           model=setup.loaded.model, progress=setup.progress)

    def for_streaming(self, ctx: PlanContext) -> PlanContext:
        """``ctx`` fixed for planning the model a chunk at a time (decisions taken for the whole model)."""
        return ctx

    def plan(self, ctx: PlanContext) -> QuantPlan:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<method {self.name}>"
