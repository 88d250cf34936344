"""Where torch runs a compile's numerics: the one place ``--device auto`` is resolved."""

from __future__ import annotations

from qcompiler.errors import QCompilerError


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; ``cuda`` without one is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise QCompilerError("--device cuda: torch sees no CUDA device")
    return requested
