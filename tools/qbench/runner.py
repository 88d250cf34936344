"""Run the grid: prepare each model once (fp32 file, inputs, calibration ids), then every pending row."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from qcompiler.errors import first_line
from qcompiler.graphio import saved_bytes
from qcompiler.resources import children_cpu_seconds, machine_busy_seconds, others_cpu_share
from tools.qbench.grid import BY_NAME, MODEL_SCALE, MODELS, REFERENCE, RowSpec
from tools.qbench.store import ResultStore
from tools.qbench.tasks import (
    Task,
    alternating_latency,
    encoder_task,
    latency_session,
    lm_task,
    runs_in_plain_onnxruntime,
)
from tools.qbench.worker import WorkerSpec

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]  # the checkout: tools/qbench/runner.py -> .


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str  # bundled name or HF folder
    kind: str  # encoder | lm
    calib: tuple[int, int]  # calibration sequences x tokens
    tiny: bool = False  # random inputs instead of text (no tokenizer)
    cafeq: tuple[tuple[str, object], ...] = ()  # CafeqConfig overrides (tiny models: fewer steps)


REAL_MODELS = {"minilm": ModelEntry("minilm", "minilm", MODELS["minilm"], (64, 128)),
               "smollm2": ModelEntry("smollm2", "smollm2", MODELS["smollm2"], (64, 512)),
               "gemma3": ModelEntry("gemma3", "gemma3", MODELS["gemma3"], (64, 512))}


@dataclass
class Prepared:
    entry: ModelEntry
    fp32: str
    calib: str
    task: Task
    fingerprint: dict
    reference: ort.InferenceSession  # fp32, for every row's latency


def prepare(entry: ModelEntry, work: Path, cache_dir: str | None) -> Prepared:
    from qcompiler.frontends import load_model
    from qcompiler.graphio import save_onnx_atomic
    from qcompiler.runtime.calib_data import calibration_tokens

    folder = work / entry.name
    folder.mkdir(parents=True, exist_ok=True)
    loaded = load_model(entry.source, cache_dir=cache_dir)
    fp32 = folder / "fp32.onnx"
    if not fp32.exists():
        save_onnx_atomic(loaded.model, fp32)
    n, length = entry.calib
    rng = np.random.default_rng(0)
    if entry.tiny:
        vocab = 500
        ids = rng.integers(5, vocab, (n, length)).astype(np.int64)
        if entry.kind == "encoder":
            batches = [{"input_ids": rng.integers(5, vocab, (16, 32)).astype(np.int64),
                        "attention_mask": np.ones((16, 32), np.int64)} for _ in range(2)]
            task = encoder_task(batches, (4, 32), 3, "32 random sequences of 32 tokens", vocab)
        else:
            task = lm_task(rng.integers(5, vocab, (2, 64)).astype(np.int64), 3, "2 random windows of 64 tokens")
    else:
        from qcompiler.runtime.evaluate import encode_texts, token_windows
        from qcompiler.runtime.text import default_text, paragraphs, read_text

        tok = loaded.tokenizer_dir
        text = read_text(default_text())
        ids = calibration_tokens(None, tok, n, length)
        if entry.kind == "encoder":
            task = encoder_task(encode_texts(tok, paragraphs(text, 256), 128, 32), (8, 128), 20,
                                "256 Jargon File paragraphs (128 tokens)", 20000)
        else:
            task = lm_task(token_windows(tok, text, 8, 512), 60, "8 windows of 512 Jargon File tokens")
    calib = folder / "calib.npy"
    np.save(calib, ids)
    task.set_reference(str(fp32))
    fingerprint = {"task": task.describe, "calib": f"{n} x {length}", "calib_ids_sum": int(ids.sum())}
    return Prepared(entry, str(fp32), str(calib), task, fingerprint, latency_session(str(fp32)))


def machine_line() -> str:
    import onnxruntime

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}, "
            f"ONNX Runtime {onnxruntime.__version__} CPU, {2} threads for latency")


def _rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _watch(proc: subprocess.Popen, timeout: float, max_rss_gb: float) -> str | None:
    """Wait for the worker; kill it past ``timeout`` seconds or ``max_rss_gb`` of memory (the reason)."""
    start = time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - start > timeout:
            reason = f"timed out after {timeout:.0f} s"
        elif _rss_gb(proc.pid) > max_rss_gb:
            reason = f"used more than {max_rss_gb:g} GB of memory"
        else:
            time.sleep(0.5)
            continue
        proc.kill()
        proc.wait()
        return reason
    return None


def last_progress(text: str) -> str | None:
    """The last percentage a worker's log printed (peers' progress bars), e.g. ``'12.40%'``."""
    found = re.findall(r"\d+(?:\.\d+)?%", text)
    return found[-1] if found else None


def timed_out_elsewhere(store: ResultStore, row: RowSpec, timeout: float) -> str | None:
    """The reason to skip ``row`` when its method already timed out, with at least this run's ``timeout``,
    on its model at another setting or on a smaller model (``MODEL_SCALE``): a method's compile time
    depends on the model far more than on bits and block, so it would time out again (``--redo``
    measures it anyway)."""
    scale = MODEL_SCALE.get(row.model, 1)
    for r in store.rows.values():
        if r.get("method") != row.method or r.get("timed_out_s", 0) < timeout:
            continue
        same_model = r.get("model") == row.model
        if (same_model and r.get("setting") != row.setting) or \
                (not same_model and MODEL_SCALE.get(r.get("model"), 1) < scale):
            return f"not run: {row.method} timed out on {r['model']} at {r['setting']} ({r['reason']})"
    return None


def _worker_env() -> dict[str, str]:
    """A worker runs ``python -m tools.qbench.worker``: the bench is not installed, so the checkout
    goes first on its path, whatever the caller's working directory."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "TQDM_DISABLE": "1"}


