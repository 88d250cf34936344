"""An ``nn.Module`` plus example inputs, from Python."""

from __future__ import annotations

import torch

from qcompiler.errors import ModelLoadError
from qcompiler.frontends.base import LoadedModel
from qcompiler.frontends.export import export_to_onnx


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelLoadError("the module must return a tensor, or a tuple/ModelOutput whose first item is one")


def load_module(module: torch.nn.Module, example_inputs: dict | None,
                dynamic_axes: dict[str, dict[int, str]] | None = None) -> LoadedModel:
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"cannot compile an object of type {type(module).__name__}")
    if not example_inputs or not all(isinstance(v, torch.Tensor) for v in example_inputs.values()):
        raise ModelLoadError("an nn.Module needs example_inputs: a dict of input name -> tensor")
    if dynamic_axes is None:
        dynamic_axes = {n: {0: "batch", 1: "sequence"} if t.dim() >= 2 else {0: "batch"}
                        for n, t in example_inputs.items() if t.dim() >= 1}
    model = export_to_onnx(module, example_inputs, ["output"], dynamic_axes, select=_first_tensor)
    return LoadedModel(model, type(module).__name__, "module")
