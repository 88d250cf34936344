"""``cafeq``: CafeQ without data. Learned block-diagonal transforms of single weights (an online
``x T^-1`` each), exact transforms folded into coupled pairs (V·O per KV head, up·down), then rounding
to nearest and joint rounding of each pair so that its product stays accurate."""

from __future__ import annotations

from qcompiler.methods.transform_planner import Recipe
from qcompiler.methods.transforming import TransformMethod


class Cafeq(TransformMethod):
    name = "cafeq"
    summary = "learned transforms + joint rounding of coupled pairs; no data"
    learns = True
    recipe = Recipe("cafeq", learned=True, joint_rounding=True)
