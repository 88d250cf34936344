"""One bench row's compile, in its own process: ``python -m tools.qbench.worker SPEC.json``.

Its own process, so that each row's peak memory is its own (``ru_maxrss`` when the compile is done)
and a crash or a time-out costs one row, not the run. The spec names the model source, the fp32 ONNX
file the peers start from, the method, the setting, and the calibration ids every calibrated method
(ours and the peers') uses. The worker writes the model and ``stats.json``: compile seconds and peak
memory, or the error in one line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qcompiler.errors import first_line
from qcompiler.graphio import save_onnx_atomic
from qcompiler.resources import compile_peak_mb
from tools.qbench.grid import REFERENCE, Setting

log = logging.getLogger(__name__)

# our bench methods -> (compile method, CafeqConfig overrides)
OURS = {"rtn": ("rtn", {}), "rotate": ("rotate", {}), "sinq": ("sinq", {}),
        "cafeq-transforms": ("cafeq", {"joint_pairs": ()}),
        "cafeq": ("cafeq", {}), "gptq": ("gptq", {}), "gptaq": ("gptaq", {}), "cafeq+gptaq": ("cafeq+gptaq", {})}


@dataclass(frozen=True)
class WorkerSpec:
    source: str  # what `qcompiler compile` takes: a bundled name or an HF folder
    fp32: str  # the fp32 ONNX file (peers start from it)
    method: str
    setting: str
    calib: str  # .npy of [samples, seqlen] token ids
    out: str
    stats: str
    cache_dir: str | None = None
    cafeq: dict | None = None  # CafeqConfig overrides for every cafeq row (--quick: fewer steps)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__))

    @classmethod
    def read(cls, path: Path) -> WorkerSpec:
        return cls(**json.loads(Path(path).read_text()))


def feeds_from_ids(model: onnx.ModelProto, ids: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One feed dict per calibration sequence (batch 1), for the peers' calibration readers."""
    from qcompiler.runtime.calib_data import calibration_feeds

    return [calibration_feeds(model, ids[i:i + 1]) for i in range(len(ids))]


def _ours(spec: WorkerSpec, setting: Setting) -> onnx.ModelProto:
    from qcompiler.config import CafeqConfig, CalibConfig, CompileConfig, QuantConfig
    from qcompiler.pipeline import compile_model

    method, cafeq = OURS[spec.method]
    ids = np.load(spec.calib)
    cfg = CompileConfig(quant=QuantConfig(setting.bits, setting.block, setting.sym), method=method,
                        validate=False, cafeq=CafeqConfig(**{**cafeq, **(spec.cafeq or {})}),
                        calib=CalibConfig(source=spec.calib, samples=ids.shape[0], seqlen=ids.shape[1]))
    return compile_model(spec.source, spec.out, cfg, cache_dir=spec.cache_dir).model


def _peer(spec: WorkerSpec, setting: Setting | None) -> onnx.ModelProto:
    from tools.qbench.grid import BY_NAME
    from tools.qbench.peers import PEERS

    model = onnx.load(spec.fp32)
    feeds = feeds_from_ids(model, np.load(spec.calib)) if BY_NAME[spec.method].calibrated else []
    out = PEERS[spec.method](model, setting, feeds)
    save_onnx_atomic(out, spec.out)
    return out


def run(spec: WorkerSpec) -> dict:
    setting = None if spec.setting == REFERENCE else Setting.parse(spec.setting)
    t0 = time.perf_counter()
    if spec.method in OURS:
        _ours(spec, setting)
    else:
        _peer(spec, setting)
    return {"compile_s": time.perf_counter() - t0, "peak_rss_mb": compile_peak_mb()}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    spec = WorkerSpec.read(Path((argv or sys.argv[1:])[0]))
    try:
        stats = run(spec)
        code = 0
    except Exception as e:  # one line for the results table, the trace for the log
        traceback.print_exc()
        stats = {"error": f"{type(e).__name__}: {first_line(e)}"[:300]}
        code = 1
    Path(spec.stats).write_text(json.dumps(stats))
    return code


if __name__ == "__main__":
    sys.exit(main())
