"""Site matcher v1: every MatMul/Gemm whose weight is a constant initializer.

The weight may feed the node directly, through a ``Transpose(perm=[1, 0])``, or as Gemm's ``B`` with
``transB``. Every MatMul/Gemm/Gather it does not offer carries a reason, and so does every other op with a
constant weight (a ViT's patch-embedding Conv, a ConvTranspose head, recurrent cells), so that ``inspect``
shows every weight of the model. The matcher never edits the graph.
The types it fills (``LinearSite``, ``MatchResult``, ...) live in :mod:`qcompiler.sites`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.config import MatchConfig
from qcompiler.external import read_values
from qcompiler.graphio import np_dtype
from qcompiler.kv_layout import is_past
from qcompiler.match.view import constant_value
from qcompiler.sites import LinearSite, MatchResult, QuantizedSite, Rejection

FLOAT_TYPES = (np.float32, np.float16)
# ops that may sit between a head projection and the graph output without computing anything new
_PASS_THROUGH = {"Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Add", "Flatten"}
# ops other than MatMul/Gemm/Gather that carry weights: never sites, but listed with a reason
_OTHER_WEIGHT_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "DeformConv", "Einsum", "LSTM", "GRU",
                     "RNN", "MatMulInteger", "QLinearMatMul"}
# the weight of an online transform ``x T^-1`` that the compiler inserted (passes/online_transform.py)
_ONLINE_WEIGHT_SUFFIX = "_T_inv"


def _weight_source(node: gs.Node) -> tuple[gs.Constant | None, bool, str | None]:
    """The constant behind the weight input, whether it is stored transposed, or a reason."""
    w = node.inputs[1]
    transposed = False
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None, False, "Gemm with transA"
        if float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0:
            return None, False, "Gemm with alpha/beta != 1"
        transposed = bool(node.attrs.get("transB", 0))
    if isinstance(w, gs.Constant):
        return w, transposed, None
    producer = w.inputs[0] if w.inputs else None
    if producer is not None and producer.op == "Transpose" and isinstance(producer.inputs[0], gs.Constant):
        perm = list(producer.attrs.get("perm", [1, 0]))
        if perm != [1, 0]:
            return None, False, f"weight transposed with perm {perm}"
        if len(w.outputs) > 1:
            return None, False, f"transposed weight shared with {len(w.outputs) - 1} other node(s)"
        return producer.inputs[0], not transposed, None
    if producer is None:
        return None, False, "weight is a graph input (dynamic weight)"
    return None, False, f"weight computed at run time (by {producer.op})"


def _is_head(node: gs.Node, graph_outputs: set[str]) -> bool:
    """True when the node's output reaches a graph output through pass-through ops only."""
    t = node.outputs[0]
    for _ in range(6):
        if t.name in graph_outputs:
            return True
        if len(t.outputs) != 1 or not _passes_through(t.outputs[0], t):
            return False
        t = t.outputs[0].outputs[0]
    return t.name in graph_outputs


def _passes_through(node: gs.Node, t: gs.Variable) -> bool:
    """A reshaping op, or a logit soft-cap's (Gemma 2: ``tanh(x / c) * c``) elementwise steps by a constant."""
    if node.op in _PASS_THROUGH or node.op == "Tanh":
        return True
    return node.op in ("Div", "Mul") and node.inputs[0] is t and isinstance(node.inputs[1], gs.Constant)


def _bias_of(node: gs.Node, n: int) -> str | None:
    if node.op == "Gemm" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        return node.inputs[2].name
    out = node.outputs[0]
    if len(out.outputs) == 1 and out.outputs[0].op == "Add":
        other = [t for t in out.outputs[0].inputs if t is not out]
        value = constant_value(other[0]) if other else None
        if value is not None and value.shape == (n,):
            return other[0].name
    return None


def _embedding_site(node: gs.Node, config: MatchConfig, mid: str | None) -> LinearSite | Rejection:
    table = node.inputs[0]
    if not config.quantize_embeddings:
        return Rejection(node.name, node.op, "embedding table (kept in float; --quantize-embeddings)", mid)
    if int(node.attrs.get("axis", 0)) != 0:
        return Rejection(node.name, node.op, "Gather on axis != 0", mid)
    if np.dtype(table.dtype) not in [np.dtype(t) for t in FLOAT_TYPES]:
        return Rejection(node.name, node.op, f"table dtype {np.dtype(table.dtype)} is not float32/float16", mid)
    if sum(1 for c in table.outputs if c.op == "Gather") > 1:
        return Rejection(node.name, node.op, "table read by several Gathers", mid)
    v, h = table.shape
    return LinearSite(id=mid or table.name, node=node.name, op_type="Gather", weight=table.name, transposed=True,
                      k=int(h), n=int(v), input=node.inputs[1].name, output=node.outputs[0].name, bias=None,
                      role="embedding", dtype=str(np.dtype(table.dtype)))


