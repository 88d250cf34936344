"""Streaming compile: plan and rewrite a chunk of sites at a time, so memory holds one chunk's weights.

The model's weights stay in their external data files (``qcompiler.external``). Sites are split into
*units* that must be planned together (a sibling group shares one online transform; a coupled pair's
factors are transformed and rounded jointly), units are packed in graph order into chunks of about
``chunk_bytes`` of fp32 weights, and each chunk goes through the same method and passes as a whole-model
compile would. After a chunk's passes, every large new constant is spilled to a data file and the
chunk's codes are released; what remains in memory is the graph's structure and per-site statistics.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs
from tqdm.auto import tqdm

from qcompiler.algorithms.grid import QuantizedWeight
from qcompiler.device import resolve_device
from qcompiler.external import DataSink
from qcompiler.match.sites import weight_reader
from qcompiler.plan import QuantPlan, SitePlan
from qcompiler.resources import bound_heap, note_workers_peak, trim_heap
from qcompiler.sites import Analysis, CoupledPair, LinearSite, SiblingGroup
from qcompiler.workers import make_pool, resolve_jobs

if TYPE_CHECKING:
    from qcompiler.methods.base import Method, PlanContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    sites: tuple[LinearSite, ...]
    pairs: tuple[CoupledPair, ...] = ()
    groups: tuple[SiblingGroup, ...] = ()
    units: int = 1  # sites tied by pairs and groups count as one: about one task per phase of the plan

    @property
    def learned_bytes(self) -> int:
        """fp32 bytes of the weights a learned plan loads (embedding tables are rounded where they lie)."""
        return sum(s.k * s.n * 4 for s in self.sites if s.role != "embedding")

    def analysis(self) -> Analysis:
        """The matcher's analysis restricted to this chunk."""
        return Analysis(self.sites, (), (), self.pairs, (), self.groups)

    @staticmethod
    def joined(chunks: Sequence[Chunk]) -> Chunk:
        """One chunk of ``chunks`` (disjoint), planned as one: a window."""
        return Chunk(tuple(s for c in chunks for s in c.sites), tuple(p for c in chunks for p in c.pairs),
                     tuple(g for c in chunks for g in c.groups), sum(c.units for c in chunks))


def _pair_members(p: CoupledPair) -> list[str]:
    return [p.producer, p.consumer] + ([p.gate] if p.gate else [])


def chunk_sites(sites: Sequence[LinearSite], chunk_bytes: int, pairs: Sequence[CoupledPair] = (),
                groups: Sequence[SiblingGroup] = ()) -> list[Chunk]:
    """Units (sites tied by pairs and groups) packed in order into chunks of at most ``chunk_bytes`` of
    fp32 weights; a unit larger than that is a chunk of its own. Every site is in exactly one chunk."""
    order = {s.id: i for i, s in enumerate(sites)}
    parent = {s.id: s.id for s in sites}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(ids: list[str]) -> None:
        ids = [i for i in ids if i in parent]
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            if a != b:
                parent[max(a, b, key=order.__getitem__)] = min(a, b, key=order.__getitem__)

    for p in pairs:
        union(_pair_members(p))
    for g in groups:
        union(list(g.members))
    units: dict[str, list[LinearSite]] = {}
    for s in sites:
        units.setdefault(find(s.id), []).append(s)
    chunks: list[list[LinearSite]] = []
    counts: list[int] = []
    size = 0
    for unit in sorted(units.values(), key=lambda u: order[u[0].id]):
        unit_bytes = sum(s.k * s.n * 4 for s in unit)
        if not chunks or size + unit_bytes > chunk_bytes:
            chunks.append([])
            counts.append(0)
            size = 0
        chunks[-1].extend(unit)
        counts[-1] += 1
        size += unit_bytes
    out = []
    for members, count in zip(chunks, counts, strict=True):
        ids = {s.id for s in members}
        out.append(Chunk(tuple(members),
                         tuple(p for p in pairs if all(m in ids for m in _pair_members(p) if m in parent)),
                         tuple(g for g in groups if all(m in ids for m in g.members if m in parent)), count))
    return out


