"""Independent CPU tasks of a method (learning one group's transform, jointly rounding one pair) on a
pool of single-threaded worker processes.

Why processes: CafeQ's learners and solvers run thousands of small torch and numpy operations, so a
second thread speeds one task up by about 1.4x on two cores, while two single-threaded tasks side by side
run at nearly full speed each. Why single-threaded everywhere, in-process too: torch's reductions split
their sums by thread count, so a task's result would otherwise depend on the machine's cores and on
``jobs``. With one thread per task a plan is the same whatever ``jobs`` and wherever it runs.

A task is a top-level function and its arguments (pickled to the worker: numpy arrays and frozen
configs). Results come back in the order of the tasks.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

from qcompiler.resources import keep_heap, peak_rss_mb

log = logging.getLogger(__name__)

# what a worker's numerical libraries read at start-up for their thread counts
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# below this many weight elements a pool's start-up (a few seconds: each worker imports torch) costs
# more than it saves: tiny models stay in-process
AUTO_MIN_ELEMENTS = 1_000_000
# each worker holds its own torch (about 0.4 GB before any task): auto stops here on big machines
AUTO_MAX_JOBS = 8


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_jobs(jobs: int, elements: int, device: str = "cpu") -> int:
    """Workers for ``jobs`` (0: auto, the machine's cores up to ``AUTO_MAX_JOBS`` when the work is worth a
    pool) given the weight ``elements`` the tasks cover. Learning on CUDA stays in-process (one device,
    one context)."""
    if jobs < 0:
        raise ValueError(f"jobs must be >= 0, got {jobs}")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        return 1
    if jobs == 0:
        return min(machine_cores(), AUTO_MAX_JOBS) if elements >= AUTO_MIN_ELEMENTS else 1
    return jobs


@contextmanager
def single_thread() -> Iterator[None]:
    """torch on one thread inside the block (the in-process path), as in a worker."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _start_worker() -> None:
    import torch

    torch.set_num_threads(1)
    keep_heap()  # a worker's tasks are alike: its freed memory stays for the next one


def _call(fn: Callable[..., Any], args: tuple) -> tuple[Any, int, float]:
    """A task in a worker: its result, the worker's pid and the worker's peak memory so far (MiB)."""
    return fn(*args), os.getpid(), peak_rss_mb()


def _ray_call(fn: Callable[..., Any], args: tuple) -> tuple[Any, int, float]:
    """A task as a Ray task: one torch thread (the thread variables are set for its worker process), and
    its arrays writable copies (Ray hands numpy arguments over read-only, from its object store)."""
    _start_worker()
    return _call(fn, _writable(args))


def _writable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, np.ndarray) and not x.flags.writeable:
        return x.copy()
    if isinstance(x, (list, tuple)):
        return type(x)(_writable(v) for v in x)
    return x


def submission_order(count: int, cost: Sequence[float] | None) -> list[int]:
    """Task indices, costliest first (ties and no ``cost``: task order)."""
    if cost is None:
        return list(range(count))
    if len(cost) != count:
        raise ValueError(f"{len(cost)} costs for {count} tasks")
    return sorted(range(count), key=lambda i: -cost[i])


def next_task(pending: Sequence[int], running: Sequence[int], limit: int, memory: Sequence[float] | None = None,
              budget: float | None = None) -> int | None:
    """The task of ``pending`` (in submission order) to start now beside ``running``, or None (wait for one to
    end): at most ``limit`` at once, and their ``memory`` together within ``budget``; a task that fits beside
    nothing else starts alone. Where the next task does not fit, a later, smaller one may go first."""
    if not pending or len(running) >= limit:
        return None
    if memory is None or budget is None or not running:
        return pending[0]
    used = sum(memory[j] for j in running)
    return next((i for i in pending if used + memory[i] <= budget), None)


_OPEN: list[TaskPool] = []  # pools entered in this process, innermost last


def open_pool() -> TaskPool | None:
    """The pool a caller up the stack has started (a streaming compile keeps one for all its chunks)."""
    return _OPEN[-1] if _OPEN else None


