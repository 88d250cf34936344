"""The fold-and-compare check used by the tests (the library's ``inspect --verify``)."""

from __future__ import annotations

import onnx

from qcompiler.inspect.verify import fold_check, random_transforms
from qcompiler.sites import Analysis

__all__ = ["fold_and_compare", "random_transforms"]


def fold_and_compare(model: onnx.ModelProto, transforms=None, seed: int = 0) -> tuple[float, Analysis, onnx.ModelProto]:
    check, analysis = fold_check(model, transforms=transforms, seed=seed)
    return check.rel_change, analysis, check.folded
