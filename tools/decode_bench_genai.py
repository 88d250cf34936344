"""The onnxruntime-genai side of ``tools/decode_bench.py``: run in the genai venv (``tools/genai_env.sh``), it
imports nothing of qcompiler (only numpy and onnxruntime_genai) and follows the same protocol as our loop.

    .venv-genai/bin/python tools/decode_bench_genai.py -   # JSON lines in on stdin, one JSON line out for each

Messages: ``{"cmd": "load", "models": {name: folder}}``; ``{"cmd": "speed", "names": [...], "prompt": [ids],
"new_tokens": 128}`` runs each model once in that order (batch 1, greedy, ``new_tokens`` after the prompt, end
tokens ignored through ``min_length``; decode counts the steps after the first token); ``{"cmd": "tokens",
"name": ..., "prompts": [[ids], ...], "new_tokens": 128}`` gives each prompt's greedy continuation;
``{"cmd": "quit"}``.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime_genai as og


def run_once(model: og.Model, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """(new tokens, prefill seconds (prompt run and the first token), decode seconds (the other steps))."""
    total = len(prompt) + new_tokens
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.asarray(prompt, dtype=np.int32))
    gen.generate_next_token()
    t1 = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    t2 = time.perf_counter()
    seq = [int(t) for t in gen.get_sequence(0)]
    return seq[len(prompt):], t1 - t0, t2 - t1


def main() -> int:
    models: dict[str, og.Model] = {}
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "load":
            models = {name: og.Model(folder) for name, folder in msg["models"].items()}
            reply: dict = {"versions": getattr(og, "__version__", "?")}
        elif cmd == "speed":
            reply = {"speed": {}}
            for name in msg["names"]:
                toks, pre, dec = run_once(models[name], msg["prompt"], int(msg["new_tokens"]))
                steps = len(toks) - 1
                reply["speed"][name] = {"prefill_s": pre, "decode_s": dec, "decode_steps": steps,
                                        "decode_tokens_per_s": steps / dec if dec > 0 else None}
        elif cmd == "tokens":
            reply = {"tokens": [run_once(models[msg["name"]], p, int(msg["new_tokens"]))[0] for p in msg["prompts"]]}
        elif cmd == "quit":
            sys.stdout.write("{}\n")
            sys.stdout.flush()
            return 0
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
