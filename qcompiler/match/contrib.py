"""V·O pairs through ONNX Runtime's attention contrib ops (``com.microsoft``), read from their attributes.

onnxruntime-genai's model builder writes attention as one ``GroupQueryAttention`` node: the packed QKV
projection's output is its ``query`` input (``key`` and ``value`` empty), or three projections feed
``query``/``key``/``value``; it applies rotary embeddings to Q and K only, appends K and V to the past
(``past_key`` / ``past_value`` in, ``present_key`` / ``present_value`` out) and returns the heads
concatenated, which the output projection O reads. V's channels are then the last ``kv_num_heads x
head_size`` columns of the packed projection (or the whole ``value`` projection), query head ``j`` reads
KV head ``j // (num_heads / kv_num_heads)``, and the head size is the packed width over
``num_heads + 2 kv_num_heads``: everything the probe measures for a plain-op graph is in the attributes,
so these pairs need no probe run. ``MultiHeadAttention`` (separate Q, K, V of ``num_heads`` heads each) is
read the same way.

Folding ``M_h`` into V is exact: the op is linear in V per KV head. ``present_value`` then holds ``V M_h``,
exact for the cache that the same compiled model writes and reads (the pair records it in ``cache``).
Everything that breaks this is a :class:`~qcompiler.sites.PairRejection` with its reason.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.match.pairs import pair_id, site_value_tensor
from qcompiler.match.view import LAYOUT_OPS, SHAPE_OPS, GraphView
from qcompiler.sites import ATTN_VO, CoupledPair, LinearSite, PairRejection

# op -> (index of its past_value input, index of its present_value output)
_READ = {"GroupQueryAttention": (4, 2), "MultiHeadAttention": (7, 2)}
# attention contrib ops whose V·O coupling is not read (yet): a site feeding one gets a rejection
_UNREAD = {"Attention", "PackedAttention", "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention",
           "DecoderMaskedSelfAttention", "SparseAttention", "PagedAttention", "LongformerAttention", "QAttention"}
_EXACT = ("per_kv_head_matrix", "diagonal", "permutation")
# ops that may sit between V's projection and the attention op, and between the op and O: they copy values,
# never move them between channels or tokens (the geometry is read from attributes, not measured)
_COPY_OPS = {"Identity", "Cast"}


def _input(node: gs.Node, i: int) -> gs.Tensor | None:
    return node.inputs[i] if len(node.inputs) > i and node.inputs[i].name else None


def _output(node: gs.Node, i: int) -> gs.Tensor | None:
    return node.outputs[i] if len(node.outputs) > i and node.outputs[i].name else None


def _forward(view: GraphView, t: gs.Tensor) -> tuple[list[tuple[gs.Node, gs.Tensor]], list[str]]:
    """The nodes (other than copies) that read ``t`` through copies, with the tensor each reads, and the
    graph outputs it reaches."""
    readers, elsewhere, stack = [], [], [t]
    while stack:
        t = stack.pop()
        if t.name in view.graph_outputs:
            elsewhere.append(f"graph output {t.name}")
        for c in t.outputs:
            if c.op in SHAPE_OPS:
                continue
            if c.op in _COPY_OPS:
                stack.extend(c.outputs)
            else:
                readers.append((c, t))
    return readers, elsewhere


def _v_source(t: gs.Tensor, values: dict[str, LinearSite]) -> tuple[LinearSite | None, list[str]]:
    """The site whose output (after its bias) reaches ``t`` through layout ops, and the ops other than
    copies on the way."""
    moved: list[str] = []
    for _ in range(16):
        site = values.get(t.name)
        if site is not None:
            return site, moved
        node = t.inputs[0] if t.inputs else None
        if node is None or node.op not in LAYOUT_OPS:
            return None, moved
        if node.op not in _COPY_OPS:
            moved.append(node.op)
        t = node.inputs[0]
    return None, moved


def _geometry(node: gs.Node, v_site: LinearSite, packed: bool) -> tuple[int, int, int, tuple[int, int]] | str:
    """(heads, kv heads, head size, V's columns of the producer) from the attributes, or why not."""
    heads = int(node.attrs.get("num_heads", 0))
    kv_heads = int(node.attrs.get("kv_num_heads", heads)) if node.op == "GroupQueryAttention" else heads
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        return f"{node.op} {node.name} has num_heads {heads}, kv_num_heads {kv_heads}"
    if packed:
        if v_site.n % (heads + 2 * kv_heads):
            return (f"the packed QKV width {v_site.n} of {v_site.id} is not (num_heads + 2 kv_num_heads) = "
                    f"{heads + 2 * kv_heads} heads")
        size = v_site.n // (heads + 2 * kv_heads)
        return heads, kv_heads, size, ((heads + kv_heads) * size, v_site.n)
    if v_site.n % kv_heads:
        return f"V's width {v_site.n} ({v_site.id}) is not a multiple of kv_num_heads {kv_heads}"
    return heads, kv_heads, v_site.n // kv_heads, (0, v_site.n)


def _pair(view: GraphView, node: gs.Node, by_node: dict[str, LinearSite], values: dict[str, LinearSite],
          site_rejections: dict[str, str]) -> CoupledPair | PairRejection | None:
    past_index, present_index = _READ[node.op]
    query, key, value = _input(node, 0), _input(node, 1), _input(node, 2)
    packed = key is None and value is None
    v_in = query if packed else value
    if v_in is None:
        return None
    v_site, moved = _v_source(v_in, values)
    if v_site is None:
        return None  # V is not a projection we quantize (computed some other way): nothing to pair
    if moved:
        return PairRejection(ATTN_VO, v_site.id, None, f"V reaches {node.op} {node.name} through {'+'.join(moved)} "
                             "(its head geometry is read from the attributes when V feeds it directly)")
    if not packed and (key is None or (v_in.shape is not None and len(v_in.shape) != 3)):
        return PairRejection(ATTN_VO, v_site.id, None, f"{node.op} {node.name}: V input of shape {v_in.shape} "
                             f"with key {'absent' if key is None else 'present'} (read: packed QKV, or V as "
                             "[batch, sequence, kv_heads x head_size])")
    if node.op == "MultiHeadAttention" and packed:
        return PairRejection(ATTN_VO, v_site.id, None, f"MultiHeadAttention {node.name} with packed QKV: its V "
                             "columns are interleaved per head")
    readers, elsewhere = _forward(view, view.tensors[site_value_tensor(view, v_site).name])
    others = [r for r, _ in readers if r is not node]
    if others or elsewhere:
        where = f"{others[0].op} node {others[0].name}" if others else elsewhere[0]
        return PairRejection(ATTN_VO, v_site.id, None, f"V's values also flow into {where}")
    out = _output(node, 0)
    readers, elsewhere = _forward(view, out) if out is not None else ([], [])
    if len(readers) != 1 or elsewhere or readers[0][0].op not in ("MatMul", "Gemm", "MatMulNBits") \
            or readers[0][0].inputs[0] is not readers[0][1]:
        what = ", ".join(f"{r.op} {r.name}" for r, _ in readers) or "nothing"
        return PairRejection(ATTN_VO, v_site.id, None, f"{node.op} {node.name}'s output goes to {what}"
                             f"{' and ' + elsewhere[0] if elsewhere else ''}, not to one output projection")
    o_node = readers[0][0]
    o = by_node.get(o_node.name)
    if o is None:
        why = site_rejections.get(o_node.name, "not a MatMul/Gemm with a constant weight")
        return PairRejection(ATTN_VO, v_site.id, o_node.name, f"the output projection {o_node.name} is not a site: "
                             f"{why}")
    past, present = _input(node, past_index), _output(node, present_index)
    if past is not None and past.name not in {i.name for i in view.graph.inputs}:
        return PairRejection(ATTN_VO, v_site.id, o.id, f"{node.op} {node.name}'s past value {past.name} is not a "
                             "graph input (a cache this model does not write would be read in another basis)")
    cache: tuple[str, ...] = ()
    if present is not None:
        if present.outputs:
            return PairRejection(ATTN_VO, v_site.id, o.id, f"{node.op} {node.name}'s present value also flows into "
                                 f"{present.outputs[0].op} node {present.outputs[0].name}")
        if present.name in view.graph_outputs:
            cache = (present.name,)
    geometry = _geometry(node, v_site, packed)
    if isinstance(geometry, str):
        return PairRejection(ATTN_VO, v_site.id, o.id, geometry)
    heads, kv_heads, size, cols = geometry
    if o.k != heads * size:
        return PairRejection(ATTN_VO, v_site.id, o.id, f"O's input width {o.k} is not num_heads x head_size = "
                             f"{heads} x {size}")
    group = heads // kv_heads
    kv_map = tuple(int(h) for h in np.arange(heads) // group)
    return CoupledPair(pair_id(v_site.id, o.id, ATTN_VO), ATTN_VO, v_site.id, o.id, cols, _EXACT, head_dim=size,
                       num_heads=heads, num_kv_heads=kv_heads, kv_map=kv_map, cache=cache)


def contrib_attention_pairs(view: GraphView, sites: list[LinearSite], site_rejections: dict[str, str] | None = None
                            ) -> tuple[list[CoupledPair], list[PairRejection]]:
    """V·O pairs through GroupQueryAttention / MultiHeadAttention nodes (no probe needed), and the reasons
    for those that are not pairs (also for a site feeding an attention contrib op this module does not read)."""
    site_rejections = site_rejections or {}
    linear = [s for s in sites if s.role == "linear"]
    by_node = {s.node: s for s in linear}
    values = {site_value_tensor(view, s).name: s for s in linear}
    pairs, rejected = [], []
    for node in view.graph.nodes:
        if node.domain != "com.microsoft":
            continue
        if node.op in _READ:
            found = _pair(view, node, by_node, values, site_rejections)
            if isinstance(found, CoupledPair):
                pairs.append(found)
            elif found is not None:
                rejected.append(found)
        elif node.op in _UNREAD:
            fed = {s.id for i in node.inputs if i.name and (s := _v_source(i, values)[0]) is not None}
            rejected += [PairRejection(ATTN_VO, sid, None, f"V·O through com.microsoft.{node.op} ({node.name}) is "
                                       f"not read (read: {', '.join(_READ)})") for sid in sorted(fed)]
    return pairs, rejected
