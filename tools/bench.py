"""Every method against the peers, side by side in one run: ``bench/results.{json,md}`` and plots.

    python tools/bench.py                      # MiniLM and SmolLM2, every setting and method (hours)
    python tools/bench.py --models minilm      # one model
    python tools/bench.py --quick --out /tmp/q # the whole harness on tiny random models (< 2 min)
    python tools/bench.py --report-only        # rewrite results.md, the plots and the README table

A run resumes: rows already in ``results.json`` are kept (``--redo`` measures them again), so an
interrupted run picks up where it stopped. Each row's compile runs in its own process.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcompiler.graphio import write_text_atomic  # noqa: E402
from tools.qbench import plots, report  # noqa: E402
from tools.qbench.grid import BY_NAME, METHODS, REFERENCE_METHODS, SETTINGS, Setting, full_plan, plan_rows  # noqa: E402
from tools.qbench.runner import REAL_MODELS, ModelEntry, run  # noqa: E402
from tools.qbench.store import ResultStore  # noqa: E402

QUICK_SETTINGS = ("w4-b32-sym",)  # and w4-b32-asym for the methods without a symmetric mode
QUICK_CAFEQ = (("steps", 40), ("joint_rounds", 1), ("joint_mlp_rounds", 1))


def _quick_models(folder: Path) -> list[ModelEntry]:
    from qcompiler.frontends.tiny import make_tiny_checkpoint

    out = []
    for name, family, kind in (("tiny-bert", "bert", "encoder"), ("tiny-llama", "llama", "lm")):
        d = folder / name
        if not (d / "config.json").exists():
            make_tiny_checkpoint(family, d)
        out.append(ModelEntry(name, str(d), kind, (4, 32), tiny=True, cafeq=QUICK_CAFEQ))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,smollm2", help=f"of {','.join(REAL_MODELS)}")
    ap.add_argument("--settings", help=f"subset of {','.join(s.key for s in SETTINGS)}")
    ap.add_argument("--methods", help="subset of " + ",".join(BY_NAME))
    ap.add_argument("--quick", action="store_true", help="tiny random models, two settings: tests the harness")
    ap.add_argument("--out", type=Path, help="results folder (default: bench/; --quick: a temporary folder)")
    ap.add_argument("--work", type=Path, help="fp32 files and row models (default: under --out/.work)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per row's compile (default 3600)")
    ap.add_argument("--max-rss-gb", type=float, default=16, help="kill a row's compile above this memory (16)")
    ap.add_argument("--redo", action="store_true", help="measure rows again even when results.json has them")
    ap.add_argument("--fresh", action="store_true", help="discard results.json first")
    ap.add_argument("--report-only", action="store_true", help="only rewrite results.md, plots and README")
    ap.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    ap.add_argument("--cache-dir", help="export cache (default: qcompiler's)")
    ap.add_argument("--jobs", type=int, help="rows measured at once (default 1; --quick: 2). More than one "
                    "shares the cores between rows: their times are then upper bounds, not figures")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    for noisy in ("onnxruntime", "onnxscript", "torch", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-quick-")) if args.quick else ROOT / "bench")
    work = args.work or out / ".work"
    try:
        settings = [Setting.parse(k) for k in (args.settings or ",".join(
            QUICK_SETTINGS if args.quick else [s.key for s in SETTINGS])).split(",")]
        methods = (args.methods or ",".join(m.name for m in REFERENCE_METHODS + METHODS)).split(",")
        if args.quick:
            models = _quick_models(work / "models")
        else:
            names = args.models.split(",")
            bad = [n for n in names if n not in REAL_MODELS]
            if bad:
                raise ValueError(f"unknown model {bad[0]!r}; choose from {', '.join(REAL_MODELS)}")
            models = [REAL_MODELS[n] for n in names]
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        plan = plan_rows([m.name for m in models], settings, methods)
        if args.quick and not args.settings:  # every method once: the asym-only ones at w4-b32-asym
            have = {r.method for r in plan}
            plan += [r for r in plan_rows([m.name for m in models], [Setting.parse("w4-b32-asym")], methods)
                     if r.method not in have]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = out / "results.json"
    if args.fresh:
        results.unlink(missing_ok=True)
    store = ResultStore(results)
    readme = None if (args.quick or args.no_readme or args.out) else ROOT / "README.md"

    page_plan = plan if args.quick else full_plan()  # the committed page shows the whole grid

    def publish(s: ResultStore) -> None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "results.md", report.markdown(s.data, page_plan))
        if readme is not None:
            report.write_readme(readme, report.summary_table(s.data, page_plan))

    if not args.report_only:
        command = "python tools/bench.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
        try:
            run(store, models, plan, work, args.timeout, args.redo, command, args.cache_dir,
                progress=not args.quiet, on_row=publish, max_rss_gb=args.max_rss_gb,
                jobs=args.jobs or (2 if args.quick else 1))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    publish(store)
    for p in plots.write_plots(store.data, out):
        logging.info("plot: %s", p)
    logging.info("results: %s", out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
