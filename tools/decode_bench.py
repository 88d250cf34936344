"""Decode speed and quality of a causal LM's compiled files against its fp32 export and onnxruntime-genai's
model builder, in one table (bench/decode.json, docs/serving.md).

    python tools/decode_bench.py                       # SmolLM2, 4-bit block 128 sym, levels 1 and 4
    python tools/decode_bench.py --model HF_DIR --add 'cafeq-b1=--method cafeq --online-budget 0.01'

What it builds, under ``--work`` (kept: a rerun recompiles only what changed): our fp32 export (``qcompiler
export``); each variant compiled by ``qcompiler compile`` at the first of ``--levels`` (files for the other
levels are the same file with MatMulNBits' ``accuracy_level`` rewritten); the builder's int4 (its default,
int8 activations: level 4; level 1 with ``--extra_options accuracy_level=1``) and fp32 folders.

How it measures (the machine is shared and noisy): every model loads once; each round runs every model once
(batch 1, greedy, ``--new-tokens`` after a ``--prompt-tokens`` prompt, end tokens ignored), the order rotated
each round; our files run in our loop (``qcompiler.runtime.generate``) in this process, the builder's folders
in its generator in one subprocess (``tools/decode_bench_genai.py`` in the genai venv), the two processes
taking turns. A figure is the median over rounds of decode tokens/s, and of its ratio to our fp32 export
in the same round. The builder's graphs also run in our loop, to compare graphs rather than loops.
Quality: greedy agreement with our fp32 export (mean common prefix of ``--new-tokens`` greedy tokens over
``--prompts`` fixed Jargon File prompts) and perplexity as ``qcompiler eval --perplexity`` computes it
(``--windows`` x ``--window-length`` tokens from the text's start, BOS where the tokenizer adds one); cached
per file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from qcompiler.passes.online_transform import online_ops as count_online_ops  # noqa: E402
from tools.qbench.runner import code_version  # noqa: E402

log = logging.getLogger("decode_bench")

CORE = ("fp32", "rtn", "cafeq", "gptaq")
# name -> compile arguments (after the setting); --add NAME='ARGS' adds more
VARIANTS = {
    "rtn": "--method rtn",
    "cafeq": "--method cafeq",
    "gptaq": "--method gptaq",
    # SINQ's scales folded into norm gains, V and up: rtn's graph, no online op
    "sinq": "--method sinq",
    # the output head: float, or 4-bit (8-bit is the default of a KV-cache decoder)
    "rtn-headfp": "--method rtn --no-quantize-lm-head",
    "rtn-head4": "--method rtn --head-bits 4",
    # the head as onnxruntime-genai's builder stores its int4 one (4-bit blocks of 32, asymmetric), with SINQ's scales
    "rtn-head4b32": "--method rtn --head-bits 4 --head-group-size 32 --head-asym",
    # online ops of half the bytes (an op's cost at a token step is reading its T^-1 blocks: ~ b per channel)
    "cafeq32": "--method cafeq --block-size 32",
    "cafeq32-head4b32": "--method cafeq --block-size 32 --head-bits 4 --head-group-size 32 --head-asym",
    "cafeq-token": "--method cafeq --online-regime token",
    "cafeq-matmul": "--method cafeq --online-layout matmul",
    "cafeq-nonline": "--method cafeq --transforms vo,updown",
    # the token regime's budget that admits the 60 ops on K=576 inputs (q/k/v and gate/up groups) and none of
    # the K=1536 ones (down): 60 x 0.125% <= 7.6% < 60 x 0.125% + 0.27% (methods/online_cost.py's model)
    "cafeq-k576": "--method cafeq --online-regime token --online-budget 0.076",
    # the online ops' speed without learning: rotate places the same ops (budget, regime, layout) as cafeq
    "rotate": "--method rotate",
    "rotate-matmul": "--method rotate --online-layout matmul",
    "rotate-token": "--method rotate --online-regime token",
    # the embedding table quantized too: today's DequantizeLinear of the whole table before its Gather, or
    # GatherBlockQuantized (its rows only)
    "rtn-emb": "--method rtn --quantize-embeddings",
    "rtn-gbq": "--method rtn --quantize-embeddings --gather-embeddings",
}
BUILDER = ("builder-int4", "builder-fp32")
# NAME@builder: variant NAME compiled from the builder's fp32 folder (its fused contrib-op graph) into a
# folder the generator loads (--package genai); measured in the generator and in our loop
ON_BUILDER = "@builder"
MARK = "<!-- decode_bench:{block}:{end} -->"  # a generated table's block in the page (--block names it)


@dataclass(frozen=True)
class Entry:
    """One model in one loop: ``runtime`` qc (our loop, this process) or genai (the builder's generator)."""

    name: str  # variant name (fp32, rtn, builder-int4, ...)
    level: int | None  # MatMulNBits accuracy level (None: float model)
    path: Path  # .onnx (qc) or a builder folder (genai)
    runtime: str

    @property
    def key(self) -> str:
        lvl = "" if self.level is None else f" acc{self.level}"
        return f"{self.name}{lvl} @{self.runtime}"


def _run(cmd: list[str], log_path: Path) -> float:
    log.info("$ %s", shlex.join(cmd))
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        raise SystemExit(f"failed ({rc}): {shlex.join(cmd)}; see {log_path}")
    return time.perf_counter() - t0


def _stamp(out: Path) -> Path:
    """Where the command that built ``out`` is recorded: beside it, or beside its folder (a builder's
    ``FOLDER/model.onnx``: the builder writes the folder)."""
    at = out.parent if out.name == "model.onnx" else out
    return at.with_name(at.name + ".cmd.json")


def _built(out: Path, cmd: list[str]) -> bool:
    """A file of the same command is there (whichever Python ran it: ``python`` and ``python3`` name the same
    one as often as not)."""
    if not (out.exists() and _stamp(out).exists()):
        return False
    done = json.loads(_stamp(out).read_text()).get("cmd") or []
    return done[1:] == cmd[1:]


REBUILD: set[str] = set()  # --rebuild: the keys (or "all") built again even where a file of the same command exists


def _build(out: Path, cmd: list[str], commands: dict, key: str) -> None:
    """Run ``cmd`` to make ``out`` unless a file of the same command is there (a file built by other code is
    kept with a warning: a changed default changes the file, not the command; ``--rebuild`` refreshes it)."""
    stamp = _stamp(out)
    code = code_version()
    if _built(out, cmd) and not REBUILD & {"all", key.split(" ")[0]}:
        commands[key] = json.loads(stamp.read_text())
        if code and commands[key].get("code") != code:
            log.warning("%s was built by code %s, this checkout is %s: --rebuild %s builds it again", key,
                        commands[key].get("code", "unknown"), code, key.split(" ")[0])
        return
    seconds = _run(cmd, stamp.with_name(stamp.name.replace(".cmd.json", ".log")))
    commands[key] = {"cmd": cmd, "seconds": round(seconds, 1), "code": code}
    stamp.write_text(json.dumps(commands[key]))


def relevel(src: Path, dst: Path, level: int) -> None:
    """``src`` (a file, or a genai folder's ``model.onnx``: then ``dst`` is a copy of the folder) with every
    MatMulNBits node's ``accuracy_level`` set to ``level``, weights untouched; except that below level 4 an
    8-bit node (the output head, which a KV-cache compile rounds to 8 bits only at level 4) becomes a float
    MatMul of the very values it computed with: ONNX Runtime's CPU MatMulNBits has no fast 8-bit path below
    level 4, and a compile at such a level keeps the head float (its speed; the 8-bit head's quality)."""
    from qcompiler.algorithms.packing import unpack_matmulnbits

    folder = src.is_dir()
    model_path = src / "model.onnx" if folder else src
    model = onnx.load(str(model_path))
    inits = {t.name: t for t in model.graph.initializer}
    dead: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if level < 4 and attrs["bits"] == 8 and all(n in inits for n in node.input[1:4] if n):
            arr = [onnx.numpy_helper.to_array(inits[n]) if n else None for n in list(node.input[1:4]) + [""] * 2]
            w = unpack_matmulnbits(arr[0], arr[1], arr[2], 8, attrs["block_size"], attrs["K"], attrs["N"])
            name = f"{node.name or node.output[0]}_float_weight"
            model.graph.initializer.append(onnx.numpy_helper.from_array(w.astype(arr[1].dtype), name))
            dead.update(n for n in node.input[1:] if n)
            matmul = onnx.helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name)
            model.graph.node[i].CopyFrom(matmul)
            continue
        del node.attribute[:]
        node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in {**attrs, "accuracy_level": level}.items())
    used = {n for node in model.graph.node for n in node.input}
    keep = [t for t in model.graph.initializer if t.name not in dead or t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if not folder:
        onnx.save(model, str(dst))
        return
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data", "model.qc.onnx"))
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")


_LOADED: dict = {}


def genai_folder(model: Path, hf: Path, work: Path) -> Path:
    """A folder onnxruntime-genai's generator loads, holding our compiled ``model`` (``--package genai``'s)."""
    from qcompiler.package import write_genai_folder

    out = work / "genai" / model.stem
    if not (out / "model.onnx").exists() or (out / "model.onnx").stat().st_mtime < model.stat().st_mtime:
        if hf not in _LOADED:
            from qcompiler.frontends import load_model

            _LOADED[hf] = load_model(str(hf))
        write_genai_folder(model, _LOADED[hf], out)
    return out


def _mtime(folder: Path) -> float:
    return (folder / "model.onnx").stat().st_mtime


def our_loop_copy(folder: Path) -> Path:
    """The builder's ``model.onnx`` with our cache-layout metadata (its cache dims are symbolic), beside its
    data file, so that our loop feeds it an empty past."""
    from qcompiler.kv_layout import CacheLayout

    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    layout = CacheLayout(cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_size"])
    dst = folder / "model.qc.onnx"
    if not dst.exists() or dst.stat().st_mtime < (folder / "model.onnx").stat().st_mtime:
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                            **layout.to_properties()})
        onnx.save(model, str(dst))
    return dst