def _other_weight(node: gs.Node, mid: str | None) -> Rejection | None:
    """Why a non-MatMul/Gemm node with a constant weight (rank >= 2) is not a site; None without one."""
    weights = [t for t in node.inputs if isinstance(t, gs.Constant) and t.shape is not None and len(t.shape) >= 2]
    if not weights:
        return None
    w = weights[0]
    if w.name.endswith(_ONLINE_WEIGHT_SUFFIX):
        return Rejection(node.name, node.op, "online transform x T^-1 inserted by qcompiler (kept in float)", mid)
    dtype = np_dtype(w.dtype)
    kept = "kept in float" if dtype is not None and dtype.kind == "f" else f"left as {dtype}"
    return Rejection(node.name, node.op, f"not a MatMul/Gemm site: constant weight {list(w.shape)} {kept}", mid)


def reads_table(node: gs.Node) -> bool:
    """An embedding lookup: a Gather of a 2-D constant (the table)."""
    return node.op == "Gather" and isinstance(node.inputs[0], gs.Constant) and len(node.inputs[0].shape) == 2


def serves_tokens(graph: gs.Graph) -> bool:
    """A KV-cache decoder: a graph with ``past_key_values.*`` inputs."""
    return any(is_past(t.name) for t in graph.inputs)


def head_is_quantized(graph: gs.Graph, config: MatchConfig) -> bool:
    """``MatchConfig.quantize_lm_head``, where None means: yes for a decoder that serves tokens (a graph with
    ``past_key_values.*`` inputs reads the whole head every token), no for any other graph."""
    if config.quantize_lm_head is not None:
        return config.quantize_lm_head
    return serves_tokens(graph)


def find_linear_sites(
    graph: gs.Graph, config: MatchConfig | None = None, module_paths: dict[str, str] | None = None
) -> MatchResult:
    config = config or MatchConfig()
    module_paths = module_paths or {}
    graph_outputs = {t.name for t in graph.outputs}
    quantize_head = head_is_quantized(graph, config)
    sites: list[LinearSite] = []
    rejected: list[Rejection] = []
    for node in graph.nodes:
        if reads_table(node):
            emb = _embedding_site(node, config, module_paths.get(node.name))
            if isinstance(emb, Rejection):
                rejected.append(emb)
            else:
                sites.append(emb)
            continue
        mid = module_paths.get(node.name)
        if node.op in _OTHER_WEIGHT_OPS:
            other = _other_weight(node, mid)
            if other is not None:
                rejected.append(other)
            continue
        if node.op not in ("MatMul", "Gemm"):
            continue
        const, transposed, reason = _weight_source(node)
        if const is None:
            rejected.append(Rejection(node.name, node.op, reason or "no constant weight", mid))
            continue
        shape = tuple(const.shape)
        if len(shape) != 2:
            online = const.name.endswith(_ONLINE_WEIGHT_SUFFIX)
            rejected.append(Rejection(node.name, node.op, "online transform x T^-1 inserted by qcompiler (kept in "
                                      "float)" if online else f"weight has rank {len(shape)}, not 2", mid))
            continue
        dtype = np_dtype(const.dtype)
        if dtype not in [np.dtype(t) for t in FLOAT_TYPES]:
            rejected.append(Rejection(node.name, node.op, f"weight dtype {dtype} is not float32/float16", mid))
            continue
        a = node.inputs[0]
        if a.shape is not None and len(a.shape) < 2 and node.op == "MatMul":
            rejected.append(Rejection(node.name, node.op, "activation has rank < 2", mid))
            continue
        k, n = (shape[1], shape[0]) if transposed else shape
        head = _is_head(node, graph_outputs)
        own = node if any(t is const for t in node.inputs) else node.inputs[1].inputs[0]
        consumers = [c for c in const.outputs if c is not own]
        if consumers:
            tied = any(c.op in ("Gather", "Transpose") for c in consumers)
            if not (head and tied and quantize_head):
                what = "tied with the embedding" if tied else f"shared with {len(consumers)} other node(s)"
                rejected.append(Rejection(node.name, node.op, f"weight {what}", mid))
                continue
        if head and not quantize_head:
            why = (config.head_float_reason or "--no-quantize-lm-head" if config.quantize_lm_head is False
                   else "not a KV-cache decoder; --quantize-lm-head quantizes it")
            rejected.append(Rejection(node.name, node.op, f"output head (kept in float: {why})", mid))
            continue
        sites.append(LinearSite(
            id=mid or const.name, node=node.name, op_type=node.op, weight=const.name,
            transposed=transposed, k=int(k), n=int(n), input=a.name, output=node.outputs[0].name,
            bias=_bias_of(node, int(n)), role="head" if head else "linear", dtype=str(dtype),
        ))
    return MatchResult(tuple(_unique_ids(sites)), tuple(rejected))