def _compile(row: RowSpec, p: Prepared, work: Path, timeout: float, cache_dir: str | None,
             max_rss_gb: float) -> tuple[str | None, dict]:
    folder = work / row.model / "rows"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{row.setting}.{row.method}".replace("+", "_")
    spec = WorkerSpec(p.entry.source, p.fp32, row.method, row.setting, p.calib, str(folder / f"{stem}.onnx"),
                      str(folder / f"{stem}.stats.json"), cache_dir, dict(p.entry.cafeq))
    spec_path = folder / f"{stem}.spec.json"
    spec.write(spec_path)
    log_path = folder / f"{stem}.log"
    Path(spec.stats).unlink(missing_ok=True)
    busy0, own0, t0 = machine_busy_seconds(), children_cpu_seconds(), time.monotonic()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "tools.qbench.worker", str(spec_path)], stdout=logf,
                                stderr=subprocess.STDOUT, env=_worker_env())
        reason = _watch(proc, timeout, max_rss_gb)
    busy1, own1, wall = machine_busy_seconds(), children_cpu_seconds(), time.monotonic() - t0
    if reason:
        progress = last_progress(log_path.read_text(errors="replace"))
        reason += f", its log's last progress {progress}" if progress else ""
        limit = {"timed_out_s": timeout} if reason.startswith("timed out") else {}
        return None, {"status": "failed", "reason": reason, **limit}
    if not Path(spec.stats).exists():
        tail = log_path.read_text().strip().splitlines()[-1:] or ["no output"]
        return None, {"status": "failed", "reason": f"worker died: {tail[0][:200]}"}
    stats = json.loads(Path(spec.stats).read_text())
    if "error" in stats:
        return None, {"status": "failed", "reason": stats["error"]}
    if busy0 is not None and busy1 is not None:  # other jobs on the cores make compile_s an upper bound
        stats["others_cpu"] = round(others_cpu_share(busy1 - busy0, own1 - own0, wall, os.cpu_count() or 1), 3)
    return spec.out, stats


