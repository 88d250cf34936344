"""What ``--dtype float16`` costs a model, against its float32 export and its float32 quantized compile.

    python tools/fp16_check.py                          # SmolLM2 (its KV-cache export), rtn 4-bit block 32
    python tools/fp16_check.py MODEL --method cafeq --long 3000

Rows (relative output error ||y - y_ref|| / ||y_ref|| of the first output, logits or hidden states, on the
validation inputs a compile uses: Jargon File text when the model has a tokenizer; the last 16 positions):
- fp16 alone (float weights) against fp32, on ONNX Runtime CPU and in a GPU-like emulation (``fp16_storage``:
  every fp16 tensor rounded to fp16, each op in fp32; ONNX Runtime's CPU provider instead runs chains of
  its fp32-only kernels between Casts it inserts, which hides overflow), with and without the fp32 islands;
- with ``--long N``: the same on a prefill of N tokens of the text (the last 16 positions), where the rotary
  angles of positions past 2048 count;
- the quantized compile in fp16 against the fp32 export and against the fp32 quantized compile.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def fp16_storage(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 model that computes what the float16 ``model`` does on a GPU: every op in fp32, every tensor
    that is fp16 in ``model`` rounded to fp16 (a Cast pair after its producer). Needs ``model``'s value_info
    (our exports and passes keep it)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    for t in g.initializer:
        if t.data_type == F16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for v in [*g.input, *g.output]:
        if v.type.tensor_type.elem_type == F16:
            v.type.tensor_type.elem_type = F32
    del g.value_info[:]
    nodes = []
    for n in g.node:
        for a in n.attribute:
            if a.name == "to" and a.i == F16:
                a.i = F32
        nodes.append(n)
        for i, o in enumerate(n.output):
            if types.get(o) == F16:
                n.output[i] = o + "__fp32"
                nodes += [helper.make_node("Cast", [o + "__fp32"], [o + "__fp16"], to=F16),
                          helper.make_node("Cast", [o + "__fp16"], [o], to=F32)]
    del g.node[:]
    g.node.extend(nodes)
    return m


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b)) if np.isfinite(a).all() else float("inf")


def main(argv: list[str] | None = None) -> int:
    from qcompiler.config import CompileConfig, QuantConfig
    from qcompiler.emit import emit_model
    from qcompiler.frontends import load_model
    from qcompiler.graphio import import_graph
    from qcompiler.passes import PrecisionPass
    from qcompiler.pipeline import compile_model
    from qcompiler.runtime.inputs import sample_inputs
    from qcompiler.runtime.session import SessionOptions
    from qcompiler.runtime.text import JARGON_FILE, read_text
    from qcompiler.runtime.text_inputs import token_input, validation_inputs
    from qcompiler.runtime.validate import run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--long", type=int, default=0, help="also a prefill of this many tokens")
    ap.add_argument("--cache-dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    exact = SessionOptions(device="cpu", optimize=False)

    loaded = load_model(args.model, cache_dir=args.cache_dir)
    original = loaded.model
    inputs = validation_inputs(original, loaded.tokenizer_dir)

    def first(model, feeds):
        out = run(model, feeds, exact)
        return out[next(iter(out))][:, -16:]

    def fp16(keep: bool) -> onnx.ModelProto:
        graph = import_graph(original)
        PrecisionPass("float16", keep_fp32=keep)(graph)
        return emit_model(graph, original, {})

    rows = []
    variants = {"islands": fp16(True), "no islands": fp16(False)}
    probes = [(inputs.label, inputs.feeds)]
    if args.long:  # one prefill of that many tokens: each model computes its own cache and rotary angles
        feeds = sample_inputs(original, batch=1, seq=args.long)
        name = token_input(original)
        what = "random token ids"
        if name and loaded.tokenizer_dir:
            from transformers import AutoTokenizer

            try:
                ids = AutoTokenizer.from_pretrained(loaded.tokenizer_dir)(read_text(JARGON_FILE))["input_ids"]
                feeds[name] = np.array([ids[:args.long]], dtype=feeds[name].dtype)
                what = "the Jargon File"
            except (OSError, ValueError) as e:  # a folder without tokenizer files
                logging.warning("random token ids: %s", str(e).splitlines()[0])
        probes.append((f"a prefill of {args.long} tokens of {what}, last 16 positions", feeds))
    for label, feeds in probes:
        ref = first(original, feeds)
        for name, model in variants.items():
            rows.append((f"fp16 ({name}) vs fp32, ONNX Runtime CPU", label, _rel(first(model, feeds), ref)))
            rows.append((f"fp16 ({name}) vs fp32, GPU-like emulation", label,
                         _rel(first(fp16_storage(model), feeds), ref)))
    quant = QuantConfig(args.bits, args.group_size, True)
    q32 = compile_model(args.model, None, CompileConfig(method=args.method, quant=quant, validate=False),
                        cache_dir=args.cache_dir).model
    q16 = compile_model(args.model, None, CompileConfig(method=args.method, quant=quant, validate=False,
                                                        dtype="float16"), cache_dir=args.cache_dir).model
    ref, y32, y16 = first(original, inputs.feeds), first(q32, inputs.feeds), first(q16, inputs.feeds)
    tag = f"{args.method} {quant.tag()}"
    rows += [(f"{tag} fp32 vs fp32 export", inputs.label, _rel(y32, ref)),
             (f"{tag} fp16 vs fp32 export", inputs.label, _rel(y16, ref)),
             (f"{tag} fp16 vs {tag} fp32", inputs.label, _rel(y16, y32)),
             (f"{tag} fp16 vs {tag} fp32, GPU-like emulation", inputs.label,
              _rel(first(fp16_storage(q16), inputs.feeds), y32))]
    print(f"{args.model}: relative error of the first output")
    width = max(len(r[0]) for r in rows)
    for what, label, err in rows:
        print(f"  {what:<{width}}  {err:.2e}  ({label})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
