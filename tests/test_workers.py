"""The worker pool: results in task order, failures raised, the in-flight limit, peaks, thread counts."""

import os
import platform

import pytest

from qcompiler import resources
from qcompiler.resources import keep_heap
from qcompiler.workers import AUTO_MIN_ELEMENTS, TaskPool, next_task, open_pool, resolve_jobs, submission_order


def _square(x):
    return x * x


def _fail(x):
    if x == 3:
        raise ValueError("task 3 failed")
    return x


def _threads(_):
    import torch

    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.getpid()


def test_results_come_back_in_task_order_from_worker_processes():
    with TaskPool(2) as pool:
        assert open_pool() is pool
        assert pool.map(_square, [(i,) for i in range(9)]) == [i * i for i in range(9)]
        seen = pool.map(_threads, [(i,) for i in range(6)])
        assert pool.workers_peak_mb > 0
    assert open_pool() is None
    assert {t for t, _, _ in seen} == {1} and {v for _, v, _ in seen} == {"1"}  # one thread per worker
    assert os.getpid() not in {p for *_, p in seen}


def _started(i, wait):
    import time

    t = time.monotonic()  # system-wide on Linux: comparable between the workers
    time.sleep(wait)
    return i, t


def test_costliest_tasks_are_taken_first_and_results_stay_in_task_order():
    cost = [1.0, 5.0, 2.0, 9.0, 3.0, 7.0]
    assert submission_order(6, cost) == [3, 5, 1, 4, 2, 0]
    assert submission_order(3, None) == [0, 1, 2]
    assert submission_order(3, [2.0, 2.0, 1.0]) == [0, 1, 2]  # ties keep task order
    with pytest.raises(ValueError, match="2 costs for 3 tasks"):
        submission_order(3, [1.0, 2.0])
    with TaskPool(2) as pool:
        pool.map(_started, [(i, 0.3) for i in range(2)])  # one each: every worker has imported this module
        out = pool.map(_started, [(i, 0.5) for i in range(6)], cost=cost)
    assert [i for i, _ in out] == list(range(6))
    starts = [t for _, t in out]
    by_start = sorted(range(6), key=lambda i: starts[i])
    # two workers, 0.5 s a task: the next task is handed out only when one of the first two ends
    assert set(by_start[:2]) == {3, 5} and set(by_start[-2:]) == {2, 0}


def test_tasks_are_admitted_by_memory_within_the_budget():
    memory = [5.0, 2.0, 4.0, 1.0]
    assert next_task([0, 1, 2, 3], [], 2, memory, 6.0) == 0  # nothing running: the first starts
    assert next_task([1, 2, 3], [0], 2, memory, 6.0) == 3  # 2 and 4 do not fit beside 5: the 1 goes first
    assert next_task([1, 2], [0], 2, memory, 6.0) is None  # wait for task 0
    assert next_task([1, 2], [0, 3], 2, memory, 100.0) is None  # the limit
    assert next_task([2, 1], [], 2, memory, 1.0) == 2  # over the budget alone: runs alone
    assert next_task([2, 1], [3], 2, None, None) == 2
    assert next_task([], [], 2, memory, 6.0) is None
    with TaskPool(2) as pool:
        pool.map(_started, [(i, 0.3) for i in range(2)])  # one each: every worker has imported this module
        out = pool.map(_started, [(i, 0.5) for i in range(3)], memory=[3.0, 3.0, 1.0], budget=4.0)
    starts = sorted(range(3), key=lambda i: out[i][1])
    # 0 and 1 never side by side: 0 starts with the small 2, then 1 after one of them ends
    assert starts[0] in (0, 2) and starts[1] in (0, 2) and starts[2] == 1
    assert abs(out[0][1] - out[2][1]) < 0.25 and out[1][1] - out[0][1] > 0.4


def _keeps_heap(_):
    return keep_heap()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_workers_keep_their_heap():
    with TaskPool(2) as pool:  # in the workers (it would change this process's heap for the rest of the tests)
        assert pool.map(_keeps_heap, [(0,), (1,)]) == [True, True]  # mallopt took every value (it refuses some)


def test_the_parent_keeps_its_thread_settings():
    import torch

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    with TaskPool(2) as pool:
        pool.map(_square, [(1,), (2,)])
        assert torch.get_num_threads() == before
    assert os.environ.get("OMP_NUM_THREADS") == env
    with TaskPool(1) as pool:  # in-process: one thread while the tasks run, then as before
        assert pool.map(_threads, [(0,), (1,)])[0][0] == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_task_raises_its_error(jobs):
    with TaskPool(jobs) as pool, pytest.raises(ValueError, match="task 3 failed"):
        pool.map(_fail, [(i,) for i in range(6)], limit=1 if jobs == 1 else None)


def test_limit_one_runs_in_process():
    with TaskPool(2) as pool:
        assert {p for *_, p in pool.map(_threads, [(0,), (1,)], limit=1)} == {os.getpid()}


def test_resolve_jobs():
    assert resolve_jobs(3, 10) == 3
    assert resolve_jobs(0, 10) == 1  # a tiny model: not worth the workers' start
    assert resolve_jobs(0, AUTO_MIN_ELEMENTS) >= 1
    assert resolve_jobs(4, AUTO_MIN_ELEMENTS, "cuda") == 1
    with pytest.raises(ValueError):
        resolve_jobs(-1, 10)
    with pytest.raises(ValueError):
        TaskPool(0)


def test_compile_peak_adds_the_largest_pool(monkeypatch):
    monkeypatch.setattr(resources, "_WORKERS_PEAK_MB", 0.0)
    own = resources.peak_rss_mb()
    resources.note_workers_peak(123.0)
    resources.note_workers_peak(50.0)
    assert resources.compile_peak_mb() >= own + 123.0


def _writes(a):
    a[0] = 1.0  # Ray hands arrays over read-only: the task gets a writable copy, as a local worker does
    return float(a.sum())


def test_ray_pool_runs_tasks_in_order_on_one_thread_each(ray_instance):
    import numpy as np

    from qcompiler.workers import RayPool, make_pool

    assert isinstance(make_pool(2, executor="ray"), RayPool)
    with make_pool(2, executor="ray") as pool:
        assert open_pool() is pool and pool.jobs == 2
        assert pool.map(_square, [(i,) for i in range(7)], limit=1) == [i * i for i in range(7)]
        seen = pool.map(_threads, [(i,) for i in range(4)])
        assert {t for t, _, _ in seen} == {1} and {v for _, v, _ in seen} == {"1"}
        assert os.getpid() not in {p for *_, p in seen}
        assert pool.map(_writes, [(np.zeros(100_000),)]) == [1.0]
        with pytest.raises(ValueError, match="task 3 failed"):
            pool.map(_fail, [(i,) for i in range(6)])
        assert pool.workers_peak_mb > 0
    assert open_pool() is None
