"""What a compile costs the machine."""

from __future__ import annotations


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB).

    Linux: ``VmHWM``, which starts afresh at ``exec``. ``ru_maxrss`` does not: a process started from a
    large parent inherits the parent's size as its floor (the bench's workers did).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
