"""Pairs found and the fold check, per model and exporter: the figures quoted for the pair matcher.

    python tools/pair_report.py            # tiny models of every family (dynamo and legacy exports)
    python tools/pair_report.py --real     # ... plus the real MiniLM and SmolLM2-135M

For each model: attn_vo and mlp_up_down pairs, heads/KV heads/head size, the KV map, and how much
ONNX Runtime's outputs change when random exact transforms are folded into every pair.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcompiler.frontends import load_model  # noqa: E402
from qcompiler.inspect.verify import fold_check  # noqa: E402
from tests.conftest import PAIR_FAMILIES, legacy_export, make_tiny_checkpoint  # noqa: E402


def row(name: str, exporter: str, model) -> str:
    t = time.perf_counter()
    check, a = fold_check(model)
    seconds = time.perf_counter() - t
    vo, mlp = a.pairs_of("attn_vo"), a.pairs_of("mlp_up_down")
    heads = sorted({(p.num_heads, p.num_kv_heads, p.head_dim) for p in vo})
    maps = sorted({p.kv_map for p in vo})
    kinds = sorted({("gated " if p.gate else "") + p.activation for p in mlp})
    return (f"| {name} | {exporter} | {len(vo)} | {len(mlp)} | {heads} | {maps if len(maps) > 1 else list(maps[0])} "
            f"| {', '.join(kinds)} | {len(a.pair_rejections)} | {check.rel_change:.1e} | {seconds:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="also MiniLM and SmolLM2 (SmolLM2 takes minutes once)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print("| model | exporter | attn_vo | mlp_up_down | (heads, KV heads, head size) | KV map | MLP | rejected "
          "| fold change | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for family in PAIR_FAMILIES:
            folder = make_tiny_checkpoint(family, root / family)
            print(row(f"tiny {family}", "dynamo", load_model(str(folder), cache_dir=root / "cache").model), flush=True)
            import onnx

            print(row(f"tiny {family}", "legacy", onnx.load(legacy_export(folder, root / f"{family}.onnx"))),
                  flush=True)
    if args.real:
        for name in ("minilm", "smollm2"):
            print(row(name, "dynamo", load_model(name).model), flush=True)


if __name__ == "__main__":
    main()
