"""Half-precision models: ``PrecisionPass("float16")`` turns a float32 graph into one whose activations,
weights, scales and float inputs/outputs are float16 (or bfloat16), but for a few float32 islands.

Outside the islands:
- float32 constants (initializers, ``Constant``/``ConstantOfShape`` values) become the target type. Finite
  values are clipped to its range (the fp32 attention-mask fill -3.4e38 becomes -65504, the fill Hugging Face
  uses in fp16), and a nonzero value below its smallest subnormal becomes that subnormal, not zero;
- ``Cast(to=float)`` and ``dtype=float`` attributes (EyeLike, Random*) are retargeted;
- float graph inputs and outputs change type: the KV cache (``past_key_values.*``/``present.*``) takes half
  the bytes, and the logits come out in the target type, as in onnxruntime-genai's fp16 models. No Cast at
  the edges: a caller feeds what the graph declares (``runtime.inputs`` builds feeds from those types);
- MatMulNBits and DequantizeLinear follow their scales (constants): their outputs are the target type.

The islands (what Hugging Face's fp16 Llama, Qwen2 and Gemma2 compute in fp32 too):
- a norm's statistics: ``Pow(x, 2) -> ReduceMean`` (or ReduceSum; ReduceSumSquare, ReduceL2) and the chain of
  ops with constant operands after it (``Add(eps) -> Sqrt -> Reciprocal``). ``x^2`` overflows fp16 above
  |x| = 256, which LLM residual streams reach, and eps = 1e-6 lies below fp16's normal range;
- rotary angles: what a ``Cos``/``Sin`` is computed from (``Cast(positions) -> Mul(inv_freq)``), when that
  starts from integers and constants alone. fp16 holds integers exactly only up to 2048, and an angle of
  1000 rad has a spacing of 0.5 there.
An island reads a ``Cast(to=float)`` of each fp16 tensor it needs, and its results leave through a Cast.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.graphio import np_dtype
from qcompiler.passes.base import Pass, PassError, PassResult

TARGETS = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_F32 = np.dtype(np.float32)
_FLOAT = onnx.TensorProto.FLOAT
_REDUCE_OF_SQUARES = ("ReduceMean", "ReduceSum")  # reading Pow(x, 2) or Mul(x, x)
_REDUCE_SQUARES = ("ReduceSumSquare", "ReduceL2")
_NORM_TAIL = ("Add", "Sqrt", "Reciprocal", "Div", "Max", "Clip", "Mul")  # with constant other operands
_ANGLES = ("Cos", "Sin")
_MAX_ANGLE_NODES = 64  # a Cos/Sin computed from more than this is not a rotary table: left alone
_FIXED_FLOAT = {"Resize": (2,), "Upsample": (1,)}  # inputs that are tensor(float) by the op's definition
_BOOL_OPS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN", "IsInf"}
_INT64_OPS = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}




def _output_dtype(node: gs.Node, index: int, known: dict[str, np.dtype | None]) -> np.dtype | None:
    """The element type of ``node.outputs[index]`` from its inputs' (for graphs without value_info)."""
    def of(i: int) -> np.dtype | None:
        return known.get(node.inputs[i].name) if len(node.inputs) > i else None
    op = node.op
    if op == "Cast":
        return np_dtype(node.attrs.get("to"))
    if op in _INT64_OPS or (op == "TopK" and index == 1):
        return np.dtype(np.int64)
    if op in _BOOL_OPS:
        return np.dtype(np.bool_)
    if op in ("Constant", "ConstantOfShape"):
        value = node.attrs.get("value")
        return np_dtype(value.dtype) if isinstance(value, gs.Constant) else _F32
    if "dtype" in node.attrs:  # EyeLike, RandomNormal(Like), ...
        return np_dtype(node.attrs["dtype"])
    if op == "DequantizeLinear":
        return of(1)
    if op == "Where":
        return of(1)
    return next((of(i) for i in range(len(node.inputs)) if of(i) is not None), None)


def float32_tensors(graph: gs.Graph) -> set[str]:
    """Names of ``graph``'s float32 tensors: types as the graph records them, else propagated (toposorts)."""
    known = {name: np_dtype(t.dtype) for name, t in graph.tensors().items()}
    graph.toposort()
    for node in graph.nodes:
        for i, out in enumerate(node.outputs):
            if known.get(out.name) is None:
                known[out.name] = _output_dtype(node, i, known)
    return {name for name, d in known.items() if d == _F32}


