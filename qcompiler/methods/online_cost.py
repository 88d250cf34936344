"""What CafeQ's online ``x T^-1`` ops cost at run time, and which of them a budget admits.

Two regimes, each a cost model of ONNX Runtime on CPU:

- ``batch`` (encoders, prefill): the work is arithmetic. An op on a ``K``-wide input with ``b``-blocks
  adds ``K b`` multiply-adds per token against the quantized sites' ``sum K N``.
- ``token`` (a decoder's batch-1 token step): the work is reading weights, plus a fixed cost per
  node. An op reads its float ``T^-1`` (``4 K b`` bytes) and pays the fixed cost of a few small
  nodes, counted as ``OP_FIXED_BYTES``; the step reads every quantized site at its stored size and
  every float weight that a MatMul/Gemm reads (an untied or tied output head kept in float).

A unit's cost is the larger of the two regimes' fractions in ``token`` (a decoder also prefills) and
the ``batch`` fraction otherwise; units are taken cheapest first until the budget is spent.

Measured on SmolLM2 at 4-bit block 128 sym (perplexity, RTN 33.33): the token regime's 23 ops of the
default 3% budget gave 35.15 taken cheapest first, 35.14 taken by the drop in relative weight error
per cost, 33.78 on gate/up groups only; the batch regime's 69 ops gave 30.35. The partial sets do not
pay, so ``batch`` is the default and ``token`` is the option that bounds a token step's latency.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from qcompiler.algorithms.packing import container_bits
from qcompiler.config import ONLINE_REGIMES, QuantConfig
from qcompiler.sites import LinearSite

log = logging.getLogger(__name__)

# The fixed cost of one online op at a batch-1 token step, in bytes of weight reading it is worth.
# Measured on SmolLM2 (ONNX Runtime CPU, 2 threads, 3-bit block 128, one token): 60 ops with block-64
# T^-1 (147 KB each) added 5.5-6.8% to a 24-25 ms step that reads 174 MB (7 GB/s), i.e. 22-28 us or
# 150-190 KB-equivalents per op; 64 KB on top of the T^-1 bytes predicts 7.3% (a little above).
OP_FIXED_BYTES = 64 * 2**10


@dataclass(frozen=True)
class StepCost:
    """The model's own cost in both regimes (the budget's denominators)."""

    regime: str  # token | batch
    macs: int  # multiply-adds per token of the quantized sites
    token_bytes: float  # bytes a batch-1 token step reads: quantized sites stored + float weights


@dataclass(frozen=True)
class Unit:
    """A sibling group (or a lone site) that may get one online transform."""

    id: str
    input: str  # the tensor the op transforms
    members: tuple[str, ...]
    block: int  # b of its block-diagonal T (the largest power of two <= block_size dividing K)
    cost: float  # fraction of the model's run time, in the plan's regime


def block_for(k: int, b: int) -> int | None:
    """The largest power of two <= b dividing K (at least 8), else None; 1 (diagonal ``T``) for b = 1."""
    if b == 1:
        return 1
    while b >= 8:
        if k % b == 0:
            return b
        b //= 2
    return None


def stored_bytes(site: LinearSite, quant: QuantConfig) -> float:
    """Bytes of the site's weight as the quantizing passes store it (codes, scales, zero points)."""
    item = np.dtype(site.dtype).itemsize
    if quant.bits >= 16:
        return float(site.k * site.n * item)
    groups = site.n * -(-site.k // (quant.group_size or site.k))
    codes = site.k * site.n * container_bits(quant.bits) / 8
    return codes + groups * item + (0 if quant.symmetric else groups * container_bits(quant.bits) / 8)


def step_cost(regime: str, sites: Sequence[LinearSite], quant: QuantConfig, float_bytes: int = 0) -> StepCost:
    """``float_bytes``: weights MatMul/Gemm nodes read that stay in float (``match.float_weight_bytes``)."""
    if regime not in ONLINE_REGIMES:
        raise ValueError(f"regime must be one of {ONLINE_REGIMES}, got {regime!r}")
    linear = [s for s in sites if s.role != "embedding"]
    return StepCost(regime, sum(s.k * s.n for s in linear),
                    sum(stored_bytes(s, quant) for s in linear) + float_bytes)


def op_cost(k: int, b: int, step: StepCost) -> float:
    """One online op's share of the model's run time in ``step``'s regime."""
    batch = k * b / max(step.macs, 1)
    if step.regime == "batch":
        return batch
    return max(batch, (OP_FIXED_BYTES + 4 * k * b) / max(step.token_bytes, 1.0))


def candidate_units(sites: Mapping[str, LinearSite], groups, covered: set[str], block_size: int,
                    step: StepCost) -> list[Unit]:
    """Units that may get an online transform: sibling groups of linear sites, then linear sites in
    no group and not ``covered`` (by a V·O transform), cheapest first."""
    grouped = {m for g in groups for m in g.members}
    raw = [(g.id, g.input, tuple(g.members)) for g in groups
           if all(m in sites and sites[m].role == "linear" for m in g.members)]
    raw += [(s.id, s.input, (s.id,)) for s in sites.values()
            if s.role == "linear" and s.id not in grouped and s.id not in covered]
    out = []
    for uid, tensor, members in raw:
        k = sites[members[0]].k
        b = block_for(k, block_size)
        if b is None:
            log.info("%s: K=%d has no power-of-two block <= %d; no single transform", uid, k, block_size)
            continue
        out.append(Unit(uid, tensor, members, b, op_cost(k, b, step)))
    out.sort(key=lambda u: u.cost)
    return out


def cheapest_first(units: Sequence[Unit], budget: float) -> list[Unit]:
    """Units in order of cost, each one that still fits, until ``budget`` is spent."""
    chosen, spent = [], 0.0
    for u in sorted(units, key=lambda u: u.cost):
        if spent + u.cost > budget + 1e-12:
            log.info("%s: online transform left out (costs %.2f%% of run time; %.2f%% of the %.1f%% budget "
                     "spent)", u.id, 100 * u.cost, 100 * spent, 100 * budget)
            continue
        spent += u.cost
        chosen.append(u)
    return chosen
