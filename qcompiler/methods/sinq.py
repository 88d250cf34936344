"""``sinq``: SINQ without data (arXiv 2509.22944). Each quantization group of a weight is balanced by
Sinkhorn-normalised input and output scales (algorithms/sinq.py); the output scales fall into the
group's own quantization scale, and the input scales are folded where that is exact and free: into
the norm gain before q/k/v and gate/up, into V's columns for O (one diagonal per KV head), into up's
columns for down. What is left (an input with no gain before it) gets an online ``x * t``. Then
round to nearest. No learning: seconds, not minutes."""

from __future__ import annotations

from qcompiler.methods.transform_planner import Recipe
from qcompiler.methods.transforming import TransformMethod


class Sinq(TransformMethod):
    name = "sinq"
    summary = "Sinkhorn-balanced scales folded into the model, then round to nearest; no data"
    recipe = Recipe("sinq", learned=False, joint_rounding=False, sinkhorn=True)
