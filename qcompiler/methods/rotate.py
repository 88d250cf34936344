"""``rotate``: the random-rotation baseline. Random orthogonal (or Hadamard) transforms where cafeq
would learn them (V·O pairs and single weights; no up·down), then rounding to nearest."""

from __future__ import annotations

from qcompiler.methods.transform_planner import Recipe
from qcompiler.methods.transforming import TransformMethod


class Rotate(TransformMethod):
    name = "rotate"
    summary = "random orthogonal transforms, then round to nearest; no data (a baseline)"
    recipe = Recipe("rotate", learned=False, joint_rounding=False)
