"""Differentiable fake quantization in torch, on the same grid as ``grid.py`` (ONNX Runtime's).

``fake_quant(w)`` returns ``w_hat`` with the forward value of RTN on the block grid (ties aside:
torch rounds half to even, MLAS half away from zero) and, with ``ste=True``, round's gradient passed
straight through, so a loss on ``w_hat`` can be differentiated with respect to a transform of ``w``.
"""

from __future__ import annotations

import torch


def _round(x: torch.Tensor, ste: bool) -> torch.Tensor:
    r = torch.round(x)
    return x + (r - x).detach() if ste else r


def blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """``[K, N]`` -> ``[n_blocks, block, N]``, zero-padded along K (zeros never change a group's range:
    the grid forces ``min <= 0 <= max``)."""
    k, n = w.shape
    nb = -(-k // block)
    if nb * block != k:
        w = torch.cat([w, w.new_zeros(nb * block - k, n)])
    return w.reshape(nb, block, n)


def fake_quant(w: torch.Tensor, bits: int, block: int, symmetric: bool, ste: bool = True) -> torch.Tensor:
    k = w.shape[0]
    block = block or k
    wb = blocked(w, block)
    mx, mn = wb.amax(dim=1, keepdim=True), wb.amin(dim=1, keepdim=True)
    if symmetric:
        mid = float(1 << (bits - 1))
        extreme = torch.where(mx.abs() > mn.abs(), mx, mn)
        scale = extreme / -mid
        zero = torch.full_like(scale, mid)
    else:
        qmax = float((1 << bits) - 1)
        mn, mx = mn.clamp(max=0), mx.clamp(min=0)
        scale = (mx - mn) / qmax
        zero = _round(-mn / torch.where(scale == 0, torch.ones_like(scale), scale), ste).clamp(0, qmax)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = _round(wb / safe + zero, ste).clamp(0, float((1 << bits) - 1))
    w_hat = torch.where(scale == 0, torch.zeros_like(wb), (q - zero) * scale)
    return w_hat.reshape(-1, w.shape[1])[:k]
