"""Write a synthetic Llama-shaped model of a chosen size (random weights): ONNX with external data, or a
Hugging Face folder with sharded safetensors.

For the streaming-compile measurement (issue 8). ``--format onnx`` (default): the model is exported from a
randomly initialised ``transformers.LlamaForCausalLM`` through the same torch.onnx dynamo path as
qcompiler's HF frontend, and saved as ``model.onnx`` + ``model.onnx.data``. ``--format hf``: the model is
saved with ``save_pretrained`` in shards of ``--shard-gb``, as large checkpoints are published. Nothing
here is committed; the files go where ``--out`` says.

    python tools/make_synthetic_llama.py --out /tmp/synth-llama --gib 6
    python tools/make_synthetic_llama.py --out /tmp/synth-hf --gib 6 --format hf
    python tools/make_synthetic_llama.py --out /tmp/l8b --format hf --layers 2 --hidden 4096 \
        --intermediate 14336 --kv-heads 8 --vocab 32000        # Llama-3-8B's layer shapes, 2 layers
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

log = logging.getLogger("make_synthetic_llama")

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000


def layer_params(hidden: int, intermediate: int, heads: int, kv_heads: int) -> int:
    head_dim = hidden // heads
    return 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate + 2 * hidden


def layers_for(gib: float, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, heads: int = HEADS,
               kv_heads: int = KV_HEADS, vocab: int = VOCAB) -> int:
    """Fewest layers for at least ``gib`` GiB of fp32 parameters (untied embedding and head)."""
    fixed = 2 * vocab * hidden + hidden
    return max(1, math.ceil((gib * 2**30 / 4 - fixed) / layer_params(hidden, intermediate, heads, kv_heads)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for model.onnx and model.onnx.data, or the HF folder")
    ap.add_argument("--format", choices=("onnx", "hf"), default="onnx")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="--format hf: safetensors shard size (GB)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="--format hf: the checkpoint's stored type")
    ap.add_argument("--gib", type=float, default=6.0, help="fp32 parameter size to reach (GiB)")
    ap.add_argument("--layers", type=int, help="override the layer count (default: from --gib)")
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--heads", type=int, default=HEADS, help="query heads (Llama-3-8B: 32)")
    ap.add_argument("--kv-heads", type=int, default=KV_HEADS, help="KV heads (Llama-3-8B: 8)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import onnx
    import torch
    import transformers

    from qcompiler.frontends.export import WRAPPER_ATTR, _Wrapper
    from qcompiler.metadata import MODEL_KIND, SCOPE_PREFIX, set_model_properties

    layers = args.layers or layers_for(args.gib, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)
    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                   num_hidden_layers=layers,
                                   vocab_size=args.vocab, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    model = transformers.LlamaForCausalLM(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    log.info("%d layers, %.2f B parameters, %.2f GiB fp32 (built in %.0fs)", layers, n / 1e9, n * 4 / 2**30,
             time.perf_counter() - t)
    if args.format == "hf":
        t = time.perf_counter()
        model.to(getattr(torch, args.dtype)).save_pretrained(args.out, max_shard_size=f"{int(args.shard_gb * 1000)}MB")
        size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
        log.info("wrote %s (%.2f GiB of safetensors) in %.0fs", args.out, size / 2**30, time.perf_counter() - t)
        return 0
    ids = torch.randint(5, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    wrapper = _Wrapper(model, ["input_ids", "attention_mask"], lambda o: o.logits, {"use_cache": False}).eval()
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    t = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (ids, mask), dynamo=True, input_names=["input_ids", "attention_mask"],
                                    output_names=["logits"], dynamic_shapes=((dims, dict(dims)),), optimize=True,
                                    verbose=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    program.save(str(path), external_data=True)
    del program, model
    # qcompiler's frontend metadata: module scope prefix and kind (the proto alone; the data file is untouched)
    proto = onnx.load(str(path), load_external_data=False)
    set_model_properties(proto, {SCOPE_PREFIX: WRAPPER_ATTR + ".", MODEL_KIND: "causal_lm"})
    onnx.save(proto, str(path))
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    log.info("wrote %s (%.2f GiB with its data) in %.0fs", path, size / 2**30, time.perf_counter() - t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
