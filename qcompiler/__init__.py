"""qcompiler: transformer models to weight-quantized ONNX that plain ONNX Runtime runs."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