def windows(chunks: Sequence[Chunk], units: int, window_bytes: int) -> list[list[int]]:
    """Consecutive chunks planned side by side: each window takes chunks until it holds ``units`` units or the
    next chunk would take it over ``window_bytes`` of fp32 weights that the plan loads (a chunk over it is a
    window of its own; an embedding table, which a learned plan does not load, counts no bytes).
    A plan's phases (learn the pairs, the single transforms, round jointly) have about one task per unit, so a
    window of two units per worker keeps every worker busy where one large chunk gave one task a phase."""
    out: list[list[int]] = []
    held = size = 0
    for i, c in enumerate(chunks):
        if not out or held >= units or size + c.learned_bytes > window_bytes:
            out.append([])
            held = size = 0
        out[-1].append(i)
        held += c.units
        size += c.learned_bytes
    return out


def part_of(plan: QuantPlan, chunk: Chunk) -> QuantPlan:
    """What of a window's ``plan`` belongs to ``chunk`` (its sites, the pairs and online transforms of
    them), in the plan's order: the plan that chunk gets when it is planned alone."""
    ids = {s.id for s in chunk.sites}
    pairs = {p.id for p in chunk.pairs}
    return replace(plan, sites=tuple(sp for sp in plan.sites if sp.site.id in ids),
                   pair_transforms=tuple(t for t in plan.pair_transforms if t.pair.id in pairs),
                   online=tuple(o for o in plan.online if set(o.sites) <= ids),
                   pair_stats=tuple(ps for ps in plan.pair_stats if ps.pair in pairs))


def released(sp: SitePlan) -> SitePlan:
    """``sp`` without its codes (zero-stride stand-ins of the same shapes): its tensors are in the graph
    and spilled; shapes, grid and statistics stay for the report."""
    w = sp.weight

    def ghost(a: np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.zeros((), a.dtype), a.shape)

    return replace(sp, weight=QuantizedWeight(ghost(w.codes), ghost(w.scales), ghost(w.zero_points), w.bits,
                                               w.block_size, w.symmetric))


def merge(plans: Sequence[QuantPlan], method: str, quant) -> QuantPlan:
    return QuantPlan(method, quant, tuple(sp for p in plans for sp in p.sites),
                     tuple(t for p in plans for t in p.pair_transforms), tuple(o for p in plans for o in p.online),
                     tuple(s for p in plans for s in p.pair_stats), released=True)


