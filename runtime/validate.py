"""Validation of a compiled model against its original on the same inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from qcompiler.errors import ModelLoadError, first_line
from qcompiler.metadata import transformed_caches
from qcompiler.runtime.session import SessionOptions, make_session
from qcompiler.runtime.text_inputs import SampleInputs, random_sample_inputs


@dataclass(frozen=True)
class OutputError:
    name: str
    rel_error: float  # ||y - y_ref|| / ||y_ref||
    max_abs: float
    cosine: float
    finite: bool = True  # every value of the compiled model's output is finite


@dataclass(frozen=True)
class ValidationResult:
    outputs: tuple[OutputError, ...]
    # what both models ran on: "text (4 samples of the Jargon File, 32 tokens each)", "random token ids", ...
    inputs: str = ""

    @property
    def max_rel_error(self) -> float:
        return max((o.rel_error for o in self.outputs), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    def problem(self, max_error: float | None) -> str | None:
        """Why the compiled model must not be written: non-finite outputs, or an error above ``max_error``."""
        bad = [o.name for o in self.outputs if not o.finite]
        if bad:
            return f"output {bad[0]} has NaN or Inf values"
        worst = max(self.outputs, key=lambda o: o.rel_error, default=None)
        if max_error is not None and worst is not None and worst.rel_error > max_error:
            return f"output {worst.name} relative error {worst.rel_error:.4f} > --max-error {max_error:g}"
        return None


def compare(y: np.ndarray, ref: np.ndarray, name: str = "") -> OutputError:
    a = np.asarray(y, dtype=np.float64).ravel()
    b = np.asarray(ref, dtype=np.float64).ravel()
    if not np.all(np.isfinite(a)):
        return OutputError(name, float("inf"), float("inf"), float("nan"), finite=False)
    nb = np.linalg.norm(b)
    rel = float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a))
    denom = np.linalg.norm(a) * nb
    cos = float(a @ b / denom) if denom > 0 else 1.0
    return OutputError(name, rel, float(np.max(np.abs(a - b))) if a.size else 0.0, cos, True)


def run(model: onnx.ModelProto | bytes | str, feeds: dict[str, np.ndarray],
        options: SessionOptions | None = None) -> dict[str, np.ndarray]:
    sess = make_session(model, options)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, as_input_types(sess, feeds)), strict=True))


_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def as_input_types(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` with each float array cast to the float type its input declares: a float16 compile of a
    float32 model runs on the original's feeds (its KV cache, any float input)."""
    want = {i.name: _FLOATS.get(i.type) for i in sess.get_inputs()}
    return {k: v.astype(want[k]) if want.get(k) is not None and isinstance(v, np.ndarray)
            and np.issubdtype(v.dtype, np.floating) and v.dtype != want[k] else v for k, v in feeds.items()}


def validate(compiled: onnx.ModelProto | bytes | str, original: onnx.ModelProto,
             feeds: SampleInputs | dict[str, np.ndarray] | None = None, options: SessionOptions | None = None,
             label: str | None = None) -> ValidationResult:
    """Both models on ``feeds`` (``text_inputs.validation_inputs``, or a plain dict that ``label`` names),
    else on ``sample_inputs``' random ones; the result's ``inputs`` says which."""
    if isinstance(feeds, SampleInputs):
        feeds, label = feeds.feeds, label or feeds.label
    elif feeds is None:
        random = random_sample_inputs(original)
        feeds, label = random.feeds, label or random.label
    try:
        ref = run(original, feeds, options)
    except Exception as e:  # the input itself does not run: bad input, not our bug
        raise ModelLoadError(f"the input model does not run in ONNX Runtime: {first_line(e, 240)}") from None
    got = run(compiled, feeds, options)
    skip = transformed_caches(compiled) if isinstance(compiled, onnx.ModelProto) else frozenset()
    return ValidationResult(tuple(compare(got[k], ref[k], k) for k in ref if k not in skip), label or "given inputs")
