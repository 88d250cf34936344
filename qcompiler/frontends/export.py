"""torch -> ONNX through ``torch.onnx.export(dynamo=True)`` (torch.export underneath)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import onnx
import torch

from qcompiler.errors import ModelLoadError, first_line
from qcompiler.metadata import SCOPE_PREFIX, set_model_properties

log = logging.getLogger(__name__)

WRAPPER_ATTR = "inner"

# onnxscript rewrite rules the exporter's optimizer skips: ``SlicesSplit`` (two Slices of one tensor -> a Split)
# matches every pair of Slice nodes and took 51 s of SmolLM2's 156 s export without ever firing on our families'
# graphs (their Slices have dynamic ends); tests/test_frontends.py checks the graphs are the same without it
SKIPPED_REWRITES = frozenset({"SlicesSplit"})


@contextlib.contextmanager
def _skip_slow_rewrites() -> Iterator[None]:
    """The exporter's default rewrite rules less ``SKIPPED_REWRITES`` for the duration (onnxscript reads the
    module-level tuple when it optimizes; another onnxscript layout leaves the rules as they are)."""
    try:
        from onnxscript import rewriter
    except ImportError:
        yield
        return
    saved = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(saved, tuple):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if getattr(r, "name", None) not in SKIPPED_REWRITES)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


class _Wrapper(torch.nn.Module):
    """Calls ``inner(**named inputs)`` and keeps the selected outputs, so ONNX gets plain names."""

    def __init__(self, inner: torch.nn.Module, input_names: Sequence[str],
                 select: Callable[[Any], Any], extra_kwargs: dict[str, Any]):
        super().__init__()
        self.inner = inner
        self._names = list(input_names)
        self._select = select
        self._extra = dict(extra_kwargs)

    def forward(self, *args):
        return self._select(self.inner(**dict(zip(self._names, args, strict=True)), **self._extra))


def export_to_onnx(module: torch.nn.Module, inputs: dict[str, torch.Tensor], output_names: Sequence[str],
                   dynamic_axes: dict[str, dict[int, str]] | None = None,
                   select: Callable[[Any], Any] = lambda out: out,
                   extra_kwargs: dict[str, Any] | None = None) -> onnx.ModelProto:
    """Export ``module`` called with keyword ``inputs``. ``dynamic_axes`` maps input name -> {axis: dim
    name}; every example tensor must be its own object (aliased inputs break the export)."""
    model = export_program(module, inputs, output_names, dynamic_axes, select, extra_kwargs).model_proto
    set_model_properties(model, {SCOPE_PREFIX: WRAPPER_ATTR + "."})
    return model


def export_program(module: torch.nn.Module, inputs: dict[str, torch.Tensor], output_names: Sequence[str],
                   dynamic_axes: dict[str, dict[int, str]] | None = None,
                   select: Callable[[Any], Any] = lambda out: out,
                   extra_kwargs: dict[str, Any] | None = None, optimize: bool = True):
    """``export_to_onnx``'s ``torch.onnx.ONNXProgram``, optimized by the exporter unless ``optimize`` is
    false (then initializers hold the module's own tensors, fake ones included)."""
    names = list(inputs)
    wrapper = _Wrapper(module.eval(), names, select, extra_kwargs or {}).eval()
    dims: dict[str, torch.export.Dim] = {}
    specs = None
    if dynamic_axes:
        specs = [{ax: dims.setdefault(d, torch.export.Dim(d)) for ax, d in dynamic_axes.get(n, {}).items()} or None
                 for n in names]
    return export_wrapper(wrapper, inputs, output_names, specs, optimize)


def export_wrapper(wrapper: torch.nn.Module, inputs: dict[str, torch.Tensor], output_names: Sequence[str],
                   dynamic_shapes: Sequence[dict | None] | None = None, optimize: bool = True):
    """``torch.onnx.export(dynamo=True)`` of a module whose ``forward(*args)`` takes ``inputs``' tensors in order
    (the ONNX inputs get their names); ``dynamic_shapes`` holds one ``{axis: torch.export.Dim}`` (or None) per
    input. The wrapped model must be the module's attribute ``WRAPPER_ATTR`` (module paths are read below it).
    Errors become ``ModelLoadError`` naming the root cause."""
    ids = [id(t) for t in inputs.values()]
    if len(set(ids)) != len(ids):
        raise ModelLoadError("example inputs must be distinct tensors (aliased inputs break the export)")
    names = list(inputs)
    shapes = None if dynamic_shapes is None else (tuple(dynamic_shapes),)  # one entry for the *args
    onnx_log = logging.getLogger("torch.onnx")
    saved_level = onnx_log.level
    if not log.isEnabledFor(logging.DEBUG):  # torch.onnx's chatter ("torchvision is not installed")
        onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad(), _skip_slow_rewrites():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper.eval(), tuple(inputs.values()), dynamo=True, input_names=names,
                                        output_names=list(output_names), dynamic_shapes=shapes,
                                        verbose=False, optimize=optimize)
    except Exception as e:
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        raise ModelLoadError(f"torch.onnx export failed: {type(root).__name__}: {first_line(root)}") from e
    finally:
        onnx_log.setLevel(saved_level)
    return program
