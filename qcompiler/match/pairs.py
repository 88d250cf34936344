"""Coupled pairs (attention V·O, MLP up·down) and sibling groups, found structurally.

- ``attn_vo``: from a site's output, layout ops (reshape/transpose/expand...) lead to an attention
  ``MatMul`` as its right operand (``probs @ V``), and layout ops lead from there to another site's
  input. The head size and the query-head -> KV-head map are measured afterwards (a probe run,
  read by :mod:`qcompiler.match.measure`); here the pair is only a candidate.
- ``mlp_up_down``: the down site's input is an element-wise function of one site's output (non-gated,
  ``fc2(act(fc1 x))``) or of two column ranges (gated, ``down(act(gate x) * up x)``, the two ranges
  possibly slices of one fused weight).
- sibling groups: sites reading the same input tensor.

A candidate that looks like a pair but is not safe to transform is kept with the reason. The pair
types live in :mod:`qcompiler.sites`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.match.view import ELEMENTWISE_OPS, LAYOUT_OPS, SHAPE_OPS, SPLIT_OPS, GraphView
from qcompiler.sites import ATTN_VO, MLP_UP_DOWN, CoupledPair, LinearSite, PairRejection, SiblingGroup

# activations f with f(a x) = a f(x) for a > 0: a positive diagonal passes them exactly
_POSITIVE_HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu"}


@dataclass(frozen=True)
class AttentionCandidate:
    """A structural V·O match awaiting its head map."""

    producer: LinearSite
    consumer: LinearSite
    attention: str  # the probs @ V MatMul node
    value_operand: str  # its right operand (heads on axis -3.., head channels last)
    probs: str = ""  # its left operand: the attention weights
    cache: tuple[str, ...] = ()  # KV-cache outputs that hold V's values (present.N.value)


@dataclass
class _Walk:
    attention: list[tuple[gs.Node, gs.Tensor]] = field(default_factory=list)  # (probs@V MatMul, operand)
    consumers: list[gs.Node] = field(default_factory=list)  # MatMul/Gemm reached after attention
    escapes: list[str] = field(default_factory=list)
    cache: list[str] = field(default_factory=list)  # graph outputs that are V's KV cache


def common_prefix_id(ids: list[str]) -> str:
    parts = [i.split(".") for i in ids]
    common = []
    for tokens in zip(*parts, strict=False):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    return ".".join(common)


def pair_id(producer: str, consumer: str, kind: str) -> str:
    prefix = common_prefix_id([producer, consumer])
    return f"{prefix}.{kind}" if prefix else f"{producer}.{kind}"


def site_value_tensor(view: GraphView, site: LinearSite) -> gs.Tensor:
    """The site's output after its bias (MatMul + Add(bias) counts as one linear map)."""
    out = view.tensors[site.output]
    if site.bias and site.op_type != "Gemm":
        adds = [c for c in out.outputs if c.op == "Add"]
        if len(out.outputs) == 1 and adds:
            return adds[0].outputs[0]
    return out


def _cache_concat(view: GraphView, node: gs.Node, t: gs.Tensor) -> bool:
    """``node`` appends ``t`` to a KV cache: a Concat along the sequence axis (-2 of [batch, heads, seq, dim])
    whose other inputs are graph inputs (the past), its output a graph output (the present)."""
    inputs = {i.name for i in view.graph.inputs}
    return (node.op == "Concat" and node.attrs.get("axis") in (-2, 2) and len(node.inputs) == 2
            and node.outputs[0].name in view.graph_outputs
            and all(i.name in inputs for i in node.inputs if i is not t) and any(i is t for i in node.inputs))


def _walk_value(view: GraphView, t: gs.Tensor, after_attention: bool, walk: _Walk, depth: int = 0,
                cached: bool = False) -> bool:
    """Follow ``t`` forward through layout ops. Returns True if this branch reaches a consumer site.
    ``cached``: ``t`` is a KV-cache output (V's values appended to the past): a graph output by design."""
    if depth > 64:
        walk.escapes.append("path too long")
        return False
    if t.name in view.graph_outputs:
        (walk.cache if cached else walk.escapes).append(t.name if cached else f"graph output {t.name}")
    reached = False
    for c in t.outputs:
        if c.op in SHAPE_OPS:
            continue
        if not after_attention and _cache_concat(view, c, t):
            reached |= _walk_value(view, c.outputs[0], after_attention, walk, depth + 1, cached=True)
        elif c.op in LAYOUT_OPS and c.inputs[0] is t:
            reached |= _walk_value(view, c.outputs[0], after_attention, walk, depth + 1)
        elif c.op in SPLIT_OPS and c.inputs[0] is t and not after_attention:
            for out in c.outputs:
                sub = _Walk()
                if _walk_value(view, out, after_attention, sub, depth + 1):
                    reached = True
                    walk.attention += sub.attention
                    walk.consumers += sub.consumers
                    walk.escapes += sub.escapes
                    walk.cache += sub.cache
                # a branch that reaches no projection holds other columns (Q, K of a fused QKV)
        elif c.op == "MatMul" and len(c.inputs) > 1 and c.inputs[1] is t and not after_attention:
            sub = _Walk()
            if _walk_value(view, c.outputs[0], True, sub, depth + 1):
                reached = True
                walk.attention.append((c, t))
                walk.consumers += sub.consumers
                walk.escapes += sub.escapes
        elif after_attention and c.op in ("MatMul", "Gemm", "MatMulNBits") and c.inputs[0] is t:
            walk.consumers.append(c)
            reached = True
        else:
            walk.escapes.append(f"{c.op} node {c.name}")
    return reached


