"""Issue 30's question, layer by layer: where does joint rounding of coupled pairs hurt a Llama-family LLM, and
can a data-free signal tell those pairs apart?

    python tools/joint_ablation.py                                  # SmolLM2, 3-bit block 128 sym
    python tools/joint_ablation.py --rows "vo:0-29" "updown:26-29" --setting 4-128-sym

In torch on the HF model, without cafeq's transforms (the factors as they are): every linear layer is rounded to
nearest on ``grid.py``'s grid, except the V·O and up·down pairs a row names, whose factors come from
``joint_round`` (the pipeline's own function and defaults: 4 rounds for V·O, 2 and channel weight 4 for up·down).
Each row prints the perplexity of the Jargon File windows ``qcompiler eval --perplexity`` uses (text tokens
only). A row is ``kind:layers[;kind:layers]`` with kinds ``vo`` / ``updown`` and layers like ``0-3,7``;
``plain`` is plain RTN everywhere; ``sink`` is the data-free rule below.

The sink rule: the model's first position (the attention sink every later token reads) has nearly the same state
whatever its token from the third layer on (cosine 0.88-1.00 against the windows' first positions on SmolLM2),
so a one-token forward of the BOS token, no text, gives it. A pair keeps its joint rounding only where the sink
state's pair output (``x A B``; up·down through SiLU of the gate: ``(silu(x G) * (x A)) B``) is not further off
than with both factors rounded to nearest. ``--show-ratios`` prints each layer's ratio (joint / plain).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qcompiler.algorithms.joint import Heads  # noqa: E402
from qcompiler.algorithms.sink import sink_ratio  # noqa: E402
from tools.residual_rotation import perplexity  # noqa: E402  (the same windows' perplexity, in torch)

log = logging.getLogger("joint_ablation")
KINDS = ("vo", "updown")


def parse_row(row: str, layers: int) -> set[tuple[str, int]]:
    """``"vo:0-3,7;updown:5"`` -> {(kind, layer)}; ``plain`` -> empty."""
    out: set[tuple[str, int]] = set()
    if row == "plain":
        return out
    for part in filter(None, row.split(";")):
        kind, _, spans = part.partition(":")
        if kind not in KINDS or not spans:
            raise ValueError(f"bad row part {part!r}: want vo:LAYERS or updown:LAYERS")
        for span in spans.split(","):
            lo, _, hi = span.partition("-")
            chosen = range(int(lo), int(hi or lo) + 1)
            if not chosen or chosen[-1] >= layers:
                raise ValueError(f"layers {span!r} outside 0-{layers - 1}")
            out |= {(kind, i) for i in chosen}
    return out


def format_row(chosen: set[tuple[str, int]]) -> str:
    """:func:`parse_row`'s inverse, runs of layers written ``lo-hi``."""
    parts = []
    for kind in KINDS:
        layers = sorted(i for k, i in chosen if k == kind)
        runs: list[list[int]] = []
        for i in layers:
            if runs and i == runs[-1][1] + 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        if runs:
            parts.append(f"{kind}:" + ",".join(f"{lo}-{hi}" if hi > lo else f"{lo}" for lo, hi in runs))
    return ";".join(parts) or "plain"


PAIR_NAMES = {"vo": ("self_attn.v_proj", "self_attn.o_proj"), "updown": ("mlp.up_proj", "mlp.down_proj")}


def pair_factors(state: dict, kind: str, i: int) -> tuple[np.ndarray, np.ndarray]:
    """``A`` ``[in, C]`` and ``B`` ``[C, out]`` (float64) of layer ``i``'s pair in a state dict (torch ``Linear``
    stores ``W^T``)."""
    return tuple(state[f"model.layers.{i}.{n}.weight"].double().numpy().T for n in PAIR_NAMES[kind])


def sink_form(layer, kind: str, x: np.ndarray, heads: tuple[int, int]) -> tuple[Heads | None, np.ndarray | None]:
    """How ``algorithms/sink.py`` computes the pair's output at the sink state ``x``: V·O by query head
    (``Heads``), up·down through SiLU of the float gate ``x G`` (``g``)."""
    if kind == "updown":
        z = x @ layer.mlp.gate_proj.weight.detach().double().numpy().T
        return None, z / (1.0 + np.exp(-z))
    head_dim, rep = heads
    n = layer.self_attn.o_proj.weight.shape[1] // head_dim
    return Heads(head_dim, tuple(j // rep for j in range(n))), None


def sink_states(model, token: int) -> dict[tuple[str, int], np.ndarray]:
    """Each layer's V and up input at the first position of a one-token forward of ``token``."""
    states: dict[tuple[str, int], np.ndarray] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for kind, mod in (("vo", layer.self_attn.v_proj), ("updown", layer.mlp.up_proj)):
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, key=(kind, i): states.__setitem__(key, inp[0][0, :1].double().numpy())))
    try:
        with torch.no_grad():
            model(torch.tensor([[token]]))
    finally:
        for h in hooks:
            h.remove()
    return states