def _is_square(t: gs.Tensor) -> bool:
    p = t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None
    if p is None:
        return False
    if p.op == "Mul":
        return p.inputs[0] is p.inputs[1]
    return p.op == "Pow" and isinstance(p.inputs[1], gs.Constant) and bool(np.all(p.inputs[1].values == 2))


def _norm_statistics(node: gs.Node) -> list[gs.Node]:
    """A reduction of squares and the chain of constant-operand ops after it; [] for any other node."""
    if node.op in _REDUCE_SQUARES:
        chain = [node]
    elif node.op in _REDUCE_OF_SQUARES and _is_square(node.inputs[0]):
        chain = [node.inputs[0].inputs[0], node]
    else:
        return []
    cur = node.outputs[0]
    while len(cur.outputs) == 1:
        nxt = cur.outputs[0]
        others = [t for t in nxt.inputs if t is not cur and t.name]
        if nxt.op not in _NORM_TAIL or not all(isinstance(t, gs.Constant) for t in others):
            break
        chain.append(nxt)
        cur = nxt.outputs[0]
    return chain


def _angle_sources(node: gs.Node, f32: set[str]) -> list[gs.Node]:
    """``node`` (a Cos/Sin) and every node its float input is computed from, when no float graph input is
    among them (rotary angles come from integer positions and constants); [] otherwise."""
    found, stack = {id(node): node}, [node]
    while stack:
        for t in stack.pop().inputs:
            if isinstance(t, gs.Constant) or t.name not in f32:
                continue
            if not t.inputs:
                return []
            p = t.inputs[0]
            if id(p) not in found:
                found[id(p)] = p
                stack.append(p)
                if len(found) > _MAX_ANGLE_NODES:
                    return []
    return list(found.values())


def fp32_islands(graph: gs.Graph, f32: set[str]) -> list[gs.Node]:
    """The nodes kept in float32: norm statistics and rotary angles (module docstring)."""
    keep: dict[int, gs.Node] = {}
    for node in graph.nodes:
        chain = _norm_statistics(node) or (_angle_sources(node, f32) if node.op in _ANGLES else [])
        keep.update((id(n), n) for n in chain)
    return list(keep.values())


