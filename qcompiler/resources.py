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


def current_rss_mb() -> float:
    """This process's resident memory now (MiB; Linux ``VmRSS``, else the peak)."""
    now = _status_mb("VmRSS")
    return peak_rss_mb() if now is None else now
