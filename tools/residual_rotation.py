"""Issue 28's zero-cost design, measured before building it: an orthogonal transform ``Q`` of a Llama-family
model's residual stream, folded into every weight that reads or writes it, then round-to-nearest.

    python tools/residual_rotation.py                       # SmolLM2, 4- and 3-bit block 128 sym
    python tools/residual_rotation.py --kinds none,bhad64 --settings 4-128-sym

The stream ``x`` becomes ``x Q`` (the embedding ``E Q``, each writer's output ``W Q``); RMSNorm commutes with an
orthogonal ``Q`` once its gain ``g`` is folded into the readers (``Q^T diag(g) W``), so with float weights the
model is unchanged (``--kinds`` row ``fp32``: exactness). The head is untied from the embedding and kept on an
8-bit grid, as a KV-cache compile does at level 4. Kinds: ``none`` (plain RTN), ``random`` (a random orthogonal
``Q``), ``bhadB`` (block-diagonal Hadamard blocks of ``B`` with random signs), ``brandB`` (block-diagonal random
orthogonal blocks), ``fold`` (the gains folded, ``Q = I``). Perplexity as ``qcompiler eval --perplexity``
computes it (the Jargon File windows, BOS-led), in torch with fake-quantized weights (the grid of ``grid.py``,
ties aside).
"""

from __future__ import annotations

import argparse
import logging
import math

import numpy as np
import torch

log = logging.getLogger("residual_rotation")

READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
LINEARS = (*READERS["input_layernorm"], "self_attn.o_proj", *READERS["post_attention_layernorm"], "mlp.down_proj")


def orthogonal(kind: str, d: int, seed: int = 0) -> torch.Tensor:
    """``[d, d]`` float64 orthogonal matrix of the given kind (see the module's docstring)."""
    from qcompiler.algorithms.cafeq import hadamard
    from qcompiler.algorithms.transforms import random_orthogonal

    rng = np.random.default_rng(seed)
    if kind in ("none", "fold"):
        return torch.eye(d, dtype=torch.float64)
    if kind == "random":
        return torch.from_numpy(random_orthogonal(d, rng))
    for prefix, block in (("bhad", hadamard), ("brand", lambda b: random_orthogonal(b, rng))):
        if kind.startswith(prefix):
            b = int(kind[len(prefix):])
            if d % b:
                raise ValueError(f"{kind}: {b} does not divide the hidden size {d}")
            signs = np.where(rng.random(d) < 0.5, -1.0, 1.0)
            q = np.zeros((d, d))
            for i in range(0, d, b):
                q[i:i + b, i:i + b] = block(b)
            return torch.from_numpy(signs[:, None] * q)
    raise ValueError(f"unknown kind {kind!r}")


def rotate_residual(model, q: torch.Tensor) -> None:
    """Fold every RMSNorm gain into the weights that read its output and turn the residual stream ``x`` into
    ``x Q`` (torch ``Linear``: ``y = x W^T``). The head is untied from the embedding first."""
    q = q.to(torch.float64)
    inner = model.model
    head = model.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    emb = inner.embed_tokens
    emb.weight = torch.nn.Parameter((emb.weight.detach().double() @ q).float())

    def fold(norm, linears) -> None:
        gain = norm.weight.detach().double()
        for lin in linears:
            lin.weight.data = ((lin.weight.detach().double() * gain[None, :]) @ q).float()
        norm.weight.data = torch.ones_like(norm.weight)

    for layer in inner.layers:
        for norm, names in READERS.items():
            fold(getattr(layer, norm), [layer.get_submodule(n) for n in names])
        for name in WRITERS:
            lin = layer.get_submodule(name)
            lin.weight.data = (q.T @ lin.weight.detach().double()).float()
    fold(inner.norm, [head])


def fake_quantize(model, bits: int, block: int, symmetric: bool, head_bits: int | None = 8) -> None:
    """Round every layer's linear weight to nearest on the block grid (groups along the input); the head on its
    own ``head_bits`` grid (block 128, symmetric), untied from the embedding; None: a float head."""
    from qcompiler.algorithms.fakequant import fake_quant

    def rtn(lin, b, bs, sym) -> None:
        lin.weight.data = fake_quant(lin.weight.detach().T.contiguous(), b, bs, sym, ste=False).T.contiguous()

    for layer in model.model.layers:
        for name in LINEARS:
            rtn(layer.get_submodule(name), bits, block, symmetric)
    if head_bits:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        rtn(model.lm_head, head_bits, 128, True)


@torch.no_grad()
def perplexity(model, windows: np.ndarray) -> float:
    total, count = 0.0, 0
    for w in torch.from_numpy(windows):
        logits = model(w[None]).logits[0, :-1].double()
        target = w[1:]
        total += float((torch.logsumexp(logits, -1) - logits[torch.arange(len(target)), target]).sum())
        count += len(target)
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="a Llama-family Hugging Face folder or a bundled name")
    ap.add_argument("--kinds", default="fp32,none,fold,random,bhad64,brand64")
    ap.add_argument("--settings", default="4-128-sym,3-128-sym", help="comma list of BITS-BLOCK-sym|asym")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from qcompiler.frontends.bundled import bundled_path
    from qcompiler.runtime.evaluate import token_windows
    from qcompiler.runtime.text import default_text, read_text

    folder = args.model if Path(args.model).is_dir() else str(bundled_path(args.model))
    windows = token_windows(folder, read_text(default_text()), args.windows, 512)
    settings = [(int(b), int(bs), s == "sym") for b, bs, s in (x.split("-") for x in args.settings.split(","))]
    torch.set_grad_enabled(False)
    print("| kind | " + " | ".join(f"{b}-bit block {bs} {'sym' if s else 'asym'}" for b, bs, s in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for kind in args.kinds.split(","):
        cells = []
        for setting in ([None] if kind == "fp32" else settings):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            if kind != "none":
                rotate_residual(model, orthogonal("random" if kind == "fp32" else kind, model.config.hidden_size,
                                                  args.seed))
            if setting:
                fake_quantize(model, *setting)
            cells.append(f"{perplexity(model, windows):.2f}")
            log.info("%s %s: %s", kind, setting or "float weights", cells[-1])
        print(f"| {kind} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