def build(args, hf: Path, work: Path, genai_py: str | None) -> tuple[list[Entry], dict]:
    """Every file the table needs, built or found; the entries to measure and the commands behind them."""
    REBUILD.clear()
    REBUILD.update(args.rebuild)
    setting = ["--bits", str(args.bits), "--group-size", str(args.group_size), "--sym" if args.sym else "--asym"]
    tag = f"w{args.bits}-b{args.group_size}-{'sym' if args.sym else 'asym'}"
    qc = [sys.executable, "-m", "qcompiler"]
    commands: dict = {}
    entries: list[Entry] = []
    fp32 = work / "fp32.onnx"
    _build(fp32, [*qc, "export", str(hf), "-o", str(fp32)], commands, "fp32")
    entries.append(Entry("fp32", None, fp32, "qc"))
    first, *others = args.levels
    builder = [genai_py, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-i", str(hf), "-e", "cpu",
               "-c", str(work / "builder-cache")] if genai_py else None
    builder_fp32 = work / "builder-fp32"
    for name in args.variants:
        if name == "fp32":
            continue
        base = name.removesuffix(ON_BUILDER)
        extra = shlex.split(args.added.get(name) or args.added.get(base) or VARIANTS[base])
        if name != base:  # our method on the builder's fp32 graph, packaged for the generator
            if builder is None:
                log.warning("%s left out: it needs the builder (the genai venv)", name)
                continue
            _build(builder_fp32 / "model.onnx", [*builder, "-o", str(builder_fp32), "-p", "fp32"], commands,
                   "builder-fp32")
            out = work / f"{base}-on-builder-{tag}-acc{first}"
            cmd = [*qc, "compile", str(builder_fp32), *setting, *extra, "--accuracy-level", str(first),
                   "--package", "genai", "-o", str(out), "--report", str(out.with_name(out.name + ".report.json"))]
            if not _built(out / "model.onnx", cmd) and out.exists():
                shutil.rmtree(out)  # --package genai writes a new folder
            _build(out / "model.onnx", cmd, commands, f"{name} acc{first}")
            entries += [Entry(name, first, out, "genai"), Entry(name, first, our_loop_copy(out), "qc")]
            for level in others:
                dst = work / f"{base}-on-builder-{tag}-acc{level}"
                if not (dst / "model.onnx").exists() or _mtime(dst) < _mtime(out):
                    relevel(out, dst, level)
                commands[f"{name} acc{level}"] = {"derived": f"{out.name} with accuracy_level={level}"}
                entries += [Entry(name, level, dst, "genai"), Entry(name, level, our_loop_copy(dst), "qc")]
            continue
        out = work / f"{name}-{tag}-acc{first}.onnx"
        cmd = [*qc, "compile", str(hf), *setting, *extra, "--accuracy-level", str(first), "-o", str(out),
               "--report", str(out.with_suffix(".report.json"))]
        _build(out, cmd, commands, f"{name} acc{first}")
        entries.append(Entry(name, first, out, "qc"))
        for level in others:
            dst = work / f"{name}-{tag}-acc{level}.onnx"
            if not dst.exists() or dst.stat().st_mtime < out.stat().st_mtime:
                relevel(out, dst, level)
            commands[f"{name} acc{level}"] = {"derived": f"{out.name} with accuracy_level={level}"}
            entries.append(Entry(name, level, dst, "qc"))
    if genai_py and args.in_genai:  # our files in the builder's generator too (qcompiler.package's folder)
        entries += [Entry(e.name, e.level, genai_folder(e.path, hf, work), "genai") for e in list(entries)
                    if e.name in args.in_genai]
    if genai_py and args.builder:
        for level in args.levels:  # the builder's int4 at each level (its default: 4)
            out = work / f"builder-int4-acc{level}"
            cmd = [*builder, "-o", str(out), "-p", "int4", "--extra_options", f"accuracy_level={level}"]
            _build(out / "model.onnx", cmd, commands, f"builder-int4 acc{level}")
            entries += [Entry("builder-int4", level, out, "genai"),
                        Entry("builder-int4", level, our_loop_copy(out), "qc")]
        _build(builder_fp32 / "model.onnx", [*builder, "-o", str(builder_fp32), "-p", "fp32"], commands,
               "builder-fp32")
        entries += [Entry("builder-fp32", None, builder_fp32, "genai"),
                    Entry("builder-fp32", None, our_loop_copy(builder_fp32), "qc")]
    return entries, commands


