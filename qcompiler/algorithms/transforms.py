"""Transforms as arrays: random orthogonal and well-conditioned invertible matrices, permutations."""

from __future__ import annotations

import numpy as np


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-distributed orthogonal ``n x n`` (QR of a Gaussian with the sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def random_invertible(n: int, rng: np.random.Generator, condition: float = 4.0) -> np.ndarray:
    """``U diag(s) V^T`` with singular values spread log-uniformly in ``[1/sqrt(c), sqrt(c)]``."""
    s = np.exp(rng.uniform(-0.5, 0.5, n) * np.log(condition))
    return (random_orthogonal(n, rng) * s) @ random_orthogonal(n, rng).T


def random_scale(n: int, rng: np.random.Generator, spread: float = 4.0, signs: bool = True) -> np.ndarray:
    d = np.exp(rng.uniform(-0.5, 0.5, n) * np.log(spread))
    return d * rng.choice([-1.0, 1.0], n) if signs else d


def is_permutation(perm: np.ndarray, n: int) -> bool:
    return perm.shape == (n,) and np.array_equal(np.sort(perm), np.arange(n))


def apply_blocks(blocks: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``T W`` for block-diagonal ``T`` (its blocks ``[nb, b, b]``) and ``W`` ``[K, N]``, ``K = nb b``: one BLAS
    product per block (``np.einsum`` without ``optimize`` runs its own loops, about 2x slower at 64-wide blocks)."""
    nb, b, _ = blocks.shape
    return np.matmul(blocks, w.reshape(nb, b, -1)).reshape(nb * b, -1)


def row_scale(row_weights: np.ndarray | None, k: int) -> np.ndarray | None:
    """``sqrt(r)`` of ``k`` row weights scaled to mean 1 (None: alike): the ``D`` of an error weighted by row."""
    if row_weights is None:
        return None
    r = np.asarray(row_weights, np.float64)
    if r.shape != (k,):
        raise ValueError(f"row weights have shape {r.shape}; the weight has {k} rows")
    return np.sqrt(r / np.mean(r))
