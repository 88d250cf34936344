"""Greedy tokens from onnxruntime-genai's generator for a model folder (model.onnx, genai_config.json,
tokenizer files): what a user of onnxruntime-genai gets from a folder we wrote. Run it in the genai venv::

    $(tools/genai_env.sh) tools/genai_generate.py FOLDER --prompt "Once upon a time" -n 16
    $(tools/genai_env.sh) tools/genai_generate.py FOLDER --ids 10 20 30 -n 8 --json

It imports nothing of qcompiler (numpy and onnxruntime_genai only). With ``--ids`` it does not load the tokenizer
unless ``--decode`` asks for the text: onnxruntime-genai 0.18's tokenizer loader crashes in some runs on the tests'
word-level ``tokenizer.json`` (a segfault in ``JsonFastTokenizer::Load``, 3% to 60% of runs depending on the
folder's model file, none on the same folder without loading it), so the tests, which want ids, never touch it.

Generation stops after an end token (kept in ``tokens``) or ``-n`` tokens; ``--ignore-eos`` gives exactly ``-n``
(genai's ``min_length``, which forbids the end token until then: the tokens after a forbidden end differ from a
loop that merely goes on past it). ``--json`` prints ``{"prompt_ids", "tokens", "text", "decode_tokens_per_s"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import onnxruntime_genai as og


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text, encoded with the folder's tokenizer")
    src.add_argument("--ids", type=int, nargs="+", help="prompt token ids")
    p.add_argument("-n", "--new-tokens", type=int, default=16)
    p.add_argument("--ignore-eos", action="store_true", help="exactly -n tokens (end tokens forbidden until then)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--decode", action="store_true",
                   help="with --ids, also show the text (the folder's tokenizer is loaded only for --prompt or this: "
                        "genai's tokenizer loader crashes now and then on a word-level tokenizer.json)")
    args = p.parse_args(argv)

    model = og.Model(args.folder)
    tokenizer = og.Tokenizer(model) if args.prompt is not None or args.decode else None
    ids = list(args.ids) if args.ids else [int(t) for t in tokenizer.encode(args.prompt)]
    total = len(ids) + args.new_tokens
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total if args.ignore_eos else 0)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    gen.generate_next_token()
    t0 = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    decode_s = time.perf_counter() - t0
    tokens = [int(t) for t in gen.get_sequence(0)][len(ids):]
    text = tokenizer.decode(np.asarray(tokens, dtype=np.int32)) if tokenizer is not None else None
    speed = (len(tokens) - 1) / decode_s if decode_s > 0 and len(tokens) > 1 else None
    if args.json:
        json.dump({"prompt_ids": ids, "tokens": tokens, "text": text, "decode_tokens_per_s": speed}, sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(f"{text}\n" if text is not None else f"{tokens}\n")
        sys.stderr.write(f"{len(tokens)} tokens; decode {speed:.1f} tokens/s\n" if speed else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
