"""What every frontend returns."""

from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass(frozen=True)
class LoadedModel:
    model: onnx.ModelProto
    source: str  # what the user named
    kind: str  # "encoder" | "causal_lm" | "onnx" | "module"
    tokenizer_dir: str | None = None
    onnx_path: str | None = None  # where the ONNX lives on disk (cache entry or the input file)
    cached: bool = False  # export came from the cache
    # the external data was not read: tensors reference files in this folder (streaming compile)
    data_dir: str | None = None

    @property
    def causal(self) -> bool:
        """A causal LM: a Hugging Face causal LM, or an ONNX file with a ``logits`` output."""
        return self.kind == "causal_lm" or (self.kind == "onnx" and any(o.name == "logits"
                                                                         for o in self.model.graph.output))