class ChunkStore:
    """The finished chunks' plans of a streamed compile (``--resume``), in a folder beside the output: one
    ``.npz`` per chunk, written atomically, and ``key.json``, what they were planned for (the source, the
    configuration less how it runs, the chunks' sites). A folder left by another compile is cleared."""

    def __init__(self, folder: Path, key: dict):
        self.folder, self.key = folder, key
        key_file = folder / "key.json"
        if folder.is_dir():
            try:
                same = json.loads(key_file.read_text()) == key
            except (OSError, ValueError):
                same = False
            if same:
                done = len(list(folder.glob("chunk-*.npz")))
                log.info("resuming: %d finished chunk plans in %s", done, folder)
                return
            log.warning("%s holds chunk plans of another compile: starting over", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        key_file.write_text(json.dumps(key))

    @staticmethod
    def folder_for(output: str | os.PathLike) -> Path:
        """Where the chunk plans of a compile writing ``output`` are kept."""
        out = Path(output)
        return out.parent / f".{out.name}.chunks"

    def _path(self, index: int) -> Path:
        return self.folder / f"chunk-{index:05d}.npz"

    def load(self, index: int) -> QuantPlan | None:
        path = self._path(index)
        return QuantPlan.load(path) if path.is_file() else None

    def save(self, index: int, plan: QuantPlan) -> None:
        tmp = self.folder / f".chunk-{index:05d}.tmp"
        plan.save(tmp)
        os.replace(tmp, self._path(index))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def chunk_key(source: str, config, chunks: Sequence[Chunk]) -> dict:
    """What a chunk store's plans depend on: the source, the configuration (less where and how it runs, which
    leave the plans unchanged) and each chunk's sites."""
    from dataclasses import asdict

    cfg = {k: v for k, v in asdict(config).items()
           if k not in ("resume", "jobs", "executor", "ray_address", "stream_window_mb")}
    return {"source": str(source), "config": json.loads(json.dumps(cfg, default=str)),
            "chunks": [[s.id for s in c.sites] for c in chunks]}


def stream_compile(graph: gs.Graph, chunks: Sequence[Chunk],
                   plan_window: Callable[[gs.Graph, list[int]], list[QuantPlan]],
                   rewrite: Callable[[gs.Graph, QuantPlan], gs.Graph], sink: DataSink, method: str, quant,
                   progress: bool = False, window_of: Sequence[list[int]] | None = None) -> tuple[gs.Graph, QuantPlan]:
    """Plan ``chunks`` a window at a time (``window_of``: lists of chunk indices, in order; default one chunk
    each), then rewrite and spill the window's chunks one after another, in chunk order. Returns the graph
    and the merged plan. ``plan_window(graph, indices)``: the plans of those chunks, in their order."""
    bound_heap()
    plans = []
    bar = tqdm(total=len(chunks), desc="stream", unit="chunk", disable=not progress, leave=False)
    for window in window_of or [[i] for i in range(len(chunks))]:
        planned = plan_window(graph, window)
        for index, plan in zip(window, planned, strict=True):
            graph = rewrite(graph, plan)
            moved = sink.spill(graph)
            log.debug("chunk %d, %d sites: %.1f MB spilled", index, len(chunks[index].sites), moved / 1e6)
            plans.append(replace(plan, sites=tuple(released(sp) for sp in plan.sites)))
            bar.update()
        del planned, plan
        # the rewrite leaves replaced constants (a chunk's weights) in reference cycles with their old
        # nodes; Python's cyclic collector runs by object counts, not bytes, and left them for many chunks
        gc.collect()
        trim_heap()
    bar.close()
    log.info("streamed %d chunks; %.1f MB written to %s", len(chunks), sink.bytes / 1e6, sink.path.name)
    return graph, merge(plans, method, quant)


@dataclass(frozen=True)
class Streamed:
    """What a streamed compile leaves for validation and saving: where the new tensors are, and where
    validation cuts both models (before every site: a stretch holds one weight's worth)."""

    sources: dict
    cuts: tuple[str, ...]


def stream_plan_rewrite(graph: gs.Graph, method: Method, ctx: PlanContext, chunk_mb: int, sink: DataSink,
                        rewrite: Callable[[gs.Graph, QuantPlan], gs.Graph],
                        make_plan: Callable[[Method, PlanContext], QuantPlan] | None = None,
                        store: Callable[[Sequence[Chunk]], ChunkStore] | None = None) -> tuple[gs.Graph, QuantPlan]:
    """The streamed strategy of the plan and rewrite steps: chunk by chunk, one pool of workers for all.
    ``make_plan(method, ctx)``: how a chunk is planned (default: ``method.plan``). ``store(chunks)``: where
    finished chunks' plans are kept and found again (``--resume``)."""
    make_plan = make_plan or (lambda m, c: m.plan(c))
    analysis = ctx.analysis
    chunks = chunk_sites(ctx.sites, chunk_mb * 2**20, analysis.pairs if analysis else (),
                         analysis.groups if analysis else ())
    log.info("%d sites in %d chunks", len(ctx.sites), len(chunks))
    whole = method.for_streaming(ctx)

    kept = store(chunks) if store is not None else None

    def plan_window(g: gs.Graph, window: list[int]) -> list[QuantPlan]:
        plans = {i: kept.load(i) for i in window} if kept is not None else {}
        todo = [i for i in window if plans.get(i) is None]
        if todo:
            joined = Chunk.joined([chunks[i] for i in todo])
            plan = make_plan(method, whole.part(joined.sites, joined.analysis() if analysis else None,
                                                weight_reader(g)))
            for i in todo:
                plans[i] = part_of(plan, chunks[i])
                if kept is not None:
                    kept.save(i, plans[i])
        return [plans[i] for i in window]

    cfg = ctx.config
    jobs = resolve_jobs(cfg.jobs, sum(s.k * s.n for s in ctx.sites), cfg.device) if method.learns else 1
    try:
        # one set of workers (or one Ray connection) for every chunk: tasks travel to them, not the model
        executor = cfg.executor if method.learns else "local"  # nothing to send out: no Ray for rtn
        with make_pool(jobs, False, executor, cfg.ray_address, resolve_device(cfg.device)) as pool:
            # with workers (a Ray cluster's CPUs), consecutive chunks are planned side by side: a large
            # chunk alone gave one task a phase
            window_of = windows(chunks, 2 * pool.jobs, cfg.stream_window_mb * 2**20) if pool.jobs > 1 else None
            if window_of is not None and len(window_of) < len(chunks):
                log.info("%d chunks planned in %d windows (at most %d MB of weights, %d units each)", len(chunks),
                         len(window_of), cfg.stream_window_mb, 2 * pool.jobs)
            graph, plan = stream_compile(graph, chunks, plan_window, rewrite, sink, method.name, cfg.quant,
                                         ctx.progress, window_of)
        note_workers_peak(pool.workers_peak_mb)
        return graph, plan
    finally:
        sink.close()
