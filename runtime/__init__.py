"""ONNX Runtime side: sessions (CUDA EP when present, else CPU), validation, evaluation."""

from qcompiler.runtime.session import SessionOptions, make_session
from qcompiler.runtime.validate import ValidationResult, validate

__all__ = ["SessionOptions", "make_session", "ValidationResult", "validate"]
