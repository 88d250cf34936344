"""Folding exact transforms into coupled pairs (ALGORITHMS.md, "Coupled pairs"). Pure numpy, in place.

Weights are ``[K, N]`` (``y = x W``). A pair's producer columns ``cols`` may be a slice of a fused
weight (V of a fused QKV; up or gate of a fused gate_up).
"""

from __future__ import annotations

import numpy as np


def fold_attn_vo(wv: np.ndarray, bv: np.ndarray | None, wo: np.ndarray, cols: tuple[int, int], head_dim: int,
                 kv_map: tuple[int, ...], mats: np.ndarray) -> None:
    """``W_v[:, cols_h] <- W_v[:, cols_h] M_h`` (and its bias), ``W_o[rows_j] <- M_{kv(j)}^-1 W_o[rows_j]``."""
    n_kv = (cols[1] - cols[0]) // head_dim
    if mats.shape != (n_kv, head_dim, head_dim):
        raise ValueError(f"expected {n_kv} matrices of {head_dim}x{head_dim}, got {mats.shape}")
    inverses = np.linalg.inv(mats)
    for h in range(n_kv):
        c = slice(cols[0] + h * head_dim, cols[0] + (h + 1) * head_dim)
        wv[:, c] = wv[:, c] @ mats[h]
        if bv is not None:
            bv[c] = bv[c] @ mats[h]
    for j, h in enumerate(kv_map):
        r = slice(j * head_dim, (j + 1) * head_dim)
        wo[r, :] = inverses[h] @ wo[r, :]


def fold_mlp(up: np.ndarray, b_up: np.ndarray | None, up_cols: tuple[int, int], down: np.ndarray,
             scale: np.ndarray, perm: np.ndarray, gate: np.ndarray | None = None, b_gate: np.ndarray | None = None,
             gate_cols: tuple[int, int] | None = None) -> None:
    """New channel ``i`` is old channel ``perm[i]``, scaled by ``scale[i]`` on up (and undone on down);
    gate's columns follow the same permutation. ``gate`` may be ``up`` itself (fused gate_up)."""
    u = slice(*up_cols)
    up[:, u] = up[:, u][:, perm] * scale
    if b_up is not None:
        b_up[u] = b_up[u][perm] * scale
    if gate is not None and gate_cols is not None:
        g = slice(*gate_cols)
        gate[:, g] = gate[:, g][:, perm]
        if b_gate is not None:
            b_gate[g] = b_gate[g][perm]
    down[:] = down[perm, :] / scale[:, None]


def product_error(a: np.ndarray, b: np.ndarray, a_hat: np.ndarray, b_hat: np.ndarray, head_dim: int | None = None,
                  kv_map: tuple[int, ...] | None = None) -> float:
    """PQE: ``||A_hat B_hat - A B||_F / ||A B||_F``. With heads (V·O), each query head ``j`` has its
    own product ``A[:, cols_kv(j)] B[rows_j]``; the errors and norms are summed over heads."""
    if head_dim is None or kv_map is None:
        ref = a @ b
        return float(np.linalg.norm(a_hat @ b_hat - ref) / max(np.linalg.norm(ref), 1e-30))
    d, num, den = head_dim, 0.0, 0.0
    for j, h in enumerate(kv_map):
        c, r = slice(h * d, (h + 1) * d), slice(j * d, (j + 1) * d)
        ref = a[:, c] @ b[r]
        num += float(np.sum((a_hat[:, c] @ b_hat[r] - ref) ** 2))
        den += float(np.sum(ref ** 2))
    return (num / max(den, 1e-30)) ** 0.5
