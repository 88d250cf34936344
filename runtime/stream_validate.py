"""Validation of a streamed compile: the original and the compiled model run side by side, one stretch at
a time, so that only one stretch's weights are in memory.

The original's nodes are cut before given nodes (the first site of every chunk). The tensors alive across
a cut (produced before it and read after it: the residual stream, masks, rotary tables) are the *state*
there; both models keep those names, since passes only rewrite the sites between them. For each stretch,
each model's nodes that compute the next state from the current one are found by walking back from the
next state, and run as a small model whose initializers are read from their files just for it. The
original's state and the compiled model's state advance separately; the final outputs are compared.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qcompiler.errors import QCompilerError
from qcompiler.external import external_info, inline_copy
from qcompiler.metadata import transformed_caches
from qcompiler.runtime.segments import node_inputs, value_types
from qcompiler.runtime.session import SessionOptions, make_session
from qcompiler.runtime.validate import ValidationResult, compare

log = logging.getLogger(__name__)


class StreamValidationError(QCompilerError):
    """The two models cannot be cut at the same tensors (a pass renamed a state tensor)."""


def cut_states(model: onnx.ModelProto, cuts: Sequence[str]) -> list[list[str]]:
    """For every cut (a node name of ``model``) the state there, in graph order; and the final outputs."""
    nodes = list(model.graph.node)
    position = {n.name: i for i, n in enumerate(nodes)}
    inits = {t.name for t in model.graph.initializer}
    produced_at: dict[str, int] = {i.name: -1 for i in model.graph.input if i.name not in inits}
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in node_inputs(n):
            last_use[t] = i
        for t in n.output:
            if t:
                produced_at[t] = i
    for o in model.graph.output:
        last_use[o.name] = len(nodes)
    states = []
    for p in sorted({position[c] for c in cuts if c in position}):
        states.append(sorted(t for t, at in produced_at.items() if at < p and last_use.get(t, -1) >= p))
    states.append([o.name for o in model.graph.output])
    return states


def shared_cuts(original: onnx.ModelProto, compiled: onnx.ModelProto, cuts: Sequence[str]) -> list[str]:
    """``cuts`` moved earlier where the state there holds a tensor the compiled model no longer has (an online
    transform took in the norm gain's ``Mul`` that made its input): to just before that tensor's producer,
    until every state tensor exists in both models."""
    have = {o for n in compiled.graph.node for o in n.output} | {i.name for i in compiled.graph.input}
    have |= {t.name for t in compiled.graph.initializer}
    producer = {o: n.name for n in original.graph.node for o in n.output if o}
    position = {n.name: i for i, n in enumerate(original.graph.node)}
    at = sorted({position[c] for c in cuts if c in position})
    state_at = dict(zip(at, cut_states(original, cuts), strict=False))  # one pass for the cuts as given
    out = []
    for cut in cuts:
        while cut is not None:
            state = state_at.get(position[cut]) if cut in position else []
            if state is None:
                state = cut_states(original, [cut])[0]
            missing = [t for t in state if t not in have]
            if not missing:
                out.append(cut)
                break
            cut = min((producer[t] for t in missing if t in producer), key=position.__getitem__, default=None)
    return out


def data_sources(model: onnx.ModelProto, folder: str | os.PathLike | None) -> dict[str, Path]:
    """Each external data file ``model`` names -> its path in ``folder`` (none for a model held in memory)."""
    locations = {external_info(t).get("location", "") for t in model.graph.initializer
                 if t.data_location == onnx.TensorProto.EXTERNAL}
    return {loc: Path(folder) / loc for loc in locations} if folder is not None else {}


class Stretcher:
    """Runs stretches of one model: the nodes that compute ``targets`` from ``state``."""

    def __init__(self, model: onnx.ModelProto, sources: Mapping[str, Path], options: SessionOptions,
                 types: Mapping[str, onnx.TypeProto]):
        self.model, self.sources, self.options, self.types = model, sources, options, types
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.order = {id(n): i for i, n in enumerate(model.graph.node)}

    def _initializer(self, name: str) -> onnx.TensorProto:
        t = self.inits[name]
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return t
        path = self.sources.get(external_info(t).get("location", ""))
        if path is None:
            raise StreamValidationError(f"no file for the external data of {name!r}")
        return inline_copy(t, path)

    def _output(self, name: str) -> onnx.ValueInfoProto:
        tp = self.types.get(name)
        if tp is None:
            raise StreamValidationError(f"no type known for tensor {name!r}")
        return onnx.helper.make_tensor_value_info(name, tp.tensor_type.elem_type, None)

    def run(self, state: Mapping[str, np.ndarray], targets: Sequence[str]) -> dict[str, np.ndarray]:
        out = {t: state[t] for t in targets if t in state}
        todo = [t for t in targets if t not in state]
        if not todo:
            return out
        keep, need, seen, kept = [], list(todo), set(todo), set()
        while need:
            t = need.pop()
            if t in state or t in self.inits or t == "":
                continue
            node = self.producer.get(t)
            if node is None:
                raise StreamValidationError(f"tensor {t!r} is neither computed nor in the state")
            if id(node) in kept:
                continue
            kept.add(id(node))
            keep.append(node)
            for i in node_inputs(node):
                if i not in seen:
                    seen.add(i)
                    need.append(i)
        keep.sort(key=lambda n: self.order[id(n)])
        reads = sorted({i for n in keep for i in node_inputs(n)})
        inputs = [i for i in reads if i in state]
        # large weights read by standard ops are fed, not embedded: ONNX Runtime then uses the array as is
        # (an initializer would be copied by serialisation, by the session and again by pre-packing)
        standard = {i for i in reads if all(n.domain in ("", "ai.onnx") for n in keep if i in node_inputs(n))}
        fed = {i: self._array(i) for i in reads if i in self.inits and i not in state and i in standard
               and self.inits[i].data_location == onnx.TensorProto.EXTERNAL}
        graph = onnx.helper.make_graph(
            keep, "stretch",
            [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(state[i].dtype),
                                                [f"{i}:{d}" for d in range(state[i].ndim)]) for i in inputs]
            + [onnx.helper.make_tensor_value_info(i, self.inits[i].data_type, list(self.inits[i].dims)) for i in fed],
            [self._output(t) for t in todo],
            initializer=[self._initializer(i) for i in reads if i in self.inits and i not in state and i not in fed])
        sub = onnx.helper.make_model(graph, opset_imports=list(self.model.opset_import))
        sub.ir_version = self.model.ir_version
        sub.functions.extend(self.model.functions)
        session = make_session(sub, self.options)
        feeds = {i: state[i] for i in inputs}
        feeds.update(fed)
        out.update(zip(todo, session.run(list(todo), feeds), strict=True))
        return out

    def _array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self._initializer(name))


def validate_streamed(original: onnx.ModelProto, original_dir: str | os.PathLike, compiled: onnx.ModelProto,
                      compiled_sources: Mapping[str, Path], cuts: Sequence[str], feeds: Mapping[str, np.ndarray],
                      options: SessionOptions | None = None, label: str = "") -> ValidationResult:
    """Both models on ``feeds``, cut before each node of ``cuts`` (names in ``original``); models keep their
    external data references (``original``: relative to ``original_dir``; ``compiled``: ``compiled_sources``)."""
    options = options or SessionOptions(device="cpu")
    orig_sources = data_sources(original, original_dir)
    types = value_types(original)  # state tensors have the same names and types in both (contrib ops defeat
    a = Stretcher(original, orig_sources, options, types)  # ONNX's shape inference on the compiled one)
    b = Stretcher(compiled, compiled_sources, options, types)
    state_a = {k: np.asarray(v) for k, v in feeds.items()}
    state_b = dict(state_a)
    states = cut_states(original, shared_cuts(original, compiled, cuts))
    for i, targets in enumerate(states):
        state_a = a.run(state_a, targets)
        state_b = b.run(state_b, targets)
        log.debug("stretch %d/%d: %d state tensors", i + 1, len(states), len(targets))
    skip = transformed_caches(compiled)  # V's cache in the pair transforms' basis: different by design
    return ValidationResult(tuple(compare(state_b[o], state_a[o], o) for o in states[-1] if o not in skip), label)
