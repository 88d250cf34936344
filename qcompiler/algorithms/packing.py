"""Byte layouts of quantized weights for the two emitters.

MatMulNBits (com.microsoft): ``B`` uint8 ``[N, n_blocks, block_size * bits / 8]`` (codes of one column,
low bits first), ``scales`` ``[N, n_blocks]``, ``zero_points`` uint8 ``[N, ceil(n_blocks * bits / 8)]``
packed the same way. 3-bit codes travel in the 4-bit container. Symmetric grids omit the zero points
(the kernel's default is ``2^(bits-1)``): integer zero points, no g_idx, so the fast kernels run.

DequantizeLinear (opset 21): codes keep the ``[K, N]`` layout, ``axis=0``, ``block_size``; int4/uint4
(2- and 3-bit codes in the 4-bit types) or int8/uint8. Symmetric: signed codes without zero point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.algorithms.grid import QuantizedWeight


def container_bits(bits: int) -> int:
    """The MatMulNBits / DequantizeLinear width that stores ``bits``-bit codes."""
    return 4 if bits == 3 else bits


def pack_along_last(values: np.ndarray, bits: int, fill: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values along the last axis, low bits first, padding with ``fill``."""
    per_byte = 8 // bits
    n = values.shape[-1]
    pad = (-n) % per_byte
    v = values.astype(np.uint8)
    if pad:
        v = np.concatenate([v, np.full(v.shape[:-1] + (pad,), fill, dtype=np.uint8)], axis=-1)
    v = v.reshape(v.shape[:-1] + (-1, per_byte))
    out = np.zeros(v.shape[:-1], dtype=np.uint8)
    for i in range(per_byte):
        out |= (v[..., i] & ((1 << bits) - 1)) << (i * bits)
    return out


def unpack_along_last(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per_byte = 8 // bits
    parts = [(packed >> (i * bits)) & ((1 << bits) - 1) for i in range(per_byte)]
    v = np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))
    return v[..., :count].astype(np.uint8)


def nbits_block_size(qw: QuantizedWeight) -> int:
    """MatMulNBits needs a power-of-two block of at least 16; a per-channel grid is one padded block."""
    k = qw.shape[0]
    bs = qw.block_size
    if bs >= 16 and bs & (bs - 1) == 0:
        return bs
    if bs != k:
        raise ValueError(f"block size {bs} is not a power of two >= 16 and not per-channel")
    return max(16, 1 << (k - 1).bit_length())


@dataclass(frozen=True)
class NBitsTensors:
    b: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(n_blocks*bits/8)] or None
    bits: int  # container bits written in the node
    block_size: int
    k: int
    n: int


def pack_matmulnbits(qw: QuantizedWeight) -> NBitsTensors:
    k, n = qw.shape
    cb = container_bits(qw.bits)
    bs = nbits_block_size(qw)
    nb = (k + bs - 1) // bs
    codes = qw.codes
    zps = qw.zero_points
    if qw.symmetric and cb != qw.bits:
        # symmetric 3-bit codes centred at 4 move to the container's implicit zero point 8
        shift = (1 << (cb - 1)) - (1 << (qw.bits - 1))
        codes = codes + np.uint8(shift)
        zps = zps + np.uint8(shift)
    # rows past K are padding the kernel never reads; zero bytes, as ONNX Runtime's quantizer writes
    full = np.zeros((nb * bs, n), dtype=np.uint8)
    full[:k] = codes
    col_major = np.ascontiguousarray(full.T).reshape(n, nb, bs)
    b = pack_along_last(col_major, cb, 0)
    scales = qw.scales
    if bs != qw.block_size:  # per-channel grid widened to one padded block
        scales = scales[:1]
        zps = zps[:1]
    scales_t = np.ascontiguousarray(scales.T)
    zp_packed = None
    if not qw.symmetric:
        zp_packed = pack_along_last(np.ascontiguousarray(zps.T), cb, 1 << (cb - 1))
    return NBitsTensors(b, scales_t, zp_packed, cb, bs, k, n)


def unpack_matmulnbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                       block_size: int, k: int, n: int) -> np.ndarray:
    """The float ``[K, N]`` weight a MatMulNBits node computes with (its inputs B, scales, zero_points and
    attributes): codes minus zero point (the container's middle where none is stored) times the scale."""
    nb = (k + block_size - 1) // block_size
    codes = unpack_along_last(np.asarray(b).reshape(n, nb, -1), bits, block_size).reshape(n, nb, block_size)
    sc = np.asarray(scales, dtype=np.float32).reshape(n, nb)
    if zero_points is None:
        zp = np.full((n, nb), 1 << (bits - 1), dtype=np.float32)
    else:
        zp = unpack_along_last(np.asarray(zero_points).reshape(n, -1), bits, nb).astype(np.float32)
    w = (codes.astype(np.float32) - zp[..., None]) * sc[..., None]
    return np.ascontiguousarray(w.reshape(n, nb * block_size)[:, :k].T)


@dataclass(frozen=True)
class QDQTensors:
    codes: np.ndarray  # int8 or uint8 values [K, N] (to be stored as (u)int4 or (u)int8)
    scales: np.ndarray  # [n_blocks, N]
    zero_points: np.ndarray | None  # same type as codes, [n_blocks, N]; None when symmetric
    bits: int  # 4 or 8 (storage type width)
    signed: bool
    block_size: int


def pack_qdq(qw: QuantizedWeight) -> QDQTensors:
    cb = 8 if qw.bits == 8 else 4
    if qw.symmetric:
        mid = 1 << (qw.bits - 1)
        codes = (qw.codes.astype(np.int16) - mid).astype(np.int8)
        return QDQTensors(codes, qw.scales, None, cb, True, qw.block_size)
    return QDQTensors(qw.codes, qw.scales, qw.zero_points, cb, False, qw.block_size)
