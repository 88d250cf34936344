"""CafeQ against RTN, the random-rotation baseline and ONNX Runtime's quantizers, in one run.

    python tools/cafeq_results.py minilm      # fidelity on 256 Jargon File paragraphs, + ORT DEFAULT/HQQ
    python tools/cafeq_results.py smollm2     # perplexity on 8 x 512 Jargon File tokens
    python tools/cafeq_results.py minilm --timing   # also the run-time overhead of the online transforms
    python tools/cafeq_results.py smollm2 --save DIR    # keep the compiled models (DIR/<setting>.<method>.onnx)
    python tools/cafeq_results.py smollm2 --time DIR --repeats 5  # time saved cafeq models against rtn
    python tools/cafeq_results.py smollm2 --overhead-blocks 64   # the online ops' cost, per layout

Settings: 4-bit block 128 asym and sym, 3-bit block 128 asym (MiniLM); 3- and 4-bit block 128 sym
(SmolLM2). Every compile uses the default options of its method. Overhead: ONNX Runtime CPU, 2 threads,
the cafeq model against the RTN model of the same setting, alternating runs, median of repeats
(MiniLM: a batch of 32 x 128 tokens; SmolLM2: a batch-1, one-token step).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcompiler.config import CompileConfig, QuantConfig  # noqa: E402
from qcompiler.frontends import load_model  # noqa: E402
from qcompiler.frontends.bundled import bundled_path  # noqa: E402
from qcompiler.pipeline import compile_model  # noqa: E402
from qcompiler.runtime.evaluate import fidelity, perplexity, sentence_embeddings, token_windows  # noqa: E402
from qcompiler.runtime.text import default_text, paragraphs, read_text  # noqa: E402
from tools.qbench.grid import Setting  # noqa: E402
from tools.qbench.peers import ort_default, ort_hqq  # noqa: E402
from tools.qbench.tasks import alternating_latency, latency_session  # noqa: E402

SETTINGS = {"minilm": [(4, 128, False), (4, 128, True), (3, 128, False)],
            "smollm2": [(3, 128, True), (4, 128, True)]}
# method name -> (compile method, CafeqConfig overrides); cafeq-transforms: CafeQ without joint rounding
METHODS = {"rtn": ("rtn", {}), "rotate": ("rotate", {}), "cafeq-transforms": ("cafeq", {"joint_pairs": ()}),
           "cafeq": ("cafeq", {})}


def _ort(model: onnx.ModelProto, algo: str, bits: int, block: int, sym: bool) -> onnx.ModelProto:
    return (ort_default if algo == "DEFAULT" else ort_hqq)(model, Setting(bits, block, sym), [])


def _time_ratio(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict, reps: int) -> tuple[float, float, float]:
    """``b``'s time over ``a``'s (2 threads, ABBA-alternated medians), and both times in seconds."""
    mb, ma = alternating_latency(b, latency_session(a), feeds, reps)
    return mb / ma, ma / 1e3, mb / 1e3


def _feeds(model: str) -> tuple[dict, int]:
    if model == "minilm":
        rng = np.random.default_rng(0)
        return {"input_ids": rng.integers(1000, 20000, (32, 128)), "attention_mask": np.ones((32, 128), np.int64),
                "token_type_ids": np.zeros((32, 128), np.int64)}, 15
    return {"input_ids": np.array([[1234]]), "attention_mask": np.ones((1, 1), np.int64)}, 300


def overhead(model: str, blocks: list[int], layouts: list[str], rounds: int, prefill: int) -> None:
    """The online ops' run-time cost: rotate models (cafeq's ops, no learning) of each block size and
    layout against the RTN model, at the first setting, in alternating rounds (``blocked_rounds``); the
    ratio is taken per round, and its median and quartiles reported. A second session of the RTN model
    itself is timed alongside: its ratio shows the run's noise."""
    import tempfile

    from qcompiler.config import CafeqConfig

    q = QuantConfig(*SETTINGS[model][0])
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"rtn": Path(tmp) / "rtn.onnx"}
        compile_model(model, paths["rtn"], CompileConfig(quant=q, validate=False))
        control = "rtn, a second session (control)"
        paths[control], ops = paths["rtn"], {control: 0}
        for b in blocks:
            for layout in layouts:
                name = f"block {b} {layout}"
                paths[name] = Path(tmp) / f"rotate{b}.{layout}.onnx"
                res = compile_model(model, paths[name], CompileConfig(
                    quant=q, method="rotate", validate=False, cafeq=CafeqConfig(block_size=b, online_layout=layout)))
                ops[name] = len(res.plan.online)
        feeds = ["batch"] if model == "minilm" else ["token"] + ([f"prefill{prefill}"] if prefill else [])
        for feed in feeds:
            times = blocked_rounds(list(paths.values()), feed, rounds if feed == "token" else max(4, rounds // 4))
            for name, t in zip(paths, times.T, strict=True):
                if name == "rtn":
                    continue
                r = t / times[:, 0]
                print(json.dumps({"model": model, "setting": q.describe(), "run": feed, "transforms": name,
                                  "online_ops": ops[name], "ratio_median": round(float(np.median(r)), 4),
                                  "ratio_quartiles": [round(float(x), 4) for x in np.percentile(r, [25, 75])],
                                  "rtn_ms": round(1e3 * float(np.median(times[:, 0])), 3),
                                  "transformed_ms": round(1e3 * float(np.median(t)), 3)}), flush=True)


def _run_feeds(feed: str) -> dict:
    """Inputs of a timed run: MiniLM's batch, a batch-1 token step, or a prefill of N tokens."""
    if feed == "batch":
        return _feeds("minilm")[0]
    n = 1 if feed == "token" else int(feed.removeprefix("prefill"))
    return {"input_ids": np.full((1, n), 1234), "attention_mask": np.ones((1, n), np.int64)}


def blocked_rounds(paths: list[Path], feed: str, rounds: int) -> np.ndarray:
    """``[rounds, models]``: each round runs every model for a block of runs (order alternating between
    rounds) and keeps the block's median, the first two runs dropped (the previous session's pool
    threads are still spinning then). All sessions live in this process: 2 threads each, ONNX
    Runtime's default options."""
    feeds = _run_feeds(feed)
    block = 20 if feed == "token" else 4
    sessions = [latency_session(str(p)) for p in paths]
    inputs = [{i.name: feeds[i.name] for i in s.get_inputs()} for s in sessions]
    out = np.zeros((rounds, len(paths)))
    for r in range(rounds):
        for i in (range(len(paths)) if r % 2 == 0 else reversed(range(len(paths)))):
            t = []
            for _ in range(block + 2):
                t0 = time.perf_counter()
                sessions[i].run(None, inputs[i])
                t.append(time.perf_counter() - t0)
            out[r, i] = np.median(t[2:])
    return out


def time_saved(model: str, folder: Path, repeats: int) -> None:
    """Every saved cafeq model against the rtn model of its setting, ``repeats`` ABBA runs each: the
    ratios, their median, and the number of online ops."""
    feeds, reps = _feeds(model)
    for path in sorted(folder.glob("*.cafeq.onnx")):
        rtn_path = path.with_name(path.name.replace(".cafeq.onnx", ".rtn.onnx"))
        a, b = onnx.load(str(rtn_path)), onnx.load(str(path))
        ops = sum(1 for n in b.graph.node if n.name.endswith("_online_MatMul"))
        ratios = [_time_ratio(a, b, feeds, reps)[0] for _ in range(repeats)]
        print(json.dumps({"model": model, "setting": path.name.split(".")[0], "online_ops": ops,
                          "ratio_median": float(np.median(ratios)), "ratios": [round(r, 4) for r in ratios]}),
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=list(SETTINGS))
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--methods", default="rtn,rotate,cafeq", help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--bits", help="only these settings' bit widths (e.g. 3)")
    ap.add_argument("--overhead-blocks", help="only time the online ops for these block sizes (e.g. 16,32,64): "
                    "rotate models (same ops as cafeq, no learning) against RTN, first setting")
    ap.add_argument("--layouts", default="matmul,conv", help="with --overhead-blocks: the online layouts timed")
    ap.add_argument("--rounds", type=int, default=40,
                    help="with --overhead-blocks: alternating rounds (40; a quarter for batches)")
    ap.add_argument("--prefill", type=int, default=256,
                    help="with --overhead-blocks on smollm2: also time a prefill of this many tokens (0: none)")
    ap.add_argument("--save", help="write every compiled model to this folder (<setting>.<method>.onnx)")
    ap.add_argument("--time", help="only time the cafeq models saved in this folder against their rtn ones")
    ap.add_argument("--repeats", type=int, default=5, help="timing runs per model with --time (5)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.time:
        time_saved(args.model, Path(args.time), args.repeats)
        return
    if args.overhead_blocks:
        overhead(args.model, [int(b) for b in args.overhead_blocks.split(",")], args.layouts.split(","),
                 args.rounds, args.prefill)
        return
    ref = load_model(args.model)
    tok = str(bundled_path(args.model))
    text = read_text(default_text())
    rows = []
    if args.model == "minilm":
        texts = paragraphs(text, 256)
        ref_emb = sentence_embeddings(ref.model, tok, texts)

        def score(m):
            f = fidelity(sentence_embeddings(m, tok, texts), ref_emb)
            return {"one_minus_cos": 1 - f.mean_cosine, "mean_cos": f.mean_cosine, "min_cos": f.min_cosine,
                    "spearman": f.spearman}
    else:
        windows = token_windows(tok, text, 8, 512)

        def score(m):
            return {"perplexity": perplexity(m, windows).perplexity}
        rows.append({"setting": "fp32", "method": "fp32", "perplexity": perplexity(ref.model, windows).perplexity})
        print(json.dumps(rows[-1]), flush=True)
    feeds, reps = _feeds(args.model)
    from qcompiler.config import CafeqConfig

    methods = args.methods.split(",")
    for bits, block, sym in SETTINGS[args.model]:
        if args.bits and str(bits) not in args.bits.split(","):
            continue
        q = QuantConfig(bits, block, sym)
        models = {}
        for method in methods:
            base, overrides = METHODS[method]
            t0 = time.perf_counter()
            res = compile_model(args.model, None, CompileConfig(quant=q, method=base, validate=False,
                                                                cafeq=CafeqConfig(**overrides)))
            models[method] = res.model
            if args.save:
                Path(args.save).mkdir(parents=True, exist_ok=True)
                onnx.save(res.model, str(Path(args.save) / f"{q.describe().replace(' ', '_')}.{method}.onnx"))
            pqe = {}
            for kind in ("attn_vo", "mlp_up_down"):
                ps = [p for p in res.plan.pair_stats if p.kind == kind]
                if ps and base == "cafeq":
                    pqe[f"pqe_{kind}"] = float(np.mean([p.pqe for p in ps]))
                    pqe[f"pqe_plain_{kind}"] = float(np.mean([p.pqe_plain for p in ps]))
            rows.append({"setting": q.describe(), "method": method, "compile_s": time.perf_counter() - t0,
                         **score(res.model), **pqe})
            print(json.dumps(rows[-1]), flush=True)
        if args.model == "minilm":
            for algo in ("DEFAULT", "HQQ"):
                if bits == 3 or (algo == "HQQ" and sym):
                    continue  # no 3-bit in ORT; HQQ has no symmetric mode
                rows.append({"setting": q.describe(), "method": f"ort-{algo.lower()}",
                             **score(_ort(ref.model, algo, bits, block, sym))})
                print(json.dumps(rows[-1]), flush=True)
        if args.timing and {"rtn", "cafeq"} <= set(models):
            ratio, t_rtn, t_cafeq = _time_ratio(models["rtn"], models["cafeq"], feeds, reps)
            rows.append({"setting": q.describe(), "timing": "cafeq/rtn", "ratio": ratio, "rtn_ms": 1e3 * t_rtn,
                         "cafeq_ms": 1e3 * t_cafeq})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """The rows as the README's table (one line per setting and method, timings as their own lines)."""
    quality = "perplexity" if any("perplexity" in r for r in rows) else "one_minus_cos"
    head = ("| setting | method | perplexity | compile s |\n|---|---|---|---|" if quality == "perplexity" else
            "| setting | method | 1 - mean cosine | min cosine | Spearman | compile s |\n|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "timing" in r:
            lines.append(f"| {r['setting']} | run time cafeq / rtn | {r['ratio']:.3f} ({r['rtn_ms']:.1f} -> "
                         f"{r['cafeq_ms']:.1f} ms) | |" + ("" if quality == "perplexity" else " | |"))
            continue
        t = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        if quality == "perplexity":
            lines.append(f"| {r['setting']} | {r['method']} | {r['perplexity']:.2f} | {t} |")
        else:
            lines.append(f"| {r['setting']} | {r['method']} | {r['one_minus_cos']:.4f} | {r['min_cos']:.4f} | "
                         f"{r['spearman']:.4f} | {t} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