# ---- text ------------------------------------------------------------------------------------------------

def token_sets(tokenizer_dir: str, text_path: Path, args) -> dict[str, np.ndarray]:
    """Perplexity windows (``qcompiler eval``'s: from the text's start, BOS where the tokenizer adds one), the
    speed prompt (the tokens after them) and the agreement prompts (evenly spaced through the rest)."""
    from qcompiler.runtime import evaluate
    from qcompiler.runtime.text import read_text

    text = read_text(text_path)
    windows = evaluate.token_windows(tokenizer_dir, text, args.windows, args.window_length)
    ids = np.asarray(evaluate._tokenizer(tokenizer_dir)(text, add_special_tokens=False)["input_ids"], np.int64)
    # the windows' text tokens come first (each window may begin with the tokenizer's BOS)
    start, n = windows.size - len(windows) * len(evaluate.window_prefix(tokenizer_dir)), args.prompt_tokens
    if len(ids) < start + n * (args.prompts + 1):
        raise SystemExit(f"the text has {len(ids)} tokens: too few for the prompts")
    step = (len(ids) - start - 2 * n) // max(args.prompts, 1)
    prompts = np.stack([ids[start + n + i * step:start + 2 * n + i * step] for i in range(args.prompts)])
    return {"windows": windows, "speed": ids[start:start + n], "prompts": prompts}