def convert_values(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 -> ``dtype``: finite values clipped to its range, nonzero ones kept nonzero; inf/nan kept."""
    v = np.asarray(values, dtype=np.float32)
    info = ml_dtypes.finfo(dtype)
    finite = np.isfinite(v)
    out = np.where(finite, np.clip(v, float(info.min), float(info.max)), v)
    tiny = finite & (v != 0) & (np.abs(v) < float(info.smallest_subnormal))
    out = np.where(tiny, np.sign(v) * float(info.smallest_subnormal), out)
    return np.ascontiguousarray(out.astype(dtype))


class PrecisionPass(Pass):
    """float32 -> ``dtype`` (float16 or bfloat16) but for the float32 islands (``keep_fp32=False``: none).

    After ``call``: ``kept`` names the nodes left in float32, ``casts`` counts the Casts added at their edges.
    """

    def __init__(self, dtype: str = "float16", keep_fp32: bool = True):
        if dtype not in TARGETS:
            raise PassError(f"precision must be one of {', '.join(TARGETS)}, got {dtype!r}")
        self.dtype, self.keep_fp32 = dtype, keep_fp32
        self.target = TARGETS[dtype]
        self.onnx_type = onnx.helper.np_dtype_to_tensor_dtype(self.target)
        self.suffix = {"float16": "fp16", "bfloat16": "bf16"}[dtype]
        self.kept: tuple[str, ...] = ()
        self.casts = 0
        self._island: set[int] = set()
        self._edges: set[int] = set()

    def requires(self, graph: gs.Graph) -> None:
        nested = [n.name for n in graph.nodes if any(isinstance(v, gs.Graph) for v in n.attrs.values())]
        if nested:
            raise PassError(f"nodes with subgraphs (If/Loop/Scan) are not converted: {nested[:3]}")

    def call(self, graph: gs.Graph) -> PassResult:
        f32 = float32_tensors(graph)
        self.kept, self.casts, self._island, self._edges = (), 0, set(), set()
        if not f32:
            return PassResult(graph, False)
        island = fp32_islands(graph, f32) if self.keep_fp32 else []
        kept = {id(n) for n in island}
        names = set(graph.tensors())
        counter = itertools.count()

        def fresh(base: str) -> str:
            name = base
            while name in names:
                name = f"{base}_{next(counter)}"
            names.add(name)
            return name

        added: list[gs.Node] = []

        def cast(src: gs.Tensor, dst: gs.Tensor, to: int, at: str) -> None:
            added.append(gs.Node("Cast", name=fresh(f"{at}_cast_{'fp32' if to == _FLOAT else self.suffix}"),
                                 attrs={"to": to}, inputs=[src], outputs=[dst]))

        graph_outputs = {id(t) for t in graph.outputs}
        for node in island:  # results read outside the island leave through a Cast to the target
            for i, out in enumerate(node.outputs):
                if out.name not in f32:
                    continue
                if all(id(c) in kept for c in out.outputs) and id(out) not in graph_outputs:
                    continue
                inner = gs.Variable(fresh(f"{out.name}_fp32"), dtype=_F32, shape=out.shape)
                for c in list(out.outputs):
                    if id(c) in kept:
                        for k, t in enumerate(c.inputs):
                            if t is out:
                                c.inputs[k] = inner
                node.outputs[i] = inner
                cast(inner, out, self.onnx_type, node.name)
        widened: dict[str, gs.Variable] = {}
        for node in island:  # and read a Cast to float32 of each tensor from outside it
            for j, t in enumerate(node.inputs):
                if isinstance(t, gs.Constant) or t.name not in f32 or (t.inputs and id(t.inputs[0]) in kept):
                    continue
                if t.name not in widened:
                    widened[t.name] = gs.Variable(fresh(f"{t.name}_fp32"), dtype=_F32, shape=t.shape)
                    cast(t, widened[t.name], _FLOAT, t.name)
                node.inputs[j] = widened[t.name]

        island_reads = {id(t) for n in island for t in n.inputs if isinstance(t, gs.Constant)}
        converted: dict[int, gs.Constant] = {}

        def narrow(c: gs.Constant) -> gs.Constant:
            if id(c) not in converted:
                name = fresh(f"{c.name}_{self.suffix}") if id(c) in island_reads else c.name
                converted[id(c)] = gs.Constant(name, convert_values(c.values, self.target))
            return converted[id(c)]

        for node in graph.nodes:
            if id(node) in kept:
                continue
            fixed = _FIXED_FLOAT.get(node.op, ())
            for j, t in enumerate(node.inputs):
                if isinstance(t, gs.Constant) and j not in fixed and np_dtype(t.dtype) == _F32:
                    node.inputs[j] = narrow(t)
            if node.op == "Cast" and node.attrs.get("to") == _FLOAT:
                node.attrs["to"] = self.onnx_type
            if node.attrs.get("dtype") == _FLOAT:
                node.attrs["dtype"] = self.onnx_type
            value = node.attrs.get("value")
            if node.op in ("Constant", "ConstantOfShape") and isinstance(value, gs.Constant) \
                    and np_dtype(value.dtype) == _F32:
                node.attrs["value"] = gs.Constant(value.name, convert_values(value.values, self.target))
            for attr in ("value_float", "value_floats"):  # a Constant node's plain float value
                if node.op == "Constant" and attr in node.attrs:
                    v = np.asarray(node.attrs.pop(attr), dtype=np.float32)
                    node.attrs["value"] = gs.Constant(fresh(node.name + "_value"), convert_values(v, self.target))
        graph.nodes.extend(added)
        for t in list(graph.tensors().values()) + list(graph.inputs) + list(graph.outputs):
            if isinstance(t, gs.Variable) and t.name in f32 and not (t.inputs and id(t.inputs[0]) in kept):
                t.dtype = self.target
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        self.kept = tuple(n.name for n in island)
        self.casts = len(added)
        self._island, self._edges = kept, {id(n) for n in added}
        return PassResult(graph, True)

    def ensures(self, graph: gs.Graph) -> None:
        for node in graph.nodes:
            if id(node) in self._island or id(node) in self._edges:
                continue
            fixed = _FIXED_FLOAT.get(node.op, ())
            tensors = [t for j, t in enumerate(node.inputs) if j not in fixed] + list(node.outputs)
            for t in tensors:
                if np_dtype(t.dtype) == _F32:
                    raise PassError(f"{node.name} ({node.op}) still has the float32 tensor {t.name}")
