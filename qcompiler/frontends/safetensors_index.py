"""The tensors of a Hugging Face checkpoint's ``*.safetensors`` files, read from their headers only.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
``data_offsets`` into the data that follows) and the raw tensor bytes. Reading the headers is enough
to know every tensor's file, type and size; the data is read a piece at a time (``read_fp32_pieces``).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompiler.errors import ModelLoadError
from qcompiler.frontends.cache import WEIGHT_SUFFIXES

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class StoredTensor:
    name: str
    file: Path
    dtype: str  # safetensors spelling: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """One file's header (``__metadata__`` dropped) and where its data starts. ModelLoadError names the file
    if it is not safetensors."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ModelLoadError(f"not a safetensors file (shorter than 8 bytes): {p}")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > p.stat().st_size - 8:
                raise ModelLoadError(f"not a safetensors file (header length {n}): {p}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelLoadError(f"cannot read {p}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelLoadError(f"not a safetensors file (header is not JSON): {p}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"not a safetensors file (header is not a JSON object): {p}")
    header.pop("__metadata__", None)
    return header, 8 + n


def checkpoint_tensors(folder: str | os.PathLike) -> dict[str, StoredTensor]:
    """Every tensor of the folder's ``*.safetensors`` files (one file or shards), by name."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        raise ModelLoadError(f"no *.safetensors weights in {folder}" +
                             (f" (found {', '.join(others[:3])}; convert them to safetensors to stream)" if others
                              else ""))
    out: dict[str, StoredTensor] = {}
    for f in files:
        header, start = read_header(f)
        end = f.stat().st_size
        for name, spec in header.items():
            try:
                dtype, shape, (lo, hi) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ModelLoadError(f"bad safetensors header entry {name!r} in {f}") from None
            if name in out:
                raise ModelLoadError(f"tensor {name!r} is in both {out[name].file.name} and {f.name}")
            t = StoredTensor(name, f, dtype, shape)
            if dtype in ITEM_BYTES and (hi - lo != t.numel * ITEM_BYTES[dtype] or start + hi > end):
                raise ModelLoadError(f"tensor {name!r} in {f.name} is truncated or mis-sized")
            out[name] = t
    return out


def float_bytes_fp32(tensors: dict[str, StoredTensor]) -> int:
    """Bytes the checkpoint's float tensors take as fp32 (what an export in fp32 holds)."""
    return sum(4 * t.numel for t in tensors.values() if t.dtype in FLOAT_DTYPES)


PIECE_BYTES = 64 * 1024 * 1024  # fp32 bytes per piece read by ``read_fp32_pieces``


def read_fp32_pieces(t: StoredTensor, transpose: bool = False,
                     piece_bytes: int | None = None) -> Iterator[np.ndarray]:
    """A tensor's values as float32 (bf16/fp16/fp64 converted), in row-major order, in contiguous pieces of
    at most about ``piece_bytes`` (default ``PIECE_BYTES``; one row if a row is larger): memory holds one
    piece, however large the tensor. ``transpose`` (2-D only): the pieces are the transposed matrix's,
    read a block of columns at a time."""
    import torch
    from safetensors import safe_open

    if t.dtype not in FLOAT_DTYPES:
        raise ModelLoadError(f"tensor {t.name!r} in {t.file.name} is {t.dtype}, not a float type")
    if transpose and len(t.shape) != 2:
        raise ValueError(f"only a 2-D tensor can be read transposed, not {t.shape}")
    rows = t.shape[1] if transpose else (t.shape[0] if t.shape else 1)
    row_bytes = 4 * max(1, t.numel // max(rows, 1))
    step = max(1, (piece_bytes or PIECE_BYTES) // row_bytes)
    try:
        with safe_open(str(t.file), framework="pt") as f:
            if not t.shape:
                yield f.get_tensor(t.name).to(torch.float32).numpy().reshape(())
                return
            sl = f.get_slice(t.name)
            for a in range(0, rows, step):
                b = min(rows, a + step)
                piece = sl[:, a:b].to(torch.float32).T if transpose else sl[a:b].to(torch.float32)
                yield np.ascontiguousarray(piece.numpy())
                del piece
    except ModelLoadError:
        raise
    except Exception as e:  # safetensors' own errors: truncated files and the like
        raise ModelLoadError(f"cannot read tensor {t.name!r} from {t.file}: {e}") from None
