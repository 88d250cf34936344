"""``qcompiler inspect``: what the matcher found in a model and what the compiler changed."""

from qcompiler.inspect.collect import Inspection, inspect_model

__all__ = ["Inspection", "inspect_model"]
