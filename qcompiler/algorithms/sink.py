"""A coupled pair's output at a decoder's attention sink (the first position), from its state alone.

One token attends only to itself, so at the sink a V·O pair is linear: ``x A_kv(j) B_j`` for each query head
``j`` (the heads' outputs are summed by O; kept apart here, as the later tokens' attention weighs them apart).
An up·down pair is ``(g * (x A)) B`` with ``g`` the factor the activation applies to each channel there: the
gate's activation of a gated MLP, ``act(z) / z`` of an ungated one (exact for a positively homogeneous
activation). ``g`` is read off the float model's own run: ``inner / (x A)``.
"""

from __future__ import annotations

import numpy as np

from qcompiler.algorithms.joint import Heads


def activation_factor(inner: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``g`` with ``inner = g * z`` per channel (0 where ``z`` is 0: such a channel carries nothing)."""
    inner, z = np.asarray(inner, dtype=np.float64), np.asarray(z, dtype=np.float64)
    return np.divide(inner, z, out=np.zeros_like(z), where=np.abs(z) > 1e-30)


def pair_sink_output(x: np.ndarray, a: np.ndarray, b: np.ndarray, heads: Heads | None,
                     g: np.ndarray | None = None) -> np.ndarray:
    """The pair's output on the sink state ``x`` ``[K]``: V·O ``[heads, N]`` (query head by head), up·down ``[N]``
    through the activation's factor ``g``."""
    if heads is not None:
        d = heads.head_dim
        return np.stack([x @ a[:, h * d:(h + 1) * d] @ b[j * d:(j + 1) * d] for j, h in enumerate(heads.kv_map)])
    return ((x @ a) * g) @ b


def sink_ratio(x: np.ndarray, exact: tuple[np.ndarray, np.ndarray], plain: tuple[np.ndarray, np.ndarray],
               joint: tuple[np.ndarray, np.ndarray], heads: Heads | None, g: np.ndarray | None = None) -> float:
    """Squared error of the pair's sink output, joint over plain rounding (each ``(A, B)``, effective weights)."""
    ref = pair_sink_output(x, *exact, heads, g)
    plain_err = float(np.sum((pair_sink_output(x, *plain, heads, g) - ref) ** 2))
    return float(np.sum((pair_sink_output(x, *joint, heads, g) - ref) ** 2)) / max(plain_err, 1e-300)