def find_attention_candidates(view: GraphView, sites: list[LinearSite], site_rejections: dict[str, str] | None = None
                              ) -> tuple[list[AttentionCandidate], list[PairRejection]]:
    """V·O candidates; ``site_rejections`` (node -> reason) explains an O that is not a site."""
    site_rejections = site_rejections or {}
    by_node = {s.node: s for s in sites}
    found, rejected = [], []
    for s in sites:
        if s.role != "linear":
            continue
        walk = _Walk()
        if not _walk_value(view, site_value_tensor(view, s), False, walk):
            continue
        consumers = {c.name: c for c in walk.consumers}
        if len(consumers) != 1 or len({a.name for a, _ in walk.attention}) != 1:
            rejected.append(PairRejection(ATTN_VO, s.id, None, f"V reaches {len(consumers)} projections through "
                                          f"{len(walk.attention)} attention MatMuls (expected 1 and 1)"))
            continue
        (cname, cnode), = consumers.items()
        o = by_node.get(cname)
        if o is None:
            why = site_rejections.get(cname, "not a MatMul/Gemm with a constant weight")
            rejected.append(PairRejection(ATTN_VO, s.id, cname, f"the output projection {cname} is not a site: {why}"))
            continue
        if walk.escapes:
            rejected.append(PairRejection(ATTN_VO, s.id, o.id, f"V's values also flow into {walk.escapes[0]}"))
            continue
        attn, operand = walk.attention[0]
        found.append(AttentionCandidate(s, o, attn.name, operand.name, attn.inputs[0].name, tuple(walk.cache)))
    return found, rejected


# ---------------------------------------------------------------------------------------------- MLP


@dataclass
class _Leaf:
    site: LinearSite
    cols: tuple[int, int]
    through: list[str]  # op types between the site and the end of the chain