class Ablation:
    """The model's plain and jointly rounded pairs at one setting, computed once; rows are applied in place."""

    def __init__(self, model, bits: int, block: int, symmetric: bool):
        from qcompiler.algorithms.grid import GridSpec, quantize

        self.model, self.grid = model, GridSpec(bits, block, symmetric)
        cfg = model.config
        self.heads = (cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads)
        self.original = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.plain = {name: torch.from_numpy(np.ascontiguousarray(
            quantize(w.double().numpy().T.astype(np.float32), bits, block, symmetric).dequantize().T))
            for name, w in self.original.items() if name.endswith("proj.weight") and name.startswith("model.layers")}
        self.joint: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self.joint_bound: dict[tuple[str, int], float] = {}  # (PQE / plain PQE)^2 of joint_pair's rounding

    def _joint(self, kind: str, i: int, rounds: int | None = None):
        """``joint_round`` of layer ``i``'s pair with the compile's defaults (4 rounds for V·O, 2 and channel weight 4
        for up·down), or with ``rounds`` rounds."""
        import dataclasses

        from qcompiler.algorithms.joint import joint_round
        from qcompiler.config import CafeqConfig
        from qcompiler.methods.transform_planner import joint_configs
        from qcompiler.sites import ATTN_VO, MLP_UP_DOWN

        a, b = pair_factors(self.original, kind, i)
        heads = None
        if kind == "vo":
            head_dim, rep = self.heads
            heads = Heads(head_dim, tuple(j // rep for j in range(b.shape[0] // head_dim)))
        cfg = joint_configs(CafeqConfig())[ATTN_VO if kind == "vo" else MLP_UP_DOWN]
        return joint_round(a, b, self.grid, self.grid, heads,
                           cfg=cfg if rounds is None else dataclasses.replace(cfg, rounds=rounds))

    def joint_pair(self, kind: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        if (kind, i) not in self.joint:
            res = self._joint(kind, i)
            self.joint[(kind, i)] = (res.a.dequantize().astype(np.float64), res.b.dequantize().astype(np.float64))
            self.joint_bound[(kind, i)] = (res.pqe / res.pqe_plain) ** 2
            log.info("%s %d: PQE %.4f -> %.4f", kind, i, res.pqe_plain, res.pqe)
        return self.joint[(kind, i)]

    def _sink_ratios(self, token: int, kinds: tuple[str, ...], joint) -> dict[tuple[str, int], float]:
        """``sink_ratio`` of each pair of ``kinds`` on the sink state (float model's state), ``joint(kind, i)`` giving
        its jointly rounded factors."""
        self.apply(set(), float_weights=True)
        states = sink_states(self.model, token)
        out = {}
        for i, layer in enumerate(self.model.model.layers):
            for kind in kinds:
                x = states[(kind, i)]
                heads, g = sink_form(layer, kind, x, self.heads)
                out[(kind, i)] = sink_ratio(x, pair_factors(self.original, kind, i), pair_factors(self.plain, kind, i),
                                            joint(kind, i), heads, g)
        return out

    def sink_ratios(self, token: int) -> dict[tuple[str, int], float]:
        """Joint / plain squared error of each pair's output on the sink state (float model's state)."""
        return self._sink_ratios(token, KINDS, self.joint_pair)

    def round_table(self, token: int, kinds: tuple[str, ...] = KINDS) -> list[tuple[str, int, list[tuple]]]:
        """Per pair: the sink rule's ``(sink ratio, bound)`` after each round of joint rounding (the bound:
        ``(PQE / plain PQE)^2``), each round count run from the start as a compile with that many rounds would
        (the last is :meth:`joint_pair`'s). What the compile's ``--joint-mlp-screen`` rests on: whether the rule's
        verdict after the first rounds is its verdict after all of them."""
        from qcompiler.config import CafeqConfig

        full = {"vo": CafeqConfig().joint_rounds, "updown": CafeqConfig().joint_mlp_rounds}
        rows: dict[tuple[str, int], list[tuple]] = {}
        for r in range(1, max(full[k] for k in kinds) + 1):
            bound: dict[tuple[str, int], float] = {}

            def joint(kind: str, i: int, r: int = r, bound: dict = bound) -> tuple[np.ndarray, np.ndarray]:
                if r == full[kind]:
                    factors = self.joint_pair(kind, i)
                    bound[(kind, i)] = self.joint_bound[(kind, i)]
                    return factors
                res = self._joint(kind, i, r)
                bound[(kind, i)] = (res.pqe / res.pqe_plain) ** 2
                return res.a.dequantize().astype(np.float64), res.b.dequantize().astype(np.float64)

            ratios = self._sink_ratios(token, tuple(k for k in kinds if full[k] >= r), joint)
            for key, ratio in ratios.items():
                rows.setdefault(key, []).append((ratio, bound[key]))
        out = [(kind, i, rows[(kind, i)]) for i in range(len(self.model.model.layers)) for kind in kinds]
        for kind, i, rs in out:
            log.info("%s %d: %s", kind, i, " ".join(f"{r:.3f}/{b:.3f}" for r, b in rs))
        return out

    def apply(self, chosen: set[tuple[str, int]], float_weights: bool = False) -> None:
        """Float weights everywhere, or plain RTN with the chosen pairs jointly rounded."""
        state = dict(self.original)
        if not float_weights:
            state.update(self.plain)
            for kind, i in chosen:
                for name, w in zip(PAIR_NAMES[kind], self.joint_pair(kind, i), strict=True):
                    state[f"model.layers.{i}.{name}.weight"] = torch.from_numpy(np.ascontiguousarray(w.T)).float()
        self.model.load_state_dict(state)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="a Llama-family Hugging Face folder or a bundled name")
    ap.add_argument("--setting", default="3-128-sym", help="BITS-BLOCK-sym|asym")
    ap.add_argument("--rows", nargs="+", default=["plain", "vo:0-29", "updown:0-29", "vo:0-3", "vo:4-29",
                                                 "updown:0-25", "updown:26-29", "updown:27", "updown:28", "sink"])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--show-ratios", action="store_true", help="print the sink rule's per-layer ratios")
    ap.add_argument("--rounds-table", default="", metavar="KINDS",
                    help="instead of rows: the sink rule's verdict after each round of joint rounding against its "
                         "verdict after all of them, for the pairs of these kinds (vo,updown)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers import AutoModelForCausalLM

    from qcompiler.frontends.bundled import bundled_path
    from qcompiler.runtime.evaluate import token_windows
    from qcompiler.runtime.text import default_text, read_text

    folder = args.model if Path(args.model).is_dir() else str(bundled_path(args.model))
    windows = token_windows(folder, read_text(default_text()), args.windows, 512)
    bits, block, sym = args.setting.split("-")
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    n = model.config.num_hidden_layers
    ab = Ablation(model, int(bits), int(block), sym == "sym")
    if args.rounds_table:
        bos = model.config.bos_token_id if model.config.bos_token_id is not None else 0
        table = ab.round_table(bos, tuple(args.rounds_table.split(",")))
        print(f"| pairs ({args.setting}) | rounds | verdict after round 1 = after the last | kept after the last |\n"
              "|---|---|---|---|")
        for kind in args.rounds_table.split(","):
            rows = [r for k, _, r in table if k == kind]
            same = sum((r[0][0] <= r[0][1]) == (r[-1][0] <= r[-1][1]) for r in rows)
            kept = sum(r[-1][0] <= r[-1][1] for r in rows)
            print(f"| {kind} | {len(rows[0])} | {same} of {len(rows)} | {kept} |")
        return 0
    print(f"| joint-rounded pairs ({args.setting}) | perplexity |\n|---|---|")
    for row in args.rows:
        if row == "sink":
            bos = model.config.bos_token_id if model.config.bos_token_id is not None else 0
            ratios = ab.sink_ratios(bos)
            if args.show_ratios:
                for kind in KINDS:
                    log.info("sink ratio %s: %s", kind, " ".join(f"{i}:{ratios[(kind, i)]:.2f}" for i in range(n)))
            chosen = {key for key, r in ratios.items() if r <= 1.0}
            label = f"sink rule: {format_row(chosen)}"
        else:
            chosen = parse_row(row, n)
            label = format_row(chosen)
        ab.apply(chosen)
        print(f"| {label} | {perplexity(model, windows):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
