"""Export cache keyed by content: a second compile of the same checkpoint does not re-export."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from qcompiler.graphio import publish_dir

EXPORT_FORMAT = "1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def default_cache_dir() -> Path:
    env = os.environ.get("QCOMPILER_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qcompiler"


def content_key(folder: Path, extra: dict[str, str], by_stat: bool = False) -> str:
    """sha256 over the config and weight files plus the exporter versions in ``extra``: over their bytes,
    or (``by_stat``, for checkpoints too large to hash on every compile) over the config's bytes and the
    weight files' names, sizes and modification times."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": EXPORT_FORMAT, **extra}, sort_keys=True).encode())
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and (p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES))
    for p in files:
        h.update(p.name.encode())
        if by_stat and p.name != "config.json":
            st = p.stat()
            h.update(f"\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            continue
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


class ExportCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else default_cache_dir() / "exports"

    def get(self, key: str) -> tuple[Path, dict] | None:
        entry = self.root / key
        model, info = entry / "model.onnx", entry / "info.json"
        if model.is_file() and info.is_file():
            return model, json.loads(info.read_text())
        return None

    def put(self, key: str, model: onnx.ModelProto, info: dict) -> Path:
        with self.staging(key) as tmp:
            large = model.ByteSize() > 1536 * 1024 * 1024 if _can_size(model) else True
            onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=large,
                            all_tensors_to_one_file=True, location="model.onnx.data")
            (tmp / "info.json").write_text(json.dumps(info, indent=1))
        return self.root / key / "model.onnx"

    @contextmanager
    def staging(self, key: str) -> Iterator[Path]:
        """A fresh folder to write the entry ``key`` into (``model.onnx``, its data, ``info.json``); it
        becomes the entry when the block ends without an error, and is removed otherwise."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            yield tmp
            publish_dir(tmp, self.root / key, "info.json")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _can_size(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:
        return False
