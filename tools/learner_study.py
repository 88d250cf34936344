"""Two questions about CafeQ's block learner on a real decoder (issue 30), answered on single sibling groups.

``--table start``: does a SINQ start (``diag(1/t)`` blocks from SINQ's input scales) let the learner reach the
identity start's proxy error in fewer steps? Prints the proxy error over RTN's after each step count, from both
starts (the project's own ``learn_block_transform``, no early stop).

``--table weights``: does weighting the learner's error by a per-input-channel weight found without text lower
the group's real output error? Learns a block transform under ``sum_k r_k ||(M^-1 Q(M W) - W)_k||^2`` for ``r`` =
1, the squared gain of the norm before the group, the group's input second moments ``E[z^2]`` on uniformly random
token ids (the model run on no text at all), and (an oracle that needs data) the inputs' own second moments
``E[x^2]`` on text; then measures ``||X (W_hat - W)||^2`` over RTN's on text activations (evaluation only: the
Jargon File, past the perplexity windows). Also prints how well the first two predict ``E[x^2]`` (correlation of
their logs).

``--table power``: which inputs do random tokens predict? For the inputs of q_proj (the normed residual stream),
o_proj (after attention) and down_proj (after the MLP's activation) in every layer, the correlation of the logs of
the mean square per channel on uniformly random ids and on text (position 0 left out); mean and minimum over the
layers. ``--input-weights noise`` weighs only the inputs it predicts well (the stream readers).

``--table schedule``: how few steps can the learner take (issue 29's compile time)? The proxy error over RTN's of
q/k/v, gate/up and down for learning-rate schedules (constant, or cosine down to 0) at several step counts and rates.

    python tools/learner_study.py --table start --setting 3-128-sym
    python tools/learner_study.py --table weights --setting 3-128-sym
    python tools/learner_study.py --table power --model smollm2
    python tools/learner_study.py --table schedule --setting 4-32-asym
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK = 64


def _setting(text: str):
    from qcompiler.algorithms.grid import GridSpec

    bits, group, kind = text.split("-")
    return GridSpec(int(bits), int(group), kind == "sym")


def _groups(model, layer: int) -> dict:
    """(weights ``[K, N]`` side by side, the norm before them) of q/k/v and gate/up."""
    ly = model.model.layers[layer]
    at, mlp = ly.self_attn, ly.mlp
    return {"qkv": ([at.q_proj, at.k_proj, at.v_proj], ly.input_layernorm),
            "gateup": ([mlp.gate_proj, mlp.up_proj], ly.post_attention_layernorm)}


def _stack(mods) -> np.ndarray:
    return np.concatenate([m.weight.detach().double().numpy().T for m in mods], axis=1)


def norm_gain(model, norm) -> np.ndarray:
    """The multiplier a norm applies per channel (Gemma's RMSNorm stores ``gain - 1``)."""
    w = norm.weight.detach().double().numpy()
    return 1.0 + w if "Gemma" in type(model).__name__ else w


def weighted_learn(w: np.ndarray, rows: np.ndarray, grid, steps: int, lr: float, seed: int = 0) -> np.ndarray:
    """The effective weight ``M^-1 Q(M W)`` of the block transform cafeq's learner (``learn_block_transform``
    with ``row_weights``, no early stop) learns under ``sum_k rows_k ||(M^-1 Q(M W) - W)_k||^2``."""
    import torch

    from qcompiler.algorithms.cafeq import LearnConfig, learn_block_transform
    from qcompiler.algorithms.transforms import apply_blocks

    res = learn_block_transform([w], grid, BLOCK, LearnConfig(steps=steps, lr=lr, patience=0, seed=seed), rows)
    q = grid(torch.tensor(apply_blocks(res.value, w), dtype=torch.float32), False).double().numpy()
    return apply_blocks(np.linalg.inv(res.value), q)


def text_ids(tokenizer_dir: str, tokens: int):
    """``tokens`` tokens of the Jargon File from its second half (past the perplexity windows), ``[1, tokens]``."""
    import transformers as tf

    from qcompiler.runtime.text import default_text, read_text

    text = read_text(default_text())
    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    return tok(text[len(text) // 2:], return_tensors="pt").input_ids[:, :tokens]


def random_ids(vocab: int, tokens: int, seed: int = 0, length: int = 256):
    """Uniformly random token ids, ``[tokens / length, length]``: no text at all."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (max(tokens // length, 1), length), generator=gen)


def activations(model, ids, layers: list[int]) -> dict[str, np.ndarray]:
    """Inputs of q_proj and gate_proj on ``ids`` (position 0, the attention sink, left out)."""
    import torch

    caps, hooks = {}, []
    for layer in layers:
        for name, (mods, _) in _groups(model, layer).items():
            def hook(_mod, inp, _out, key=f"{layer}.{name}"):
                caps[key] = inp[0].detach()[:, 1:].reshape(-1, inp[0].shape[-1]).double().numpy()
            hooks.append(mods[0].register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return caps


def log_corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.log(a + 1e-12), np.log(b + 1e-12))[0, 1])


POWER_INPUTS = {"q's input (the normed stream)": "self_attn.q_proj", "O's input (after attention)": "self_attn.o_proj",
                "down's input (after the activation)": "mlp.down_proj"}


def input_power(model, ids) -> dict[str, list[np.ndarray]]:
    """Per ``POWER_INPUTS`` entry, each layer's input mean square per channel on ``ids`` (position 0 left out)."""
    import torch

    out: dict[str, list[np.ndarray]] = {k: [None] * len(model.model.layers) for k in POWER_INPUTS}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for key, path in POWER_INPUTS.items():
            def hook(_mod, inp, _out, key=key, i=i):
                x = inp[0].detach()[:, 1:].reshape(-1, inp[0].shape[-1]).double()
                out[key][i] = (x ** 2).mean(0).numpy()
            hooks.append(layer.get_submodule(path).register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return out


def power_table(model, text, tokens: int) -> list[str]:
    """How well random tokens predict each input's per-channel power on ``text`` (ids ``[1, T]``)."""
    x, z = input_power(model, text), input_power(model, random_ids(model.config.vocab_size, tokens))
    out = ["| model | " + " | ".join(POWER_INPUTS) + " |", "|---" * (len(POWER_INPUTS) + 1) + "|"]
    cells = []
    for key in POWER_INPUTS:
        c = [log_corr(zi, xi) for zi, xi in zip(z[key], x[key], strict=True)]
        cells.append(f"mean {np.mean(c):.2f}, min {np.min(c):.2f}")
    out.append(f"| {type(model).__name__} ({len(model.model.layers)} layers) | " + " | ".join(cells) + " |")
    return out


def start_table(model, layers, grid, steps_list) -> list[str]:
    import qcompiler.algorithms.cafeq as cafeq
    from qcompiler.algorithms.sinq import sinkhorn_scales

    out = ["| group | " + " | ".join(f"identity, {s}" for s in steps_list) + " | SINQ alone | "
           + " | ".join(f"SINQ, {s}" for s in steps_list) + " |", "|---" * (2 * len(steps_list) + 2) + "|"]
    for layer in layers:
        for name, (mods, _) in _groups(model, layer).items():
            ws = [m.weight.detach().double().numpy().T for m in mods]
            t = sinkhorn_scales(np.concatenate(ws, axis=1), grid.group_size)
            sinq = np.stack([np.diag(1 / t[i:i + BLOCK]) for i in range(0, len(t), BLOCK)])
            cells = []
            for start in (None, sinq):
                for steps in ([] if start is None else [0]) + list(steps_list):
                    original = cafeq.initial_blocks
                    if start is not None:
                        cafeq.initial_blocks = lambda *_a, s=start: s.copy()
                    try:
                        r = cafeq.learn_block_transform(ws, grid, BLOCK, cafeq.LearnConfig(steps=steps, patience=0))
                    finally:
                        cafeq.initial_blocks = original
                    cells.append(f"{r.error / r.identity_error:.4f}")
            out.append(f"| layer {layer} {name} | " + " | ".join(cells) + " |")
    return out


def weights_table(model, folder, layers, grid, steps, lr, tokens) -> list[str]:
    import torch

    from qcompiler.algorithms.fakequant import fake_quant

    caps = activations(model, text_ids(folder, tokens), layers)
    noise = activations(model, random_ids(model.config.vocab_size, tokens), layers)
    out = ["| group | corr(log gain^2, log E[x^2]) | corr(log E[z^2], log E[x^2]) | RTN | learned, r = 1 | "
           "learned, r = gain^2 | learned, r = E[z^2] (random tokens) | learned, r = E[x^2] (oracle) |",
           "|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        for name, (mods, norm) in _groups(model, layer).items():
            w = _stack(mods)
            x = caps[f"{layer}.{name}"]
            ex2, g2 = (x ** 2).mean(0), norm_gain(model, norm) ** 2
            ez2 = (noise[f"{layer}.{name}"] ** 2).mean(0)
            rtn = fake_quant(torch.tensor(w), grid.bits, grid.block(w.shape[0]), grid.symmetric, False).numpy()

            def err(w_hat, x=x, w=w):
                return float(((x @ (w_hat - w)) ** 2).sum())

            base = err(rtn)
            cells = [f"{err(weighted_learn(w, r, grid, steps, lr)) / base:.3f}"
                     for r in (np.ones_like(g2), g2, ez2, ex2)]
            out.append(f"| layer {layer} {name} | {log_corr(g2, ex2):+.2f} | {log_corr(ez2, ex2):+.2f} | 1.000 | "
                       + " | ".join(cells) + " |")
    return out


def schedule_table(model, layers, grid, variants: list[str]) -> list[str]:
    """Proxy error over RTN's of q/k/v, gate/up and down per layer, for each ``schedule:steps:lr[:columns]`` variant
    (the production learner: early stop at its patience, groups wider than ``columns`` output columns, default
    ``--column-batch``'s, on column batches); the last rows give the mean ratio over the groups and each variant's
    learning time relative to the first's (same process)."""
    import time

    import qcompiler.algorithms.cafeq as cafeq

    batch = cafeq.LearnConfig().column_batch
    parsed = [(v, *(v.split(":") + [str(batch)])[:4]) for v in variants]
    out = ["| group | " + " | ".join(v for v, *_ in parsed) + " |", "|---" * (len(parsed) + 1) + "|"]
    ratios, seconds = [[] for _ in parsed], [0.0] * len(parsed)
    for layer in layers:
        ly = model.model.layers[layer]
        groups = dict(_groups(model, layer))
        groups["down"] = ([ly.mlp.down_proj], None)
        for name, (mods, _) in groups.items():
            ws = [m.weight.detach().double().numpy().T for m in mods]
            cells = []
            for i, (_, schedule, steps, lr, columns) in enumerate(parsed):
                cfg = cafeq.LearnConfig(steps=int(steps), lr=float(lr), lr_schedule=schedule, column_batch=int(columns))
                t0 = time.perf_counter()
                r = cafeq.learn_block_transform(ws, grid, BLOCK, cfg)
                seconds[i] += time.perf_counter() - t0
                ratios[i].append(r.error / r.identity_error)
                cells.append(f"{ratios[i][-1]:.4f} ({r.steps})")
            out.append(f"| layer {layer} {name} | " + " | ".join(cells) + " |")
    out.append("| mean error / RTN's | " + " | ".join(f"{np.mean(r):.4f}" for r in ratios) + " |")
    out.append("| time / the first's | " + " | ".join(f"{s / seconds[0]:.2f}" for s in seconds) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", choices=("start", "weights", "power", "schedule"), required=True)
    ap.add_argument("--model", default="smollm2", help="bundled name or HF folder of a Llama/Gemma-style decoder")
    ap.add_argument("--setting", default="3-128-sym", help="bits-group-sym|asym")
    ap.add_argument("--layers", default="3,15,27")
    ap.add_argument("--steps", default="100,200,400", help="start: step counts; weights: the first is unused, "
                                                            "the last is the steps")
    ap.add_argument("--lr", type=float, default=None, help="weights: Adam's rate (default: cafeq's)")
    ap.add_argument("--variants", default="constant:400:0.02,cosine:200:0.02,cosine:200:0.04,cosine:400:0.04",
                    help="schedule: learning-rate schedules to compare, each schedule:steps:lr[:column batch]")
    ap.add_argument("--tokens", type=int, default=1024, help="weights: activation tokens")
    args = ap.parse_args(argv)

    import torch
    import transformers as tf

    from qcompiler.config import CafeqConfig
    from qcompiler.frontends.bundled import BUNDLED, bundled_path

    torch.set_num_threads(1)
    folder = str(bundled_path(args.model)) if args.model in BUNDLED else args.model
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    grid, layers = _setting(args.setting), [int(x) for x in args.layers.split(",")]
    steps = [int(x) for x in args.steps.split(",")]
    if args.table == "start":
        lines = start_table(model, layers, grid, steps)
    elif args.table == "schedule":
        lines = schedule_table(model, layers, grid, args.variants.split(","))
    elif args.table == "power":
        lines = power_table(model, text_ids(folder, args.tokens), args.tokens)
    else:
        lines = weights_table(model, folder, layers, grid, steps[-1], args.lr or CafeqConfig.lr, args.tokens)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
