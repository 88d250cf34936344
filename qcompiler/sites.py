"""Types only: what the matcher finds and what the rest of the compiler (plans, passes, runtime) reads.

Frozen records with no graph access and no behaviour beyond lookups; ``qcompiler.match`` fills them,
``runtime``, ``passes`` and ``methods`` consume them without importing the matcher.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# pair kinds
ATTN_VO = "attn_vo"
MLP_UP_DOWN = "mlp_up_down"


@dataclass(frozen=True)
class LinearSite:
    """One quantizable ``y = x W (+ b)``; ``W`` is ``[K, N]`` in MatMul layout."""

    id: str  # stable: module path from exporter metadata, else the weight's initializer name
    node: str
    op_type: str  # MatMul | Gemm
    weight: str  # initializer name
    transposed: bool  # the initializer holds W^T
    k: int
    n: int
    input: str
    output: str
    bias: str | None  # Gemm's C, or the constant of an Add that consumes the output
    role: str  # "linear" | "head" | "embedding" (a Gather over a [V, H] table: W = table^T, K = H)
    dtype: str


@dataclass(frozen=True)
class Rejection:
    node: str
    op_type: str
    reason: str
    id: str | None = None


@dataclass(frozen=True)
class MatchResult:
    sites: tuple[LinearSite, ...]
    rejected: tuple[Rejection, ...]

    def site(self, site_id: str) -> LinearSite:
        for s in self.sites:
            if s.id == site_id:
                return s
        raise KeyError(site_id)


@dataclass(frozen=True)
class QuantizedSite:
    """A weight the compiler (or another tool) already quantized: MatMulNBits, or DequantizeLinear -> MatMul."""

    site: LinearSite
    storage: str  # MatMulNBits | DequantizeLinear
    bits: int
    block_size: int  # 0: per-channel / per-tensor
    symmetric: bool  # no zero point stored


@dataclass(frozen=True)
class CoupledPair:
    """Two sites whose weights meet in the computation: ``... A ... B``, A the producer."""

    id: str
    kind: str  # ATTN_VO | MLP_UP_DOWN
    producer: str  # site id: V (attn_vo) or up/fc1 (mlp_up_down)
    consumer: str  # site id: O or down
    producer_cols: tuple[int, int]  # column range of the producer's W (a slice for fused weights)
    exact: tuple[str, ...]  # transforms that leave the model unchanged: per_kv_head_matrix | diagonal |
    #                          positive_diagonal | permutation
    head_dim: int = 0
    num_heads: int = 0  # query heads (rows of O in blocks of head_dim)
    num_kv_heads: int = 0
    kv_map: tuple[int, ...] = ()  # query head j reads KV head kv_map[j]
    gate: str | None = None  # gated MLP: the gate site (same id as producer when fused)
    gate_cols: tuple[int, int] | None = None
    activation: str = ""  # the element-wise ops between the factors
    probs: str = ""  # attn_vo: the attention weights tensor (``probs @ V``), [batch, heads, query, key] in
    #                  the usual layout (calibration weighs V's inputs by it)
    # attn_vo: the KV-cache outputs that hold V's values (``present.N.value``): a transform folded into V is
    # then in the cache too, exact for a cache that the same compiled model writes and reads
    cache: tuple[str, ...] = ()


@dataclass(frozen=True)
class PairRejection:
    kind: str
    producer: str
    consumer: str | None
    reason: str


@dataclass(frozen=True)
class SiblingGroup:
    """Sites reading the same input tensor."""

    id: str
    input: str
    members: tuple[str, ...]  # site ids, graph order


@dataclass(frozen=True)
class Analysis:
    """Everything the matcher knows about a model: sites, pairs, groups, and why the others are not."""

    sites: tuple[LinearSite, ...]  # float sites the compiler may quantize
    quantized: tuple[QuantizedSite, ...]  # sites already quantized (compiled models)
    rejected: tuple[Rejection, ...]
    pairs: tuple[CoupledPair, ...]
    pair_rejections: tuple[PairRejection, ...]
    groups: tuple[SiblingGroup, ...]

    def pairs_of(self, kind: str) -> list[CoupledPair]:
        return [p for p in self.pairs if p.kind == kind]

    def to_json(self) -> dict:
        return {
            "sites": [asdict(s) for s in self.sites],
            "quantized": [{**asdict(q.site), "storage": q.storage, "bits": q.bits, "block_size": q.block_size,
                           "symmetric": q.symmetric} for q in self.quantized],
            "rejected": [asdict(r) for r in self.rejected],
            "pairs": [asdict(p) for p in self.pairs],
            "pair_rejections": [asdict(r) for r in self.pair_rejections],
            "groups": [asdict(g) for g in self.groups],
        }


@dataclass(frozen=True)
class ProbeRequest:
    """One probe run the matcher asks for (``qcompiler.runtime.probe`` runs it on a copy of the graph):
    each ``sources[i]``'s output after its bias, the tensor ``values[i]``, is replaced by its channel
    indices; the outputs of ``silence`` are multiplied by zero; the ``watch`` tensors are read."""

    sources: tuple[LinearSite, ...]
    values: tuple[str, ...]  # per source: the tensor the probe replaces
    silence: tuple[LinearSite, ...] = ()
    watch: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProbeResult:
    """What a probe run measured: watched tensor -> the channel index of the sources it holds at every
    position (int64), or None where it does not hold whole indices (the values were mixed)."""

    decoded: Mapping[str, np.ndarray | None] = field(default_factory=dict)
    error: str = ""  # the run failed (one line); ``decoded`` is then empty
