"""Session factory: CUDA execution provider when a GPU is really usable, else CPU.

``onnxruntime-gpu`` lists CUDA among the available providers even on machines without a GPU, so the
decision is taken from what a created session reports, not from that list.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from qcompiler.errors import QCompilerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionOptions:
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0: ONNX Runtime's default
    optimize: bool = True  # graph optimisations (off for exact equivalence tests)
    # DequantizeLinear->MatMul fusion into MatMulNBits on CPU: 1 = float activations (exact);
    # ONNX Runtime's own default (4) quantizes activations to int8 and adds its own error.
    qdq_accuracy_level: int = 1


def _gpu_present() -> bool:
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def _preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries of the ``nvidia-*`` wheels (what torch's CUDA build uses) so that
    the CUDA provider finds them without LD_LIBRARY_PATH; a no-op where they are missing."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as e:  # pragma: no cover - depends on the machine
            log.debug("onnxruntime.preload_dlls: %s", e)


_WARNED: list[str] = []  # said once a process


def compile_session_device(requested: str) -> str:
    """The ONNX Runtime device of a compile's sessions (validation, calibration runs). ``--device cuda`` asks
    for torch's numerics on the GPU; an onnxruntime without a CUDA provider then runs the sessions on the
    CPU, with a warning, rather than failing the compile."""
    if requested == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        if _WARNED:
            return "cpu"
        _WARNED.append(requested)
        log.warning("--device cuda: torch computes on the GPU; this onnxruntime has no CUDA execution provider, "
                    "so its sessions run on the CPU (install onnxruntime-gpu)")
        return "cpu"
    return requested


def make_session(model: onnx.ModelProto | bytes | str | os.PathLike,
                 options: SessionOptions | None = None) -> ort.InferenceSession:
    options = options or SessionOptions()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if options.threads:
        so.intra_op_num_threads = options.threads
    if not options.optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(options.qdq_accuracy_level))
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else (
        model if isinstance(model, bytes) else str(model))
    want_cuda = options.device == "cuda" or (
        options.device == "auto" and _gpu_present() and "CUDAExecutionProvider" in ort.get_available_providers())
    if want_cuda:
        _preload_cuda_libraries()
        try:
            sess = ort.InferenceSession(source, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            if sess.get_providers()[0] == "CUDAExecutionProvider":
                return sess
        except Exception as e:  # pragma: no cover - depends on the machine
            log.warning("CUDA session failed (%s); using CPU", e)
        if options.device == "cuda":
            raise QCompilerError("--device cuda: ONNX Runtime's CUDA execution provider is not usable here "
                                 f"(this onnxruntime has {', '.join(ort.get_available_providers())})")
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
