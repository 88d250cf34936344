"""The results page (markdown) and the README's table, both read from ``results.json`` only."""

from __future__ import annotations

import re
from pathlib import Path

from qcompiler.graphio import write_text_atomic
from tools.qbench.grid import BY_NAME, MODEL_NOTES, MODELS, REFERENCE, SETTINGS, RowSpec, Setting

COLUMNS = {"encoder": [("mean_cos", "mean cos", "{:.4f}"), ("min_cos", "min cos", "{:.4f}"),
                       ("spearman", "Spearman", "{:.4f}"), ("nn_agreement", "NN agree", "{:.3f}")],
           "lm": [("perplexity", "perplexity", "{:.2f}")]}
PRIMARY = {"encoder": ("mean_cos", True), "lm": ("perplexity", False)}
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"
# a row's compile time is flagged when other processes used more than this share of the machine meanwhile
BUSY_SHARE = 0.1


def _label(setting: str) -> str:
    return "reference" if setting == REFERENCE else Setting.parse(setting).label


def _fmt(v, f="{:.1f}") -> str:
    return "" if v is None else f.format(v)


def _compile_cell(r: dict) -> str:
    cell = _fmt(r.get("compile_s"))
    return f"{cell} (busy {r['others_cpu']:.0%})" if cell and r.get("others_cpu", 0) > BUSY_SHARE else cell


def _best(rows: list[dict], kind: str) -> float | None:
    key, higher = PRIMARY[kind]
    vals = [r[key] for r in rows if r.get("status") == "ok" and r.get(key) is not None and r["method"] != "fp32"]
    if not vals:
        return None
    return max(vals) if higher else min(vals)


def _cell_row(r: dict, kind: str, best: float | None) -> str:
    cols = COLUMNS[kind]
    key = PRIMARY[kind][0]
    if r.get("status") != "ok":
        what = r.get("reason", "")
        status = "pending (not measured yet)" if r.get("status") == "pending" else f"failed: {what}"
        return f"| {r['method']} | {status} |" + " |" * (len(cols) + 4)
    vals = []
    for c, _, f in cols:
        v = _fmt(r.get(c), f)
        if c == key and best is not None and r.get(c) == best:
            v = f"**{v}**"
        vals.append(v)
    lat = "" if r.get("latency_ms") is None else f"{r['latency_ms']:.1f} ({r['latency_vs_fp32']:.2f}x)"
    return (f"| {r['method']} | " + " | ".join(vals) + f" | {_compile_cell(r)} | "
            f"{_fmt(r.get('peak_rss_mb'), '{:.0f}')} | {_fmt(r.get('size_mb'))} | {lat} | "
            f"{'yes' if r.get('runs_in_plain_ort') else 'no'} |")


def model_rows(data: dict, plan: list[RowSpec], model: str) -> dict[str, list[dict]]:
    """Rows of ``model`` by setting, in plan order; planned rows not measured yet are 'pending'."""
    by_setting: dict[str, list[dict]] = {}
    keys = [r for r in plan if r.model == model]
    known = {f"{model}/{r['setting']}/{r['method']}": r for r in data["rows"].values() if r["model"] == model}
    for spec in keys:
        r = known.pop(spec.key, None) or {"model": model, "setting": spec.setting, "method": spec.method,
                                          "status": "pending"}
        by_setting.setdefault(spec.setting, []).append(r)
    for r in known.values():  # measured earlier, outside this plan: still shown
        by_setting.setdefault(r["setting"], []).append(r)
    order = [REFERENCE] + [s.key for s in SETTINGS]
    return dict(sorted(by_setting.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))


