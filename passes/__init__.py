"""Rewrite passes over an onnx-graphsurgeon graph. One concern per module; passes apply plans."""

from qcompiler.passes.base import Pass, PassError, PassManager, PassResult
from qcompiler.passes.embedding import EmbeddingPass
from qcompiler.passes.fold_pairs import FoldPairsPass
from qcompiler.passes.matmulnbits import MatMulNBitsPass
from qcompiler.passes.online_transform import OnlineTransformPass
from qcompiler.passes.precision import PrecisionPass
from qcompiler.passes.qdq import QDQPass

__all__ = ["Pass", "PassError", "PassManager", "PassResult", "MatMulNBitsPass", "QDQPass", "EmbeddingPass",
           "FoldPairsPass", "OnlineTransformPass", "PrecisionPass"]
