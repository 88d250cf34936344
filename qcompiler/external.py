"""Weights that live in files, not in memory: the streaming compile's storage layer.

- ``ExternalValues``: a graph constant whose bytes stay in an external data file and are read on
  every access, never cached in the graph (onnx-graphsurgeon's own ``LazyValues`` caches on first
  read, which would pull the whole model into memory one weight at a time).
- ``DataSink``: an append-only data file. ``spill`` moves every large in-memory constant of a graph
  into it, replacing its values with ``ExternalValues``; passes never know.
- ``save_with_external_data``: writes a model whose large tensors are external (in the input's data
  file or a sink) as ``<name>`` + ``<name>.data``, copying bytes file to file in bounded pieces,
  atomically.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from qcompiler.errors import OutputError

log = logging.getLogger(__name__)

ALIGN = 4096  # offsets in written data files (ONNX Runtime can memory-map aligned tensors)
COPY_PIECE = 64 * 1024 * 1024  # bytes per read/write when copying tensor data between files
SPILL_MIN_BYTES = 64 * 1024  # constants at least this large leave memory
SPILL_NAME = "qcompiler-spill.data"


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """A tensor's external data entries (location, offset, length) as a dict."""
    return {e.key: e.value for e in tensor.external_data}


def read_external(tensor: onnx.TensorProto, path: str | os.PathLike) -> bytes:
    """The bytes of the external ``tensor`` from ``path`` (its data file)."""
    info = external_info(tensor)
    offset, length = int(info.get("offset", 0)), int(info["length"]) if "length" in info else -1
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if length >= 0 and len(data) != length:
        raise OutputError(f"external data of {tensor.name!r} is truncated in {path}")
    return data


def inline_copy(tensor: onnx.TensorProto, path: str | os.PathLike) -> onnx.TensorProto:
    """A copy of the external ``tensor`` with its bytes read from ``path`` (its data file) into ``raw_data``."""
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    del out.external_data[:]
    out.data_location = onnx.TensorProto.DEFAULT
    out.raw_data = read_external(tensor, path)
    return out


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=k, value=v)
    tensor.data_location = onnx.TensorProto.EXTERNAL


class ExternalValues(LazyValues):
    """Values of ``tensor`` (an external-data TensorProto) read from ``path`` whenever asked."""

    def __init__(self, tensor: onnx.TensorProto, path: str | os.PathLike):
        super().__init__(tensor)
        self.path = Path(path)
        self.offset = int(external_info(tensor).get("offset", 0))

    def read_bytes(self) -> bytes:
        return read_external(self.tensor, self.path)

    def load(self) -> np.ndarray:
        return numpy_helper.to_array(inline_copy(self.tensor, self.path))

    def __str__(self) -> str:
        return f"ExternalValues (shape={self.shape}, dtype={self.dtype}, file={self.path.name})"


def read_values(constant: gs.Constant) -> np.ndarray:
    """A constant's values; external ones are read from their file each time and not kept."""
    if isinstance(constant._values, ExternalValues):
        return constant._values.load()
    return constant.values


def is_external(constant: gs.Tensor) -> bool:
    return isinstance(constant, gs.Constant) and isinstance(constant._values, ExternalValues)


def attach_external(graph: gs.Graph, model: onnx.ModelProto, base_dir: str | os.PathLike) -> int:
    """Make every constant of ``graph`` whose tensor is external (data not loaded) read from
    ``base_dir`` lazily. Returns how many."""
    base = Path(base_dir)
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    count = 0
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) and t.name in external:
            loc = external_info(t._values.tensor).get("location", "")
            t._values = ExternalValues(t._values.tensor, base / loc)
            count += 1
    return count


def external_sources(graph: gs.Graph) -> dict[str, Path]:
    """Every external ``location`` the graph's constants use -> the file it names."""
    out: dict[str, Path] = {}
    for t in graph.tensors().values():
        if is_external(t):
            loc = external_info(t._values.tensor).get("location", "")
            if out.setdefault(loc, t._values.path) != t._values.path:
                raise OutputError(f"two external data files are both called {loc!r}")
    return out


