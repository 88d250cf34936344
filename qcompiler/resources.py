"""What a compile costs the machine."""

from __future__ import annotations


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB).

    Linux: ``VmHWM``, which starts afresh at ``exec``. ``ru_maxrss`` does not: a process started from a
    large parent inherits the parent's size as its floor (the bench's workers did).
    """
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_WORKERS_PEAK_MB = 0.0  # the largest worker pool this process ran (qcompiler.workers), its peaks added up


def note_workers_peak(mb: float) -> None:
    """Record a finished worker pool's peak memory (the sum of its workers')."""
    global _WORKERS_PEAK_MB
    _WORKERS_PEAK_MB = max(_WORKERS_PEAK_MB, mb)


def compile_peak_mb() -> float:
    """A compile's peak memory (MiB): this process's, plus the largest worker pool it ran (each worker's
    peak added: an upper bound, since they need not peak together or with this process)."""
    return peak_rss_mb() + _WORKERS_PEAK_MB


def current_rss_mb() -> float:
    """This process's resident memory now (MiB; Linux ``VmRSS``, else the peak)."""
    now = _status_mb("VmRSS")
    return peak_rss_mb() if now is None else now


def machine_busy_seconds(stat: str | None = None) -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux ``/proc/stat``: user, nice, system,
    irq, softirq, steal), or None where that cannot be read. ``stat``: the file's text (for tests)."""
    import os
    from pathlib import Path

    try:
        text = stat if stat is not None else Path("/proc/stat").read_text()
        f = text.splitlines()[0].split()  # cpu user nice system idle iowait irq softirq steal ...
        if f[0] != "cpu" or len(f) < 9:
            return None
        ticks = sum(int(f[i]) for i in (1, 2, 3, 6, 7, 8))
    except (OSError, IndexError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds used by this process's finished (waited-for) children."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def others_cpu_share(busy: float, own: float, wall: float, cores: int) -> float:
    """The share of the machine (0-1) that other processes used over ``wall`` seconds in which the
    machine was ``busy`` CPU seconds, ``own`` of them the measured process's."""
    return min(1.0, max(0.0, (busy - own) / max(wall * cores, 1e-9)))


# glibc's allocator: how a process's freed memory goes back to the system (mallopt's parameters)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt parameters (malloc.h)


def _libc():
    """glibc, or None (another C library: its allocator's own defaults)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def bound_heap(mmap_bytes: int = 1 << 20) -> None:
    """Serve every allocation of at least ``mmap_bytes`` from its own mapping, returned on free.

    glibc raises this threshold as large blocks are freed (up to 32 MB), after which a solver's many
    temporary arrays come from the heap and fragment it: the resident size of a streamed compile then
    spiked to 3x its working set. Fixing the threshold costs a page fault per new large array."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise: a chunk's many mid-sized arrays
    fragment the heap, and the streamed compile's resident size would creep up chunk by chunk)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_heap(mmap_bytes: int = 32 << 20, trim_bytes: int = 1 << 30) -> bool:
    """The opposite of :func:`bound_heap`, for a worker process whose tasks are alike: every block comes from the
    heap (glibc's own mappings off; ``mmap_bytes`` is their threshold should a later call turn them on), and
    freed memory stays in it up to ``trim_bytes``, so the next task and the next learner step reuse those pages
    instead of faulting in fresh zeroed ones. A joint-rounding task made ~60k page faults a time with fresh
    pages, about none with the heap; a learner at Llama-3-8B's q/k/v shape (4096 x 6144, one thread) made ~10k
    faults a step while blocks over 32 MB (glibc's largest threshold) were still mapped apiece: 17% of its time,
    for 12% more peak memory without them. Whether glibc took every value."""
    libc = _libc()
    return libc is not None and all(libc.mallopt(param, value) == 1 for param, value in
                                    ((_M_MMAP_THRESHOLD, mmap_bytes), (_M_TRIM_THRESHOLD, trim_bytes),
                                     (_M_MMAP_MAX, 0)))
