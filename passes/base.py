"""Pass infrastructure, after onnx-ir's: ``call(graph) -> PassResult(graph, modified)``.

Passes edit the graph in place (``in_place = True``); a pass manager runs a named sequence and says
which pass failed after which.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    graph: gs.Graph
    modified: bool


class PassError(RuntimeError):
    pass


class Pass:
    """Base class. Subclasses implement ``call``; ``requires``/``ensures`` may check conditions."""

    in_place: bool = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, graph: gs.Graph) -> None:  # pre-condition; raise PassError
        return None

    def call(self, graph: gs.Graph) -> PassResult:
        raise NotImplementedError

    def ensures(self, graph: gs.Graph) -> None:  # post-condition; raise PassError
        return None

    def __call__(self, graph: gs.Graph) -> PassResult:
        self.requires(graph)
        result = self.call(graph)
        self.ensures(result.graph)
        return result


class PassManager:
    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    def __call__(self, graph: gs.Graph) -> PassResult:
        modified = False
        done: list[str] = []
        for p in self.passes:
            t0 = time.perf_counter()
            try:
                result = p(graph)
            except Exception as e:
                after = f" after {done[-1]}" if done else ""
                raise PassError(f"pass {p.name} failed{after}: {e}") from e
            graph = result.graph
            modified |= result.modified
            done.append(p.name)
            log.debug("pass %s: modified=%s (%.2fs)", p.name, result.modified, time.perf_counter() - t0)
        return PassResult(graph, modified)