def markdown(data: dict, plan: list[RowSpec]) -> str:
    runs = data["meta"].get("runs", [])
    wall = sum(r["wall_s"] for r in runs)
    out = ["# qcompiler bench", "",
           "Generated from `bench/results.json` by `python tools/bench.py`; every row was measured by it.", "",
           f"- Machine: {data['meta'].get('machine', '?')}",
           f"- Wall time: {wall / 60:.0f} min over {len(runs)} invocation(s):"]
    out += [f"  - `{r['command']}` ({r['started']}, {r['rows']} rows, {r['wall_s'] / 60:.1f} min)" for r in runs]
    out += ["- Compile time and peak memory: each row's compile alone in a fresh process (peak = its "
            "`ru_maxrss`); ours start from the cached export, peers from the exported fp32 ONNX file.",
            "- Latency: ONNX Runtime CPU, 2 threads, median of alternating runs against fp32 (ratio in "
            "brackets); 'plain ORT': a stock `InferenceSession` loads and runs the file.",
            f"- 'busy N%': other processes used N% of the machine's CPU during that row's compile (above "
            f"{BUSY_SHARE:.0%}), so its compile time is an upper bound; rows measured before the bench recorded "
            "this (2026-11-23) carry no mark even where other jobs ran.",
            "- Best quality per setting in bold. Calibrated methods (ours and peers) get the same token ids.",
            ""]
    notes = sorted({r["peak_note"] for r in data["rows"].values() if r.get("peak_note")})
    if notes:
        out[-1:-1] = [f"- Blank peak memory: {n}." for n in notes]
    methods = sorted({r.method for r in plan} | {r["method"] for r in data["rows"].values()},
                     key=lambda m: list(BY_NAME).index(m) if m in BY_NAME else 99)
    out += ["| method | by | what |", "|---|---|---|"]
    out += [f"| {m} | {BY_NAME[m].owner} | {BY_NAME[m].summary} |" for m in methods if m in BY_NAME]
    out.append("")
    known = [f"- {m}: {BY_NAME[m].note}." for m in methods if m in BY_NAME and BY_NAME[m].note]
    if known:
        out += known + [""]
    for model in sorted({r.model for r in plan} | {r["model"] for r in data["rows"].values()}):
        info = data["models"].get(model, {})
        kind = info.get("kind", "encoder")
        fp = info.get("fingerprint", {})
        out += [f"## {model}", "", f"Quality on {fp.get('task', '?')}; calibration {fp.get('calib', '?')} "
                "token ids (Python's documentation; random ids for tiny models).", ""]
        if model in MODEL_NOTES:
            out += [f"Note: {MODEL_NOTES[model]}.", ""]
        head = "| method | " + " | ".join(h for _, h, _ in COLUMNS[kind]) + \
               " | compile s | peak MiB | file MB | latency ms | plain ORT |"
        sep = "|---" * (len(COLUMNS[kind]) + 6) + "|"
        for setting, rows in model_rows(data, plan, model).items():
            best = None if setting == REFERENCE else _best(rows, kind)
            out += [f"### {_label(setting)}", "", head, sep] + [_cell_row(r, kind, best) for r in rows] + [""]
            if setting != REFERENCE:
                s = Setting.parse(setting)
                skipped = [f"{m.name} ({m.unsupported(s)})" for m in BY_NAME.values()
                           if m.name in methods and m.bits and m.unsupported(s)]
                if skipped:
                    out += ["Not run here: " + ", ".join(skipped) + ".", ""]
    return "\n".join(out)


def summary_table(data: dict, plan: list[RowSpec]) -> str:
    """Methods x settings, primary quality metric, best per setting in bold: the README's table. A method or a
    setting with no measured row yet on a model is left out of its table and named under it."""
    out = []
    order = list(MODELS)
    for model in sorted({r["model"] for r in data["rows"].values()} | {r.model for r in plan},
                        key=lambda m: (order.index(m) if m in order else len(order), m)):
        kind = data["models"].get(model, {}).get("kind", MODELS.get(model, "encoder"))
        groups = model_rows(data, plan, model)
        planned = [s for s in groups if s != REFERENCE]
        settings = [s for s in planned if any(r.get("status") != "pending" for r in groups[s])]
        key = PRIMARY[kind][0]
        ref = next((r for r in groups.get(REFERENCE, []) if r["method"] == "fp32" and r.get("status") == "ok"), None)
        title = "mean cosine to fp32 (higher is better)" if kind == "encoder" else "perplexity (lower is better)"
        fp32 = f"; fp32 {ref[key]:.2f}" if ref and kind == "lm" else ""
        out += [f"**{model}**: {title}{fp32}.", "",
                "| method | " + " | ".join(_label(s) for s in settings) + " |", "|---" * (len(settings) + 1) + "|"]
        by_order = lambda m: list(BY_NAME).index(m) if m in BY_NAME else 99  # noqa: E731
        methods = sorted({r["method"] for s in settings for r in groups[s] if r.get("status") != "pending"},
                         key=by_order)
        waiting = sorted({r["method"] for s in planned for r in groups[s]} - set(methods), key=by_order)
        best = {s: _best(groups[s], kind) for s in settings}
        for m in methods:
            cells = []
            for s in settings:
                r = next((r for r in groups[s] if r["method"] == m), None)
                if r is None:
                    cells.append("")
                elif r.get("status") == "pending":
                    cells.append("pending")
                elif r.get("status") != "ok":
                    cells.append("failed")
                else:
                    v = f"{r[key]:.4f}" if kind == "encoder" else f"{r[key]:.2f}"
                    cells.append(f"**{v}**" if r[key] == best[s] else v)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        extra = [r for r in groups.get(REFERENCE, []) if r["method"] != "fp32" and r.get("status") == "ok"]
        for r in extra:
            v = f"{r[key]:.4f}" if kind == "encoder" else f"{r[key]:.2f}"
            out.append(f"\nReference: {r['method']} {v}.")
        if waiting or len(settings) < len(planned):
            what = ([f"methods {', '.join(waiting)}"] if waiting else []) + (
                [f"settings {', '.join(_label(s) for s in planned if s not in settings)}"]
                if len(settings) < len(planned) else [])
            out.append(f"\nNot measured yet on {model}: {'; '.join(what)}.")
        out.append("")
    return "\n".join(out)


def write_readme(readme: Path, table: str) -> bool:
    """Replace the generated block of the README; False when the README has no such block."""
    text = readme.read_text()
    if README_BEGIN not in text:
        return False
    write_text_atomic(readme, re.sub(re.escape(README_BEGIN) + ".*?" + re.escape(README_END),
                                     lambda _: README_BEGIN + "\n" + table.strip() + "\n" + README_END, text,
                                     flags=re.S))
    return True


def readme_block(readme: Path) -> str | None:
    """The generated block's current text."""
    m = re.search(re.escape(README_BEGIN) + "\n(.*?)\n?" + re.escape(README_END), readme.read_text(), flags=re.S)
    return None if m is None else m.group(1).strip()
