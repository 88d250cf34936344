"""``qcompiler generate``: a token loop over ONNX Runtime with the model's KV cache; tokens are streamed to
stdout, prefill and decode speed printed at the end (on stderr, so stdout holds only the text)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="generate text with a KV-cache causal LM (.onnx), token by token")
    g.add_argument("model", help="a causal LM .onnx with a KV cache (what `qcompiler compile` and `export` "
                   "write), or an onnxruntime-genai folder (the model builder's, or --package genai's)")
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: all)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--tokenizer", help="tokenizer folder (default: recorded in the model)")
    return g


def run(args: argparse.Namespace) -> int:
    from qcompiler.errors import ConfigError
    from qcompiler.frontends.onnx_file import runnable_model
    from qcompiler.metadata import TOKENIZER
    from qcompiler.runtime.generate import generate, load_tokenizer, text_streamer
    from qcompiler.runtime.session import SessionOptions, make_session

    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
    model = runnable_model(args.model)
    sess = make_session(model, SessionOptions(device=args.device))
    tok_dir = args.tokenizer or sess.get_modelmeta().custom_metadata_map.get(TOKENIZER)
    if not tok_dir:
        raise ConfigError("no tokenizer: pass --tokenizer DIR (the model does not record one)")
    tok = load_tokenizer(tok_dir)
    stream = text_streamer(tok, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    res = generate(sess, args.prompt, tokenizer=tok, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed, on_token=stream)
    sys.stdout.write("\n")
    if not args.quiet:
        decode = f"{res.decode_steps / res.decode_s:.1f} tokens/s" if res.decode_steps else "no decode step"
        sys.stderr.write(f"prefill: {res.prompt_tokens} tokens in {res.prefill_s * 1e3:.0f} ms "
                         f"({res.prompt_tokens / res.prefill_s:.1f} tokens/s); decode: {res.decode_steps} tokens, "
                         f"{decode}\n")
    return 0