def _slice_cols(view: GraphView, node: gs.Node, out_index: int, n: int) -> tuple[int, int] | None:
    """Columns of a last-axis Split/Slice output, relative to an input of width ``n``; None if unknown."""
    if node.op == "Split":
        axis = int(node.attrs.get("axis", 0))
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            return None
        sizes = view.constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
        if sizes is None and "split" in node.attrs:
            sizes = np.asarray(node.attrs["split"])
        if sizes is None:
            k = len(node.outputs)
            if n % k:
                return None
            sizes = np.full(k, n // k)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        return int(starts[out_index]), int(starts[out_index + 1])
    if node.op == "Slice":
        vals = [view.constant(t) if t.name else None for t in node.inputs[1:]]
        if len(vals) < 2 or vals[0] is None or vals[1] is None or vals[0].size != 1:
            return None
        axes = vals[2] if len(vals) > 2 and vals[2] is not None else np.array([0])
        steps = vals[3] if len(vals) > 3 and vals[3] is not None else np.array([1])
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        if int(steps.ravel()[0]) != 1 or not (int(axes.ravel()[0]) == -1 or (rank and axes.ravel()[0] == rank - 1)):
            return None
        start, stop = (int(v) for v in (vals[0].ravel()[0], vals[1].ravel()[0]))
        start, stop = (v + n if v < 0 else v for v in (start, stop))
        return max(0, start), min(n, stop)
    return None


def _chain_leaves(view: GraphView, end: gs.Tensor, outputs: dict[str, LinearSite],
                  known_cols: dict[str, tuple[int, int]], pending: list[tuple[LinearSite, str]]
                  ) -> tuple[list[_Leaf], list[str], set[str]] | None:
    """Walk back from ``end`` through element-wise/layout/split ops. Returns the site leaves, the problems
    found, and the chain's node names; None when the chain reaches anything but sites and constants.
    Slices whose bounds are computed at run time go to ``pending`` (to be probed) unless ``known_cols``
    has them."""
    leaves: list[_Leaf] = []
    problems: list[str] = []
    chain: set[str] = set()
    stack: list[tuple[gs.Tensor, list[str], tuple[gs.Node, int] | None]] = [(end, [], None)]
    while stack:
        t, ops, split = stack.pop()
        site = outputs.get(t.name)
        if site is not None:
            cols = (0, site.n)
            if split is not None:
                out_name = split[0].outputs[split[1]].name
                sliced = known_cols.get(out_name) or _slice_cols(view, split[0], split[1], site.n)
                if sliced is None:
                    pending.append((site, out_name))
                    problems.append(f"cannot read the column range of {split[0].op} {split[0].name}")
                    continue
                cols = sliced
            leaves.append(_Leaf(site, cols, ops))
            continue
        if view.constant(t) is not None:
            if view.constant(t).size != 1:
                problems.append(f"per-channel constant {t.name} inside the chain")
            continue
        node = t.inputs[0] if t.inputs else None
        if node is None or len(chain) > 64:
            return None
        if node.op in SPLIT_OPS:
            if split is not None:
                return None
            chain.add(view.name(node))
            stack.append((node.inputs[0], ops, (node, node.outputs.index(t))))
        elif node.op in ELEMENTWISE_OPS or node.op in LAYOUT_OPS:
            chain.add(view.name(node))
            data = node.inputs[:1] if node.op in LAYOUT_OPS else [i for i in node.inputs if i.name]
            for i in data:
                stack.append((i, ops + [node.op], split))
        else:
            return None
    return leaves, problems, chain


def _escapes(view: GraphView, chain: set[str], consumer: gs.Node) -> str | None:
    """Where a value of the chain leaves it (other than into the down projection or a Shape op)."""
    allowed = chain | {view.name(consumer)}
    for name in chain:
        for succ in view.dag.successors(name):
            if succ not in allowed and view.nodes[succ].op not in SHAPE_OPS:
                tensor = view.dag.edges[name, succ]["tensors"][0]
                return f"{tensor} also flows into {view.nodes[succ].op} node {succ}"
        if any(t.name in view.graph_outputs for t in view.nodes[name].outputs):
            return f"{name}'s output is a graph output"
    return None


def find_mlp_pairs(view: GraphView, sites: list[LinearSite], known_cols: dict[str, tuple[int, int]] | None = None
                   ) -> tuple[list[CoupledPair], list[PairRejection], list[tuple[LinearSite, str]]]:
    """Pairs, rejections, and the (site, slice output) whose column ranges need a probe run."""
    outputs = {site_value_tensor(view, s).name: s for s in sites}
    pairs, rejected, pending = [], [], []
    known_cols = known_cols or {}
    for down in sites:
        if down.role != "linear":
            continue
        node = view.nodes[down.node]
        walked = _chain_leaves(view, view.tensors[down.input], outputs, known_cols, pending)
        if walked is None:
            continue
        leaves, problems, chain = walked
        if not leaves and not problems or any(leaf.site is down for leaf in leaves):
            continue
        if any(p.startswith("cannot read the column range") for p in problems):
            rejected.append(PairRejection(MLP_UP_DOWN, pending[-1][0].id, down.id, problems[0]))
            continue
        ops = sorted({op for leaf in leaves for op in leaf.through if op not in LAYOUT_OPS})
        distinct = {(leaf.site.id, leaf.cols) for leaf in leaves}
        if len(distinct) > 2 or not ops:
            continue  # not an MLP: a residual, a norm, or a plain reshape between two linears
        width = {c[1] - c[0] for _, c in distinct}
        first = leaves[0].site.id
        if len(width) != 1 or width.pop() != down.k:
            rejected.append(PairRejection(MLP_UP_DOWN, first, down.id, f"widths {sorted(distinct)} do not match "
                                          f"the down projection's K={down.k}"))
            continue
        if problems or (reason := _escapes(view, chain, node)):
            rejected.append(PairRejection(MLP_UP_DOWN, first, down.id, (problems or [reason])[0]))
            continue
        if len(distinct) == 1:
            leaf = leaves[0]
            exact = (("positive_diagonal", "permutation") if set(ops) <= _POSITIVE_HOMOGENEOUS
                     else ("permutation",))
            pairs.append(CoupledPair(pair_id(leaf.site.id, down.id, MLP_UP_DOWN), MLP_UP_DOWN, leaf.site.id,
                                     down.id, leaf.cols, exact, activation="+".join(ops)))
            continue
        # gated: the factor reaching the product through layout ops only (or the least activated) is up
        by_key: dict[tuple, list[_Leaf]] = defaultdict(list)
        for leaf in leaves:
            by_key[(leaf.site.id, leaf.cols)].append(leaf)
        ranked = sorted(by_key.values(), key=lambda ls: max(
            sum(op not in LAYOUT_OPS for op in leaf.through) for leaf in ls))
        up, gate = ranked[0][0], ranked[1][0]
        pairs.append(CoupledPair(pair_id(up.site.id, down.id, MLP_UP_DOWN), MLP_UP_DOWN, up.site.id, down.id,
                                 up.cols, ("diagonal", "permutation"), gate=gate.site.id, gate_cols=gate.cols,
                                 activation="+".join(ops)))
    return pairs, rejected, pending


def find_sibling_groups(sites: list[LinearSite]) -> list[SiblingGroup]:
    by_input: dict[str, list[LinearSite]] = defaultdict(list)
    for s in sites:
        if s.role != "embedding":
            by_input[s.input].append(s)
    groups = []
    for tensor, members in by_input.items():
        if len(members) < 2:
            continue
        ids = [m.id for m in members]
        prefix = common_prefix_id(ids)
        tails = [i[len(prefix):].lstrip(".") or i for i in ids]
        groups.append(SiblingGroup(f"{prefix}:{'+'.join(tails)}" if prefix else "+".join(ids), tensor, tuple(ids)))
    return groups