def measure(row: RowSpec, p: Prepared, work: Path, timeout: float, cache_dir: str | None,
            max_rss_gb: float = 16.0) -> dict:
    if row.method == "fp32":
        path, stats = p.fp32, {}
    else:
        path, stats = _compile(row, p, work, timeout, cache_dir, max_rss_gb)
        if path is None:
            return stats
    result = {"status": "ok", **stats, "size_mb": saved_bytes(path) / 1e6,
              "runs_in_plain_ort": runs_in_plain_onnxruntime(path, p.task.latency_feeds)}
    try:
        result.update(p.task.quality(path))
        ms, ref_ms = alternating_latency(path, p.reference, p.task.latency_feeds, p.task.latency_reps)
        result.update({"latency_ms": ms, "latency_vs_fp32": ms / ref_ms})
    except Exception as e:
        result = {"status": "failed", "reason": f"evaluation: {type(e).__name__}: {first_line(e, 200)}"}
    if path != p.fp32:
        for f in Path(path).parent.glob(Path(path).name + "*"):
            f.unlink()  # rows' models are not kept: SmolLM2's would fill the disk
    return result


def code_version() -> str | None:
    """The repository's commit (short), with ``+changes`` when tracked files differ from it; None
    outside a git checkout. Each row records it: rows of one page may come from different commits."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "qcompiler", "passes", "runtime",
                                "tools/qbench"],
                               cwd=REPO, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "") if head else None


def run(store: ResultStore, models: list[ModelEntry], rows: list[RowSpec], work: Path, timeout: float,
        redo: bool, command: str, cache_dir: str | None = None, progress: bool = True,
        on_row=None, max_rss_gb: float = 16.0, jobs: int = 1) -> None:
    """Measure the pending ``rows``, ``jobs`` at a time (each row's compile in its own process, its evaluation
    in a thread of this one). More than one job shares the cores between rows, so their times and latencies
    are upper bounds (each row's ``others_cpu`` says how loaded the machine was): for harness tests, not for
    figures."""
    started = time.time()
    store.meta["machine"] = machine_line()
    store.meta.setdefault("runs", []).append({"command": command, "started": time.strftime("%Y-%m-%d %H:%M"),
                                              "wall_s": 0.0, "rows": 0})
    run_info = store.meta["runs"][-1]
    version = code_version()
    pending = [r for r in rows if redo or not store.done(r.key)]
    log.info("%d rows, %d already measured, %d to run", len(rows), len(rows) - len(pending), len(pending))
    prepared: dict[str, Prepared] = {}
    for row in pending:  # each model once, before any row: rows may then run side by side
        if row.model not in prepared:
            entry = next(m for m in models if m.name == row.model)
            prepared[row.model] = p = prepare(entry, work, cache_dir)
            store.check_model(entry.name, p.fingerprint)
            store.models[entry.name] = {"fingerprint": p.fingerprint, "kind": entry.kind,
                                        "source": entry.source}

    lock = threading.Lock()  # the store and the page: a row is checked against, and recorded in, one at a time

    def one(row: RowSpec) -> None:
        """Measure ``row`` and record it before the thread takes its next row, so that the skip rule of the
        rows after it sees its result (with one job, exactly the order of the rows)."""
        t0 = time.perf_counter()
        with lock:
            skip = None if redo else timed_out_elsewhere(store, row, timeout)
        result = {"status": "failed", "reason": skip} if skip else \
            measure(row, prepared[row.model], work, timeout, cache_dir, max_rss_gb)
        result.update({"model": row.model, "setting": row.setting, "method": row.method,
                       "owner": BY_NAME[row.method].owner, "wall_s": time.perf_counter() - t0,
                       "measured": time.strftime("%Y-%m-%d %H:%M"), "code": version})
        if row.setting == REFERENCE:
            result["reference"] = True
        with lock:
            run_info["wall_s"] = time.time() - started
            run_info["rows"] += 1
            store.put(row.key, result)
            log.info("%s: %s", row.key, result.get("reason", "ok"))
            if on_row:
                on_row(store)

    bar = tqdm(total=len(pending), desc="bench", disable=not progress, unit="row")
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        running = {pool.submit(one, row): row for row in pending}
        for done in as_completed(running):
            done.result()  # a row's exception ends the run, as it did one row at a time
            bar.set_postfix_str(running[done].key)
            bar.update()
    bar.close()
    run_info["wall_s"] = time.time() - started
    store.save()
