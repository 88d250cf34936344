"""Running a model one stretch at a time: the engine of the calibration driver.

Every quantizable site's weight becomes an input of the graph (``[K, N]``, MatMul layout), so one
session runs a stretch with float or with quantized weights. The graph's nodes, in topological
order, are cut before each *group* of sites that read the same tensor (q/k/v, o, gate/up, down, ...).
The tensors alive across a cut (produced before it, read after it: the residual stream, the group's
input, masks, rotary tables) are the *state* there, and a segment is the sub-model that maps the
state at one cut to the state at the next. Nothing here knows about layers or architectures: any
graph whose sites the matcher found can be cut this way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from qcompiler.errors import QCompilerError
from qcompiler.graphio import import_graph
from qcompiler.runtime.session import SessionOptions, make_session
from qcompiler.sites import LinearSite

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Group:
    """Sites that read one tensor, quantized together at one cut."""

    input: str  # the tensor they read (their X)
    sites: tuple[str, ...]  # site ids, in graph order
    position: int  # index of the first site's node: the cut


def node_inputs(node: onnx.NodeProto) -> set[str]:
    """Inputs of a node, with the outer-scope names its subgraphs read."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input}
            for n in g.node:
                names |= {i for i in node_inputs(n) if i not in inner}
    return names


def value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Name -> type of every typed tensor of ``model`` (shape inference where it runs, else the recorded types)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - large or unusual models: fall back to the recorded types
        inferred = model
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type
    return out


def _value_info(name: str, tp: onnx.TypeProto) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto()
    vi.name = name
    vi.type.tensor_type.elem_type = tp.tensor_type.elem_type
    if tp.tensor_type.HasField("shape"):  # the rank; every dimension symbolic (they vary with the batch)
        shape = vi.type.tensor_type.shape
        for i, _ in enumerate(tp.tensor_type.shape.dim):
            shape.dim.add().dim_param = f"{name}:{i}"
    return vi


def _fold_constants(model: onnx.ModelProto, types: Mapping[str, onnx.TypeProto]) -> onnx.ModelProto:
    """Evaluate once the nodes that read only initializers (a tied head's transposed embedding table, rotary
    tables, ...) and store what the rest of the graph reads as initializers: they would otherwise be
    carried in every state at every cut."""
    g = model.graph
    const = {t.name for t in g.initializer}
    nodes, rest = [], []
    for n in g.node:
        ins = node_inputs(n)
        if not n.op_type.startswith("Random") and all(i in const for i in ins):
            nodes.append(n)
            const |= {o for o in n.output if o}
        else:
            rest.append(n)
    produced = {o for n in nodes for o in n.output if o}
    read = {i for n in rest for i in node_inputs(n)} | {o.name for o in g.output}
    needed = sorted(produced & read)
    if not needed or any(t not in types for t in needed):
        return model
    inits = {t.name: t for t in g.initializer}
    used = {i for n in nodes for i in node_inputs(n) if i in inits}
    sub = onnx.helper.make_graph(nodes, "constants", [], [_value_info(t, types[t]) for t in needed],
                                 initializer=[inits[t] for t in sorted(used)])
    sub_model = onnx.helper.make_model(sub, opset_imports=list(model.opset_import))
    sub_model.ir_version = model.ir_version
    sub_model.functions.extend(model.functions)
    values = make_session(sub_model, SessionOptions(device="cpu")).run(needed, {})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(rest)
    out.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), t) for t, v in zip(needed, values, strict=True))
    keep = {i for n in rest for i in node_inputs(n)} | {o.name for o in g.output}
    live_inits = [t for t in out.graph.initializer if t.name in keep]
    del out.graph.initializer[:]
    out.graph.initializer.extend(live_inits)
    return out


