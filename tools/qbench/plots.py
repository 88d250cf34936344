"""PNG plots of ``results.json``: quality against bits per method; file size and latency bars."""

from __future__ import annotations

from pathlib import Path

from tools.qbench.grid import BY_NAME, REFERENCE, Setting

BAR_SETTINGS = ("w4-b128-sym", "w4-b32-sym", "w4-b128-asym", "w4-b32-asym")


def _ok(data: dict, model: str) -> list[dict]:
    return [r for r in data["rows"].values() if r["model"] == model and r.get("status") == "ok"]


def quality_vs_bits(data: dict, model: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = data["models"].get(model, {}).get("kind", "encoder")
    rows = [r for r in _ok(data, model) if r["setting"] != REFERENCE]
    if not rows:
        return None
    key = "mean_cos" if kind == "encoder" else "perplexity"

    def y(r):  # lower is better on both axes drawn: 1 - cosine, perplexity
        return 1 - r[key] if kind == "encoder" else r[key]

    best: dict[str, dict[int, float]] = {}
    for r in rows:
        bits = Setting.parse(r["setting"]).bits
        d = best.setdefault(r["method"], {})
        d[bits] = min(d.get(bits, float("inf")), y(r))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab20").colors
    style = {"ours": "-", "onnxruntime": "--", "onnxsim": ":"}
    widths = [2, 3, 4, 8]
    for i, m in enumerate(sorted(best, key=lambda m: list(BY_NAME).index(m) if m in BY_NAME else 99)):
        d = best[m]  # a missing width breaks the line (NaN) instead of bridging it
        owner = BY_NAME[m].owner if m in BY_NAME else "ours"
        ax.plot(widths, [d.get(x, float("nan")) for x in widths], marker="o", label=f"{m} ({owner})",
                linestyle=style.get(owner, "-"), color=colors[i % len(colors)])
    ref = next((r for r in _ok(data, model) if r["method"] == "fp32"), None)
    if kind == "lm" and ref:
        ax.axhline(ref[key], color="black", linewidth=0.8, linestyle=":", label="fp32")
    ax.set_yscale("log")
    ax.set_xticks([2, 3, 4, 8])
    ax.set_xlabel("weight bits (best setting of each method at that width)")
    ax.set_ylabel("1 - mean cosine to fp32 (log)" if kind == "encoder" else "perplexity (log)")
    ax.set_title(f"{model}: quality against bits (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def size_and_latency(data: dict, model: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ok(data, model)
    pick: dict[str, dict] = {}
    for r in rows:  # one 4-bit row per method (the first of BAR_SETTINGS it has), plus the references
        if r["setting"] == REFERENCE:
            pick[r["method"]] = r
    for s in BAR_SETTINGS:
        for r in rows:
            if r["setting"] == s and r["method"] not in pick:
                pick[r["method"]] = r
    if not pick:
        return None
    names = list(pick)
    labels = [n if pick[n]["setting"] == REFERENCE else f"{n} ({Setting.parse(pick[n]['setting']).label})"
              for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.35 * len(names) + 1.5), sharey=True)
    a.barh(labels, [pick[n]["size_mb"] for n in names], color="tab:blue")
    a.set_xlabel("file MB")
    b.barh(labels, [pick[n].get("latency_vs_fp32", 0) for n in names], color="tab:orange")
    b.axvline(1.0, color="black", linewidth=0.8)
    b.set_xlabel("latency / fp32 (2 threads, alternating runs)")
    a.invert_yaxis()
    fig.suptitle(f"{model}: size and latency (4-bit rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(data: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for model in sorted({r["model"] for r in data["rows"].values()}):
        for fn, name in ((quality_vs_bits, "quality"), (size_and_latency, "size_latency")):
            p = fn(data, model, folder / f"{model}_{name}.png")
            if p:
                out.append(p)
    return out