# ---- runtimes --------------------------------------------------------------------------------------------

class OurLoop:
    def __init__(self, entries: list[Entry]):
        from qcompiler.runtime.session import make_session

        self.sessions = {e.key: make_session(str(e.path)) for e in entries}

    def once(self, key: str, prompt: np.ndarray, new: int):
        from qcompiler.runtime.generate import generate

        return generate(self.sessions[key], prompt, max_new_tokens=new, eos_token_id=())

    def speed(self, keys: list[str], prompt: np.ndarray, new: int) -> dict[str, dict]:
        out = {}
        for k in keys:
            r = self.once(k, prompt, new)
            out[k] = {"prefill_s": r.prefill_s, "decode_s": r.decode_s, "decode_steps": r.decode_steps,
                      "decode_tokens_per_s": r.decode_tokens_per_s}
        return out

    def tokens(self, key: str, prompts: np.ndarray, new: int) -> list[list[int]]:
        return [self.once(key, p, new).tokens[0].tolist() for p in prompts]


class GenaiLoop:
    """The builder's generator in the genai venv, one process, driven by JSON lines."""

    def __init__(self, python: str, entries: list[Entry]):
        self.proc = subprocess.Popen([python, str(ROOT / "tools" / "decode_bench_genai.py"), "-"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = self.ask({"cmd": "load", "models": {e.key: str(e.path) for e in entries}})["versions"]

    def ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the genai worker ended early (see its stderr above)")
        return json.loads(line)

    def speed(self, keys: list[str], prompt: np.ndarray, new: int) -> dict[str, dict]:
        return self.ask({"cmd": "speed", "names": keys, "prompt": prompt.tolist(), "new_tokens": new})["speed"]

    def tokens(self, key: str, prompts: np.ndarray, new: int) -> list[list[int]]:
        return self.ask({"cmd": "tokens", "name": key, "prompts": prompts.tolist(), "new_tokens": new})["tokens"]

    def close(self) -> None:
        self.ask({"cmd": "quit"})
        self.proc.wait(timeout=60)


def measure_speed(loops: dict, entries: list[Entry], tokens: dict, args) -> dict[str, list[dict]]:
    by_rt = {rt: [e.key for e in entries if e.runtime == rt] for rt in loops}
    prompt, new = tokens["speed"], args.new_tokens
    for rt, keys in by_rt.items():  # warm-up: one run of each, untimed
        loops[rt].speed(keys, prompt, new)
    rounds: dict[str, list[dict]] = {e.key: [] for e in entries}
    for r in range(args.rounds):
        runtimes = list(by_rt) if r % 2 == 0 else list(reversed(by_rt))
        for rt in runtimes:
            keys = by_rt[rt]
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for k, v in loops[rt].speed(order, prompt, new).items():
                rounds[k].append({**v, "round": r})
        log.info("round %d/%d done", r + 1, args.rounds)
    return rounds


def measure_quality(loops: dict, entries: list[Entry], tokens: dict, args, cache: Path) -> dict[str, dict]:
    """Greedy tokens on the agreement prompts and perplexity (our ORT; the builder's graphs through our
    loop's copy), cached per file, its size and time, and the protocol."""
    from qcompiler.runtime import evaluate

    proto = [args.prompts, args.prompt_tokens, args.new_tokens, args.windows, args.window_length,
             tokens["prompts"][:, :4].tolist(), "top1"]
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for e in entries:
        if e.name in getattr(args, "no_quality_for", ()):
            continue
        f = e.path / "model.onnx" if e.path.is_dir() else e.path
        stamp = [str(f), f.stat().st_size, int(f.stat().st_mtime), e.runtime, proto]
        cached = cache / (e.key.replace(" ", "_").replace("@", "") + ".json")
        if cached.exists() and json.loads(cached.read_text()).get("stamp") == stamp:
            out[e.key] = json.loads(cached.read_text())
            continue
        log.info("quality: %s", e.key)
        q: dict = {"stamp": stamp, "tokens": loops[e.runtime].tokens(e.key, tokens["prompts"], args.new_tokens)}
        if e.runtime == "qc":
            ppl = evaluate.perplexity(str(e.path), tokens["windows"], top1=True)
            q["perplexity"], q["top1"] = ppl.perplexity, ppl.top1.tolist()
        cached.write_text(json.dumps(q))
        out[e.key] = q
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def top1_match(top1: list | None, ref: list | None) -> float | None:
    """The share of teacher-forced positions (the perplexity windows) where a model's most likely next token is
    the fp32 export's: agreement that one early divergence does not end, as the greedy common prefix does."""
    if not top1 or not ref:
        return None
    return float(np.mean(np.asarray(top1) == np.asarray(ref)))


def online_ops(path: Path) -> int:
    """CafeQ's online x T^-1 ops in a model (one core node each, whatever the layout)."""
    path = path / "model.onnx" if path.is_dir() else path
    if not path.exists():
        return 0
    return count_online_ops(onnx.load(str(path), load_external_data=False))


def _file_mb(p: Path) -> float:
    files = [p / "model.onnx", p / "model.onnx.data"] if p.is_dir() else [p, p.with_name(p.name + ".data")]
    return sum(f.stat().st_size for f in files if f.exists()) / 2**20


def _per_round(rounds: dict, key: str) -> dict[int, float]:
    return {r["round"]: r["decode_tokens_per_s"] for r in rounds.get(key, [])}


def summarize(entries: list[Entry], rounds: dict, quality: dict, prompt_tokens: int,
              relative_to: str | None = None) -> list[dict]:
    """One row per entry. ``relative_to``: a variant whose file at the same level each row's decode speed is also
    divided by, round by round (cafeq against rtn: the online ops' cost), as run in the row's own loop where it
    ran there too (else in ours)."""
    base_key = Entry("fp32", None, Path(), "qc").key
    base = _per_round(rounds, base_key)
    ref_tokens = quality.get(base_key, {}).get("tokens")
    ppl_of = {(e.name, e.level): quality.get(e.key, {}).get("perplexity") for e in entries if e.runtime == "qc"}
    ref_top1 = quality.get(base_key, {}).get("top1")
    top1_of = {(e.name, e.level): top1_match(quality.get(e.key, {}).get("top1"), ref_top1)
               for e in entries if e.runtime == "qc"}
    rows = []
    for e in entries:
        rs = rounds.get(e.key, [])
        tps = [r["decode_tokens_per_s"] for r in rs]
        ratio = [r["decode_tokens_per_s"] / base[r["round"]] for r in rs if r["round"] in base]
        q = quality.get(e.key, {})
        agree = [common_prefix(a, b) for a, b in zip(q["tokens"], ref_tokens, strict=True)] if (
            q.get("tokens") and ref_tokens) else []
        folder = e.path if e.path.is_dir() else (e.path.parent if e.path.name == "model.qc.onnx" else None)
        other = {}
        if relative_to:  # the same loop's run of that file where it has one, else our loop's
            other = (_per_round(rounds, Entry(relative_to, e.level, Path(), e.runtime).key)
                     or _per_round(rounds, Entry(relative_to, e.level, Path(), "qc").key))
        versus = [r["decode_tokens_per_s"] / other[r["round"]] for r in rs if r["round"] in other]
        rows.append({
            "model": e.name, "accuracy_level": e.level, "runtime": e.runtime, "file": str(e.path),
            "relative_to": relative_to if versus else None,
            "ratio_to_relative": statistics.median(versus) if versus else None,
            "size_mb": round(_file_mb(folder or e.path), 1), "online_ops": online_ops(e.path),
            "decode_tokens_per_s": statistics.median(tps) if tps else None,
            "ms_per_token": 1e3 / statistics.median(tps) if tps else None,
            "ratio_to_fp32": statistics.median(ratio) if ratio else None,
            "prefill_tokens_per_s": statistics.median(prompt_tokens / r["prefill_s"] for r in rs) if rs else None,
            "rounds": len(tps), "tokens_per_s_all": [round(t, 2) for t in tps],
            "agreement_mean": float(np.mean(agree)) if agree else None,
            "agreement_min": int(min(agree)) if agree else None,
            # the builder's graphs are scored through our loop's copy (the generator computes no perplexity)
            "perplexity": q.get("perplexity", ppl_of.get((e.name, e.level))),
            "top1_match": top1_of.get((e.name, e.level)),
        })
    return rows


# ---- report ----------------------------------------------------------------------------------------------

def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    p = result["protocol"]
    lines = [
        f"`{result['command']}` ({result['date']}; {result['machine']}; onnxruntime {result['versions']['qc']}, "
        f"onnxruntime-genai {result['versions'].get('genai', '-')}). {result['model']}, ours at {result['setting']}; "
        f"batch 1, greedy, {p['new_tokens']} tokens after a {p['prompt_tokens']}-token prompt, medians over "
        f"{p['rounds']} rounds; x fp32: decode speed over our fp32 export's in the same round. Agreement: mean "
        f"(min) common prefix with our fp32 export's {p['new_tokens']} greedy tokens over {p['prompts']} Jargon File "
        f"prompts. Perplexity: {p['windows']} x {p['window_length']} Jargon File tokens, as `qcompiler eval "
        "--perplexity` computes it (windows from the text's start, each begun as the model's tokenizer begins a "
        "text: BOS where it adds one). Top-1: the share of those windows' positions where the model's most likely "
        "next token is our fp32 export's.",
        "",
    ]
    rel = next((r["relative_to"] for r in result["rows"] if r.get("relative_to")), None)
    head = ["model", "level", "loop", "MB", "online ops", "decode tok/s", "x fp32", *([f"x {rel}"] if rel else []),
            "ms/token", "prefill tok/s", "agreement", "top-1", "perplexity"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if rel:
        lines[0] += (f" x {rel}: over our {rel} file's at the same level in the same round, in the same loop where "
                     "it ran in both.")
    for r in result["rows"]:
        agree = "-" if r["agreement_mean"] is None else f"{r['agreement_mean']:.1f} ({r['agreement_min']})"
        loop = "ours" if r["runtime"] == "qc" else "genai"
        cells = [r["model"], _fmt(r["accuracy_level"], "d"), loop, f"{r['size_mb']:.0f}", str(r.get("online_ops", 0)),
                 _fmt(r["decode_tokens_per_s"], ".1f"), _fmt(r["ratio_to_fp32"], ".2f"),
                 *([_fmt(r.get("ratio_to_relative"), ".3f")] if rel else []), _fmt(r["ms_per_token"], ".1f"),
                 _fmt(r["prefill_tokens_per_s"], ".0f"), agree, _fmt(r.get("top1_match"), ".3f"),
                 _fmt(r["perplexity"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Files, and the commands that built them:", ""]
    for name, c in result["commands"].items():
        what = c.get("derived") or "`" + shlex.join(["python", *c["cmd"][1:]]).replace(str(ROOT) + "/", "") + "`"
        lines.append(f"- {name}: {what}" + (f" ({c['seconds']:.0f} s)" if c.get("seconds") else ""))
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, table: str, name: str = "main") -> None:
    """Put ``table`` between the page's markers of block ``name`` (appended when the page has none)."""
    begin, end = MARK.format(block=name, end="begin"), MARK.format(block=name, end="end")
    text = path.read_text() if path.exists() else "# Serving causal LMs\n\n"
    table = f"{begin}\n{table}{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + table + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    path.write_text(text)


# ---- main ------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a Hugging Face causal LM folder or a bundled name")
    ap.add_argument("--work", help="where built files are kept (default bench/.work/decode/<model>)")
    ap.add_argument("--variants", default=",".join(CORE), help=f"comma list from fp32 and {', '.join(VARIANTS)}")
    ap.add_argument("--add", action="append", default=[], metavar="NAME=ARGS",
                    help="one more variant: a name and its qcompiler compile arguments")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (default: symmetric)")
    ap.add_argument("--levels", default="4,1", help="MatMulNBits accuracy levels (the first is compiled)")
    ap.add_argument("--no-builder", dest="builder", action="store_false", help="leave out the builder's models")
    ap.add_argument("--in-genai", default="", metavar="VARIANTS",
                    help="comma list of our variants also run in the builder's generator (fp32 included)")
    ap.add_argument("--no-genai", dest="genai", action="store_false",
                    help="no genai venv: no builder models, no genai loop")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=16, help="agreement prompts")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window-length", type=int, default=512)
    ap.add_argument("--text", help="text file (default: the Jargon File)")
    ap.add_argument("--relative-to", metavar="VARIANT",
                    help="one more ratio column: decode speed over this variant's at the same level, same round")
    ap.add_argument("--no-quality", dest="quality", action="store_false")
    ap.add_argument("--only-build", action="store_true", help="build the files and stop")
    ap.add_argument("--rebuild", default="", metavar="NAMES",
                    help="comma list of variants (or all) built again even where their files exist")
    ap.add_argument("--json", default="bench/decode.json", help="results JSON ('' for none)")
    ap.add_argument("--markdown", default="docs/serving.md", help="page whose table block is rewritten ('' for none)")
    ap.add_argument("--block", default="main", help="which table block of the page (several runs, one page)")
    ap.add_argument("--no-quality-for", default="", metavar="VARIANTS",
                    help="comma list of variants measured for speed only (no agreement, no perplexity)")
    args = ap.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",") if x]
    args.no_quality_for = {v for v in args.no_quality_for.split(",") if v}
    args.rebuild = {v for v in args.rebuild.split(",") if v}
    args.in_genai = {v for v in args.in_genai.split(",") if v}
    args.added = dict(a.split("=", 1) for a in args.add)
    args.variants = [v for v in args.variants.split(",") if v] + [n for n in args.added if n not in args.variants]
    unknown = [v for v in args.variants if v != "fp32" and v.removesuffix(ON_BUILDER) not in VARIANTS
               and v not in args.added and v.removesuffix(ON_BUILDER) not in args.added]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}: use --add NAME=ARGS")
    return args


def resolve_model(model: str) -> tuple[Path, str]:
    if Path(model).is_dir():
        return Path(model).resolve(), Path(model).resolve().name
    from qcompiler.frontends.bundled import bundled_path

    return Path(bundled_path(model)), model


def run(args: argparse.Namespace) -> dict:
    from qcompiler.runtime.text import default_text

    hf, short = resolve_model(args.model)
    work = Path(args.work) if args.work else ROOT / "bench" / ".work" / "decode" / short
    work.mkdir(parents=True, exist_ok=True)
    genai_py = None
    if args.genai and (args.builder or args.in_genai or any(v.endswith(ON_BUILDER) for v in args.variants)):
        genai_py = str(ROOT / subprocess.run([str(ROOT / "tools" / "genai_env.sh")], capture_output=True, text=True,
                                             check=True, cwd=ROOT).stdout.strip())
    entries, commands = build(args, hf, work, genai_py)
    if args.only_build:
        return {"commands": commands}
    tokens = token_sets(str(hf), Path(args.text) if args.text else default_text(), args)
    import onnxruntime as ort

    loops: dict = {"qc": OurLoop([e for e in entries if e.runtime == "qc"])}
    versions = {"qc": ort.__version__}
    genai_entries = [e for e in entries if e.runtime == "genai"]
    if genai_entries:
        loops["genai"] = GenaiLoop(genai_py, genai_entries)
        versions["genai"] = loops["genai"].version
    try:
        rounds = measure_speed(loops, entries, tokens, args) if args.rounds else {}
        quality = measure_quality(loops, entries, tokens, args, work / "quality") if args.quality else {}
    finally:
        if "genai" in loops:
            loops["genai"].close()
    return {
        "command": "python tools/decode_bench.py " + shlex.join(sys.argv[1:]) if sys.argv[1:] else
        "python tools/decode_bench.py",
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, shared",
        "versions": versions, "model": str(hf), "setting": f"{args.bits}-bit block {args.group_size} "
        f"{'sym' if args.sym else 'asym'}",
        "protocol": {k: getattr(args, k) for k in ("rounds", "prompt_tokens", "new_tokens", "prompts", "windows",
                                                  "window_length", "levels")},
        "commands": commands,
        "rows": summarize(entries, rounds, quality, args.prompt_tokens, args.relative_to),
        "rounds": rounds,
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    result = run(args)
    if args.only_build:
        return 0
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    block = markdown(result)
    if args.markdown:
        write_markdown(Path(args.markdown), block, args.block)
    sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