def _unique_ids(sites: list[LinearSite]) -> list[LinearSite]:
    counts = Counter(s.id for s in sites)
    seen: Counter[str] = Counter()
    out = []
    for s in sites:
        if counts[s.id] > 1:
            seen[s.id] += 1
            s = LinearSite(**{**s.__dict__, "id": f"{s.id}#{seen[s.id]}"})
        out.append(s)
    return out




def weight_reader(graph: gs.Graph):
    """A function site -> its weight as ``[K, N]`` float32 (MatMul layout); indexes the graph once."""
    tensors = graph.tensors()

    def read(site: LinearSite) -> np.ndarray:
        w = np.asarray(read_values(tensors[site.weight]), dtype=np.float32)
        return np.ascontiguousarray(w.T) if site.transposed else w

    return read


def site_weight(graph: gs.Graph, site: LinearSite) -> np.ndarray:
    """One site's weight; use ``weight_reader`` for many."""
    return weight_reader(graph)(site)


def _producer_op(t: gs.Tensor) -> str | None:
    return t.inputs[0].op if t.inputs else None


def find_quantized_sites(graph: gs.Graph, module_paths: dict[str, str] | None = None) -> list[QuantizedSite]:
    """Every quantized linear map of a graph, as sites (``W`` shape ``[K, N]``)."""
    module_paths = module_paths or {}
    graph_outputs = {t.name for t in graph.outputs}
    found: list[QuantizedSite] = []
    for node in graph.nodes:
        mid = module_paths.get(node.name)
        if node.op == "MatMulNBits":
            k, n = int(node.attrs["K"]), int(node.attrs["N"])
            bits, block = int(node.attrs.get("bits", 4)), int(node.attrs["block_size"])
            zp = len(node.inputs) > 3 and node.inputs[3].name != ""
            dtype = str(np.dtype(node.inputs[2].dtype)) if node.inputs[2].dtype is not None else "float32"
            site = LinearSite(id=mid or node.inputs[1].name, node=node.name, op_type="MatMulNBits",
                              weight=node.inputs[1].name, transposed=True, k=k, n=n, input=node.inputs[0].name,
                              output=node.outputs[0].name, bias=_bias_of(node, n),
                              role="head" if _is_head(node, graph_outputs) else "linear", dtype=dtype)
            found.append(QuantizedSite(site, "MatMulNBits", bits, block, not zp))
        elif node.op in ("MatMul", "Gemm") and _producer_op(node.inputs[1]) == "DequantizeLinear":
            dq = node.inputs[1].inputs[0]
            q = dq.inputs[0]
            if not isinstance(q, gs.Constant) or len(q.shape) != 2:
                continue
            k, n = (int(d) for d in q.shape)
            bits = 4 if "int4" in str(q.dtype).lower() else 8
            zp = len(dq.inputs) > 2 and dq.inputs[2].name != ""
            sdt = dq.inputs[1].dtype
            site = LinearSite(id=mid or q.name, node=node.name, op_type=node.op, weight=q.name, transposed=False,
                              k=k, n=n, input=node.inputs[0].name, output=node.outputs[0].name,
                              bias=_bias_of(node, n), role="head" if _is_head(node, graph_outputs) else "linear",
                              dtype=str(np.dtype(sdt)) if sdt is not None else "float32")
            found.append(QuantizedSite(site, "DequantizeLinear", bits, int(dq.attrs.get("block_size", 0)), not zp))
    return found


def float_weight_bytes(graph: gs.Graph, sites: Sequence[LinearSite]) -> int:
    """Bytes of the constant weights that MatMul/Gemm nodes other than ``sites`` read (they stay in
    float: an output head, rejected candidates). A batch-1 token step reads all of them."""
    quantized = {s.node for s in sites}
    total = 0
    for node in graph.nodes:
        if node.op in ("MatMul", "Gemm") and node.name not in quantized and len(node.inputs) > 1:
            const, _, _ = _weight_source(node)
            dtype = np_dtype(const.dtype) if const is not None else None
            if dtype is not None and const.shape is not None:
                total += int(np.prod(const.shape)) * dtype.itemsize
    return total
