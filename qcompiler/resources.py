"""What a compile costs the machine."""

from __future__ import annotations


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB): a compile's peak when it runs alone (the CLI)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