class SegmentedModel:
    """``model`` with every site's weight as an input, cut before each group of sites."""

    def __init__(self, model: onnx.ModelProto, sites: Sequence[LinearSite]):
        graph = import_graph(model)
        nodes = {n.name: n for n in graph.nodes}
        self.weight_inputs: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        for i, site in enumerate(sites):
            node = nodes.get(site.node)
            if node is None or site.op_type not in ("MatMul", "Gemm"):
                raise QCompilerError(f"calibration: site {site.id} is not a MatMul/Gemm of the graph")
            var = gs.Variable(f"qc.calib.w{i}", dtype=np.dtype(site.dtype), shape=[site.k, site.n])
            node.inputs[1] = var
            if node.op == "Gemm":
                node.attrs["transB"] = 0
            graph.inputs.append(var)
            self.weight_inputs[site.id] = var.name
            self.shapes[site.id] = (site.k, site.n)
            self.dtypes[site.id] = np.dtype(site.dtype)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        self.model = gs.export_onnx(graph, do_type_check=False)
        del self.model.opset_import[:]
        self.model.opset_import.extend(model.opset_import)
        self.model.ir_version = model.ir_version
        types = value_types(self.model)
        self.model = _fold_constants(self.model, types)
        g = self.model.graph
        self._nodes = list(g.node)
        self._inits = {t.name: t for t in g.initializer}
        self._feeds = set(self.weight_inputs.values())
        self._weight_vi = {vi.name: vi for vi in g.input if vi.name in self._feeds}
        self._graph_inputs = [i.name for i in g.input if i.name not in self._inits and i.name not in self._feeds]
        self._types = types
        self._producer: dict[str, int] = {}
        self._last_use: dict[str, int] = {}
        self._inputs_of = [node_inputs(n) for n in self._nodes]
        for idx, n in enumerate(self._nodes):
            for t in self._inputs_of[idx]:
                self._last_use[t] = idx
            for t in n.output:
                if t:
                    self._producer[t] = idx
        position = {n.name: i for i, n in enumerate(self._nodes)}
        by_input: dict[str, list[tuple[int, str]]] = {}
        for site in sites:
            node = self._nodes[position[site.node]]
            by_input.setdefault(node.input[0], []).append((position[site.node], site.id))
        self.groups = tuple(sorted((Group(x, tuple(s for _, s in sorted(v)), min(p for p, _ in v))
                                    for x, v in by_input.items()), key=lambda grp: grp.position))

    @property
    def graph_inputs(self) -> list[str]:
        return list(self._graph_inputs)

    def live(self, position: int | None) -> list[str]:
        """Tensors produced before ``position`` (or graph inputs) and read at or after it."""
        if position is None:
            return []
        out = [t for t in self._graph_inputs if self._last_use.get(t, -1) >= position]
        out += sorted(t for t, p in self._producer.items() if p < position and self._last_use.get(t, -1) >= position)
        return out

    def segment(self, start: int, stop: int | None, only: Sequence[str] | None = None) -> Segment:
        """The sub-model from the state at ``start`` to the state at ``stop`` (None: nothing after); with
        ``only``, a probe: it computes just those tensors (produced in the stretch), nothing is carried."""
        end = len(self._nodes) if stop is None else stop
        if only is not None:
            bad = [t for t in only if not start <= self._producer.get(t, -1) < end]
            if bad:
                raise QCompilerError(f"calibration: {bad[0]} is not computed between the cuts {start} and {end}")
        outputs = list(only) if only is not None else [
            t for t in self.live(stop) if start <= self._producer.get(t, -1) < end]
        need, keep = set(outputs), []
        for idx in range(end - 1, start - 1, -1):
            n = self._nodes[idx]
            if any(o in need for o in n.output):
                keep.append(idx)
                need |= self._inputs_of[idx]
        keep.reverse()
        produced = {o for i in keep for o in self._nodes[i].output}
        inputs = sorted(t for t in need if t not in produced and t not in self._inits)
        missing = [t for t in inputs + outputs if t not in self._types and t not in self._feeds]
        if missing:
            raise QCompilerError(f"calibration: no type known for tensor(s) {', '.join(missing[:3])}")
        types = dict(self._types)
        inits = sorted({t for i in keep for t in self._inputs_of[i] if t in self._inits})
        graph = onnx.helper.make_graph(
            [self._nodes[i] for i in keep], f"segment_{start}",
            [_value_info(t, types[t]) for t in inputs if t not in self._feeds]
            + [self._weight_vi[t] for t in inputs if t in self._feeds],
            [_value_info(t, types[t]) for t in outputs],
            initializer=[self._inits[t] for t in inits])
        model = onnx.helper.make_model(graph, opset_imports=list(self.model.opset_import))
        model.ir_version = self.model.ir_version
        model.functions.extend(self.model.functions)
        carried = [] if only is not None else [t for t in self.live(stop) if t not in outputs]
        return Segment(model, tuple(t for t in inputs if t not in self._feeds),
                       tuple(t for t in inputs if t in self._feeds), tuple(outputs), tuple(carried))


@dataclass(frozen=True)
class Segment:
    model: onnx.ModelProto
    inputs: tuple[str, ...]  # state tensors it reads
    weights: tuple[str, ...]  # weight inputs it reads
    outputs: tuple[str, ...]  # state tensors it produces
    carried: tuple[str, ...]  # state tensors alive after it that it does not produce (passed through)

    def runner(self, options: SessionOptions | None = None) -> SegmentRunner:
        return SegmentRunner(self, options)


class SegmentRunner:
    def __init__(self, segment: Segment, options: SessionOptions | None = None):
        self.segment = segment
        self.session = make_session(segment.model, options) if segment.outputs else None

    def __call__(self, state: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> State:
        """The state after the segment (carried tensors are passed through, not copied)."""
        s = self.segment
        new: State = {t: state[t] for t in s.carried}
        if self.session is not None:
            feeds = {t: state[t] for t in s.inputs}
            feeds.update({t: weights[t] for t in s.weights})
            new.update(zip(s.outputs, self.session.run(list(s.outputs), feeds), strict=True))
        return new
