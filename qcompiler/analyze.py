"""A model's analysis, measured: the read-only matcher and the probe runs it asks for, in one call.

``qcompiler.match`` reads graphs and never runs them; what it cannot read from constants (head sizes,
KV maps, run-time slice bounds) it asks for as probe requests, which ``qcompiler.runtime.probe`` runs on
a copy of the graph. This module passes the results back to the matcher as data.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from qcompiler.config import MatchConfig
from qcompiler.graphio import import_graph
from qcompiler.match.analysis import match_graph
from qcompiler.runtime.probe import probe_all
from qcompiler.sites import Analysis


def analyze_graph(graph: gs.Graph, model: onnx.ModelProto, config: MatchConfig | None = None,
                  probe: bool = True) -> Analysis:
    """Match ``graph`` (imported from ``model``, which supplies metadata and opsets). ``probe``: run the
    probe for what structure cannot tell (without it, attention pairs are not found). ``graph`` is not
    changed."""
    matching = match_graph(graph, model, config)
    return matching.finish(probe_all(graph, model.opset_import, matching.requests) if probe else {})


def analyze(model: onnx.ModelProto, config: MatchConfig | None = None, probe: bool = True) -> Analysis:
    return analyze_graph(import_graph(model), model, config, probe)