class TaskPool:
    """``with TaskPool(jobs) as pool: results = pool.map(fn, [args, ...], desc)``. ``jobs`` 1 runs the
    tasks here, one after another; more starts that many worker processes (spawned, one thread each),
    kept for every ``map`` of the block. ``workers_peak_mb``: the workers' peak memories (as of their
    last task) added up, an upper bound of what they held at once."""

    def __init__(self, jobs: int, progress: bool = False):
        if jobs < 1:
            raise ValueError(f"a pool needs jobs >= 1, got {jobs}")
        self.jobs, self.progress = jobs, progress
        self._peaks: dict[int, float] = {}
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> TaskPool:
        if self.jobs > 1:
            saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
            os.environ.update({k: "1" for k in THREAD_VARIABLES})  # read by the spawned workers only
            try:
                self._pool = ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn"),
                                                 initializer=_start_worker)
                # start every worker now, while the variables hold (workers are started on demand)
                for f in [self._pool.submit(_start_worker) for _ in range(self.jobs)]:
                    f.result()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            log.info("%d worker processes", self.jobs)
        _OPEN.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    @property
    def workers_peak_mb(self) -> float:
        return sum(self._peaks.values())

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], desc: str = "",
            limit: int | None = None, cost: Sequence[float] | None = None,
            memory: Sequence[float] | None = None, budget: float | None = None) -> list[Any]:
        """``[fn(*t) for t in tasks]``, in order, at most ``limit`` at once (default: one per worker); a
        task's exception is raised here. ``cost``: each task's rough cost; workers take the costliest first,
        so the map does not end on one long task while the other workers wait (the results stay in order).
        ``memory`` and ``budget``: each task's working memory and what the tasks running at once may hold
        together (:func:`next_task`)."""
        bar = tqdm(total=len(tasks), desc=desc, unit="task", disable=not self.progress, leave=False)
        try:
            if self._pool is None or len(tasks) < 2 or limit == 1:
                out = []
                with single_thread():
                    for t in tasks:
                        out.append(fn(*t))
                        bar.update()
                return out
            limit = self.jobs if limit is None else max(1, min(limit, self.jobs))
            futures: list[Future | None] = [None] * len(tasks)
            running: dict[Future, int] = {}
            pending = submission_order(len(tasks), cost)
            while pending or running:
                i = next_task(pending, list(running.values()), limit, memory, budget)
                if i is None:
                    left = self._settle(set(running), bar)
                    running = {f: j for f, j in running.items() if f in left}
                    continue
                pending.remove(i)
                futures[i] = self._pool.submit(_call, fn, tasks[i])
                running[futures[i]] = i
            out = []
            for f in futures:
                result, pid, peak = f.result()
                self._peaks[pid] = max(peak, self._peaks.get(pid, 0.0))
                out.append(result)
            return out
        finally:
            bar.close()

    @staticmethod
    def _settle(running: set[Future], bar) -> set[Future]:
        """Wait for one or more of ``running`` to finish; raise the first failure."""
        done, rest = wait(running, return_when=FIRST_COMPLETED)
        bar.update(len(done))
        for f in done:
            if f.exception() is not None:
                for r in rest:
                    r.cancel()
                raise f.exception()
        return rest


def start_ray(jobs: int, address: str = "") -> None:
    """Connect to the Ray cluster at ``address``, or start a local instance with ``jobs`` CPUs. A pool that
    finds Ray running uses it and leaves it running (a process that compiles many times starts it once)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a compile reports nothing anywhere
    env_vars = {k: "1" for k in THREAD_VARIABLES}
    if not address:  # a local instance's workers import what this process can, as spawned ones do
        env_vars["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    ray.init(address=address or None, num_cpus=None if address else jobs, runtime_env={"env_vars": env_vars},
             include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)


class RayPool(TaskPool):
    """A :class:`TaskPool` whose tasks are Ray tasks of one CPU each (and one GPU each when ``gpus``): on
    the cluster at ``address``, or on a Ray instance started here with ``jobs`` CPUs. Tasks are the same
    top-level functions as a local pool's, one thread each, so the results are the same bytes."""

    def __init__(self, jobs: int, progress: bool = False, address: str = "", gpus: bool = False):
        super().__init__(max(jobs, 1), progress)
        self.address, self.gpus = address, gpus
        self._started = False
        self._remote: Any = None

    def __enter__(self) -> RayPool:
        try:
            import ray
        except ImportError as e:
            from qcompiler.errors import QCompilerError

            raise QCompilerError("--executor ray needs the ray package: pip install 'ray>=2.50'") from e
        if not ray.is_initialized():
            start_ray(self.jobs, self.address)
            self._started = True
        self.jobs = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(num_cpus=1, num_gpus=1 if self.gpus else 0)(_ray_call)
        log.info("Ray executor: %d CPUs%s", self.jobs, f" at {self.address}" if self.address else " (local instance)")
        _OPEN.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], desc: str = "",
            limit: int | None = None, cost: Sequence[float] | None = None,
            memory: Sequence[float] | None = None, budget: float | None = None) -> list[Any]:
        import ray

        limit = self.jobs if limit is None else max(1, min(limit, self.jobs))
        bar = tqdm(total=len(tasks), desc=desc, unit="task", disable=not self.progress, leave=False)
        refs: list[Any] = [None] * len(tasks)
        running: dict[Any, int] = {}
        pending = submission_order(len(tasks), cost)
        try:
            while pending:
                i = next_task(pending, list(running.values()), limit, memory, budget)
                if i is None:
                    done, _ = ray.wait(list(running), num_returns=1)
                    bar.update(len(done))
                    for r in done:
                        ray.get(r)  # a failure is raised here, not after the rest has run
                        del running[r]
                    continue
                pending.remove(i)
                refs[i] = self._remote.remote(fn, tasks[i])
                running[refs[i]] = i
            out = []
            for ref in refs:
                result, pid, peak = ray.get(ref)
                self._peaks[pid] = max(peak, self._peaks.get(pid, 0.0))
                out.append(result)
            bar.update(len(tasks) - bar.n)
            return out
        except ray.exceptions.RayTaskError as e:
            for r in running:
                ray.cancel(r)
            raise e.as_instanceof_cause() from None
        finally:
            bar.close()


def make_pool(jobs: int, progress: bool = False, executor: str = "local", address: str = "",
              device: str = "cpu") -> TaskPool:
    """The pool of ``executor``: local worker processes, or Ray tasks."""
    if executor == "ray":
        return RayPool(jobs, progress, address, gpus=device.startswith("cuda"))
    return TaskPool(jobs, progress)
