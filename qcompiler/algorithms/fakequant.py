"""Differentiable fake quantization in torch, on the same grid as ``grid.py`` (ONNX Runtime's).

``fake_quant(w)`` returns ``w_hat`` with the forward value of RTN on the block grid (ties aside:
torch rounds half to even, MLAS half away from zero) and, with ``ste=True``, round's gradient passed
straight through, so a loss on ``w_hat`` can be differentiated with respect to a transform of ``w``.

The STE gradient is that of the composition ``w_hat = (clamp(round(w / s + z), 0, qmax) - z) * s``
with ``round`` taken as the identity, ``s`` and ``z`` functions of the group's max and min (the
gradient of a group's max goes to the elements equal to it, shared among ties, as ``amax``'s does).
It is written out by hand (``_FakeQuantSTE``): autograd of the composition makes about twice as many
passes over the weight, and CafeQ's learners spend most of their time here. On a CPU (float32 or float64)
both directions run as two fused loops each (``kernels``, numba) where torch makes about twenty passes;
``FUSED = False`` keeps the torch code, which is also what a GPU runs.
"""

from __future__ import annotations

import numpy as np
import torch

from qcompiler.algorithms import kernels

FUSED = True  # the CPU kernels (``kernels``) where they apply; tests compare both paths


def blocked(w: torch.Tensor, block: int) -> torch.Tensor:
    """``[K, N]`` -> ``[n_blocks, block, N]``, zero-padded along K (zeros never change a group's range:
    the grid forces ``min <= 0 <= max``)."""
    k, n = w.shape
    nb = -(-k // block)
    if nb * block != k:
        w = torch.cat([w, w.new_zeros(nb * block - k, n)])
    return w.reshape(nb, block, n)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _grid(wb: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """Per group of ``wb`` (``[n_blocks, block, N]``, groups along dim 1): (max, min, scale, zero)."""
    mx, mn = wb.amax(dim=1, keepdim=True), wb.amin(dim=1, keepdim=True)
    if symmetric:
        mid = float(1 << (bits - 1))
        scale = torch.where(mx.abs() > mn.abs(), mx, mn) / -mid
        return mx, mn, scale, torch.full_like(scale, mid)
    qmax = float((1 << bits) - 1)
    scale = (mx.clamp(min=0) - mn.clamp(max=0)) / qmax
    zero = torch.round(-mn.clamp(max=0) / _nonzero(scale)).clamp(0, qmax)
    return mx, mn, scale, zero


def _extreme_grad(wb: torch.Tensor, extreme: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> None:
    """``out += d(extreme)/d(wb) * grad`` for a group max (or min): shared among the tied elements."""
    hit = (wb == extreme).to(wb.dtype)  # a float mask: a bool one costs a cast to int64 to count (2x slower)
    out.addcmul_(hit, grad / hit.sum(dim=1, keepdim=True))


def _codes(wb: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """(q - z, where clamp passes the gradient, max, min, scale, zero); ``w_hat = (q - z) * scale``
    (a zero scale means an all-zero group: q == z there, so w_hat is 0)."""
    qmax = float((1 << bits) - 1)
    mx, mn, scale, zero = _grid(wb, bits, symmetric)
    r = torch.div(wb, _nonzero(scale)).add_(zero).round_()
    d = r.clamp(0, qmax)
    inside = d == r  # clamp's gradient passes here (bounds included, as torch's): one pass instead of three
    return d.sub_(zero), inside, mx, mn, scale, zero


def _ste_backward(g: torch.Tensor, saved: tuple[torch.Tensor, ...], bits: int, symmetric: bool) -> torch.Tensor:
    """The gradient with respect to ``wb`` of ``sum(g * w_hat)``, from ``_codes``' outputs ``saved``.

    With ``u = w / s + z`` and ``w_hat = (clamp(round(u)) - z) * s``: ``d(w_hat)/du = s`` where clamp passes, so
    the gradient through ``u``'s ``w / s`` is ``g`` there (0 in an all-zero group, whose scale is 0), and the sums
    the scale and zero point need are per-group sums of ``g`` and of that gradient times ``s``: fewer passes over
    the weight than writing ``g * s`` out."""
    wb, d, inside, mx, mn, scale, zero = saved
    qmax = float((1 << bits) - 1)
    live = scale != 0  # where(scale == 0, 1, scale) passes no gradient to a zero scale
    safe = _nonzero(scale)
    out = torch.where(inside, g, 0.0)  # d/du times du/dw = (g s) / s
    if not bool(live.all()):
        out.mul_(live)
    # d/ds: through (q - z) * s, and through u's w / s (sum(g s w) / s^2 = sum(out w) / s)
    g_scale = (g * d).sum(dim=1, keepdim=True) - (out * wb).sum(dim=1, keepdim=True) / safe
    if symmetric:
        g_ext = g_scale / -float(1 << (bits - 1))
        pick_max = mx.abs() > mn.abs()
        g_mx, g_mn = torch.where(pick_max, g_ext, 0.0), torch.where(pick_max, 0.0, g_ext)
    else:
        mn0 = mn.clamp(max=0)
        g_zero = (out.sum(dim=1, keepdim=True) - g.sum(dim=1, keepdim=True)) * scale  # z in u, and in (q - z)
        z_raw = torch.round(-mn0 / safe)
        g_zero = torch.where((z_raw >= 0) & (z_raw <= qmax), g_zero, 0.0)  # z = clamp(round(-min / s))
        g_scale = g_scale + torch.where(live, g_zero * mn0 / (safe * safe), 0.0)
        g_mx = torch.where(mx >= 0, g_scale / qmax, 0.0)  # s = (max(mx, 0) - min(mn, 0)) / qmax
        g_mn = torch.where(mn <= 0, -g_scale / qmax - g_zero / safe, 0.0)
    _extreme_grad(wb, mx, g_mx, out)
    _extreme_grad(wb, mn, g_mn, out)
    return out


def _fused(wb: torch.Tensor) -> bool:
    return (FUSED and kernels.available() and wb.device.type == "cpu"
            and wb.dtype in (torch.float32, torch.float64))


def _constants(wb: torch.Tensor, bits: int) -> tuple:
    """qmax and the symmetric midpoint in ``wb``'s dtype (a float64 scalar would promote float32 arithmetic)."""
    kind = np.float32 if wb.dtype == torch.float32 else np.float64
    return kind((1 << bits) - 1), kind(1 << (bits - 1))


def quantize(wb: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``w_hat`` of ``wb`` (``[groups, group, X]``) and what :func:`quantize_backward` needs."""
    if not _fused(wb):
        d, inside, mx, mn, scale, zero = _codes(wb, bits, symmetric)
        return d * scale, (wb, d, inside, mx, mn, scale, zero)
    wb = wb.detach().contiguous()
    groups, _, width = wb.shape
    hat = torch.empty_like(wb)
    mx, mn, scale, zero = (wb.new_empty(groups, width) for _ in range(4))
    qmax, mid = _constants(wb, bits)
    kernels.forward(wb.numpy(), qmax, mid, symmetric, hat.numpy(), mx.numpy(), mn.numpy(), scale.numpy(),
                    zero.numpy())
    return hat, (wb, mx, mn, scale, zero)


def quantize_backward(g: torch.Tensor, saved: tuple[torch.Tensor, ...], bits: int, symmetric: bool) -> torch.Tensor:
    """The straight-through gradient with respect to ``wb`` of ``sum(g * w_hat)`` (:func:`quantize`'s ``saved``)."""
    if len(saved) == 7:
        return _ste_backward(g, saved, bits, symmetric)
    wb, mx, mn, scale, zero = saved
    g = g.detach().to(wb.dtype).contiguous()
    out = torch.empty_like(wb)
    qmax, mid = _constants(wb, bits)
    kernels.backward(g.numpy(), wb.numpy(), mx.numpy(), mn.numpy(), scale.numpy(), zero.numpy(), qmax, mid,
                     symmetric, out.numpy())
    return out


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wb: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
        hat, saved = quantize(wb, bits, symmetric)
        ctx.save_for_backward(*saved)
        ctx.bits, ctx.symmetric = bits, symmetric
        return hat

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return quantize_backward(g, ctx.saved_tensors, ctx.bits, ctx.symmetric), None, None


def _grouped(x: torch.Tensor, items: int, group: int) -> torch.Tensor:
    """``[items * nb, b, X]`` (each item's ``[nb * b, X]`` matrix in blocks) -> ``[groups, group, X]``: each item's
    rows in quant groups of ``group``, zero-padded per item, so no group spans two items."""
    width = x.shape[-1]
    return blocked(x.reshape(-1, width), group) if items == 1 else torch.cat(
        [blocked(part, group) for part in x.reshape(items, -1, width)])


def _ungrouped(x: torch.Tensor, items: int, nb: int, b: int) -> torch.Tensor:
    """The inverse of :func:`_grouped` (padding dropped): ``[items * nb, b, X]``."""
    width = x.shape[-1]
    k = nb * b
    return x.reshape(items, -1, width)[:, :k].reshape(items * nb, b, width)


class _TransformedError(torch.autograd.Function):
    """``||M^-1 Q(M P) - P||^2`` per item, over its blocks, ``Q`` the STE fake quantization (groups of ``group``
    rows of an item's ``[nb * b, X]`` matrix ``M P``); ``items`` independent problems of ``nb`` blocks each are
    laid one after another along the first axis. The same value and gradient as autograd of that composition
    with ``fake_quant``, in fewer passes over the weight: CafeQ's block learner spends nearly all its time here.

    Written as ``||N E||^2 = <E, A E>`` with ``N = M^-1``, ``E = Q(M P) - M P`` and ``A = N^T N`` (``b x b`` per
    block): the backward pass needs two ``b x X`` products (``E E^T``, and the gradient of ``M P`` times
    ``P^T``) where ``N Q(M P) - P`` needs three, and the forward pass two as well. Equal to the composition
    wherever ``N M = I`` (the callers pass ``N`` as ``M``'s inverse); the gradient reaches ``N`` through
    ``A`` (``2 N (E E^T)``) and ``M`` through ``M P``."""

    @staticmethod
    def forward(ctx, m: torch.Tensor, m_inv: torch.Tensor, part: torch.Tensor, bits: int, group: int,
                symmetric: bool, items: int) -> torch.Tensor:
        total, b, width = part.shape
        nb = total // items
        wb = _grouped(torch.bmm(m, part), items, group)
        hat, saved = quantize(wb, bits, symmetric)
        e = _ungrouped(hat.sub_(wb), items, nb, b)  # E = Q(M P) - M P (the quantizer's fresh output, in place)
        a = torch.bmm(m_inv.transpose(1, 2), m_inv)
        ae = torch.bmm(a, e)
        ctx.save_for_backward(m_inv, part, e, ae, *saved)
        ctx.bits, ctx.symmetric, ctx.items, ctx.group = bits, symmetric, items, wb.shape[1]
        if items == 1:
            return torch.vdot(e.reshape(-1), ae.reshape(-1)).reshape(1)
        return torch.linalg.vecdot(e.reshape(items, -1), ae.reshape(items, -1))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        m_inv, part, e, ae, *saved = ctx.saved_tensors
        items = ctx.items
        total, b, width = part.shape
        nb = total // items
        g2 = (2 * g).repeat_interleave(nb)[:, None, None] if items > 1 else 2 * g
        g_inv = torch.bmm(m_inv, torch.bmm(e, e.transpose(1, 2))).mul_(g2)  # d/dN <E, N^T N E> = 2 N E E^T
        g_e = _grouped(ae * g2, items, ctx.group)  # d/dE = 2 A E
        g_tw = quantize_backward(g_e, tuple(saved), ctx.bits, ctx.symmetric).sub_(g_e)  # E = Q(Y) - Y
        g_m = torch.bmm(_ungrouped(g_tw, items, nb, b), part.transpose(1, 2))
        return g_m, g_inv, None, None, None, None, None


def transformed_error(m: torch.Tensor, m_inv: torch.Tensor, part: torch.Tensor, bits: int, group: int,
                      symmetric: bool) -> torch.Tensor:
    """``sum ||M^-1 Q(M P) - P||^2`` for block-diagonal ``M`` (``[nb, b, b]``) and ``P`` ``[nb, b, X]``, with
    ``Q``'s straight-through gradient (:class:`_TransformedError`)."""
    return _TransformedError.apply(m, m_inv, part, bits, group, symmetric, 1)[0]


def transformed_errors(m: torch.Tensor, m_inv: torch.Tensor, part: torch.Tensor, bits: int, group: int,
                       symmetric: bool, items: int) -> torch.Tensor:
    """:func:`transformed_error` of ``items`` independent problems at once (``M``, ``P`` of ``items * nb``
    blocks, each item's ``nb`` consecutive): their ``[items]`` errors, each item quantized on its own groups."""
    return _TransformedError.apply(m, m_inv, part, bits, group, symmetric, items)


def fake_quant(w: torch.Tensor, bits: int, block: int, symmetric: bool, ste: bool = True) -> torch.Tensor:
    k = w.shape[0]
    wb = blocked(w, block or k)
    if ste:
        w_hat = _FakeQuantSTE.apply(wb, bits, symmetric)
    elif wb.requires_grad and torch.is_grad_enabled():  # round's zero gradient, through the scale only
        d, _, _, _, scale, _ = _codes(wb, bits, symmetric)
        w_hat = d * scale
    else:
        w_hat = quantize(wb, bits, symmetric)[0]
    return w_hat.reshape(-1, w.shape[1])[:k]