class DataSink:
    """An append-only data file for tensors leaving memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self.bytes = 0

    def write(self, tensor: onnx.TensorProto) -> ExternalValues:
        """Append ``tensor``'s raw data; returns values that read it back (the tensor keeps no data)."""
        data = tensor.raw_data
        pad = (-self._f.tell()) % ALIGN
        if pad:
            self._f.write(b"\0" * pad)
        offset = self._f.tell()
        self._f.write(data)
        self._f.flush()
        self.bytes += len(data)
        # a fresh proto, not a copy with raw_data cleared: protobuf (upb) frees a message's memory only
        # with its arena, so a cleared copy kept every spilled tensor's bytes alive (the streamed
        # compile's resident size grew by each chunk's spilled bytes)
        out = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        _set_external(out, self.path.name, offset, len(data))
        return ExternalValues(out, self.path)

    def spill(self, graph: gs.Graph, min_bytes: int = SPILL_MIN_BYTES) -> int:
        """Move every in-memory constant of at least ``min_bytes`` into the file. Returns bytes moved."""
        moved = 0
        for t in graph.tensors().values():
            if not isinstance(t, gs.Constant) or isinstance(t._values, ExternalValues):
                continue
            if isinstance(t._values, LazyValues):  # a tensor proto in memory (packed 4-bit codes, ...)
                if t._values.tensor.data_location == onnx.TensorProto.EXTERNAL or t._values.nbytes < min_bytes:
                    continue
                proto = onnx.TensorProto()
                proto.CopyFrom(t._values.tensor)
                proto.name = t.name
            elif t.values.nbytes < min_bytes:
                continue
            else:
                proto = OnnxExporter.export_tensor_proto(t)  # exactly the bytes the exporter would write
            if not proto.HasField("raw_data"):
                proto = numpy_helper.from_array(numpy_helper.to_array(proto), proto.name)
            t._values = self.write(proto)
            t.data_location = None
            moved += len(proto.raw_data)
        return moved

    def close(self) -> None:
        self._f.close()


def save_with_external_data(model: onnx.ModelProto, path: str | os.PathLike,
                            sources: dict[str, Path], min_bytes: int = 1024) -> Path:
    """Write ``model`` to ``path`` + ``<name>.data``, atomically.

    External tensors are copied from the files named in ``sources`` (their ``location`` -> the file);
    inline tensors of at least ``min_bytes`` are moved out as well, so the proto stays small, and
    external ones below it come inline.
    """
    out = Path(path)
    data_name = out.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with open(tmpdir / data_name, "wb") as dst:
            for t in model.graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    info = external_info(t)
                    src = sources.get(info.get("location", ""))
                    if src is None:
                        raise OutputError(f"external data of {t.name!r} has no known source: {info.get('location')}")
                    offset, length = int(info.get("offset", 0)), int(info["length"])
                    if length < min_bytes:  # small ones inline: shape inputs must be (ONNX Runtime)
                        t.CopyFrom(inline_copy(t, src))
                        continue
                    start = _align(dst)
                    with open(src, "rb") as f:
                        f.seek(offset)
                        left = length
                        while left:
                            piece = f.read(min(COPY_PIECE, left))
                            if not piece:
                                raise OutputError(f"external data of {t.name!r} is truncated in {src}")
                            dst.write(piece)
                            left -= len(piece)
                    _set_external(t, data_name, start, length)
                elif t.ByteSize() >= min_bytes:
                    if not t.HasField("raw_data"):
                        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
                    start = _align(dst)
                    dst.write(t.raw_data)
                    length = len(t.raw_data)
                    t.ClearField("raw_data")
                    _set_external(t, data_name, start, length)
        onnx.save_model(model, str(tmpdir / out.name))
        os.replace(tmpdir / data_name, out.parent / data_name)
        os.replace(tmpdir / out.name, out)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    log.info("wrote %s with external data %s", out, data_name)
    return out


def _align(f) -> int:
    pad = (-f.tell()) % ALIGN
    if pad:
        f.write(b"\0" * pad)
    return f.tell()
