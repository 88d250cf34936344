"""Typed, frozen configuration of a compile: the one place a default and its help text live.

Every field carries its help (and, where it differs from ``--field-name``, its command-line flag) in
its metadata; ``qcompiler.cli.options`` builds the command line from these classes, so the CLI and
``compile_model(src, out)`` share every default. Validated on construction; an error names the field
and its flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from qcompiler.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
STREAM_AUTO_BYTES = 2 * 1024**3  # external data above this: stream unless told otherwise
PER_CHANNEL = 0  # group_size value meaning "one group spans all of K"
FORMATS = ("matmulnbits", "qdq")
# the registered methods (qcompiler.methods.registry holds one object per name; a test checks they agree)
METHODS = ("rtn", "rotate", "sinq", "cafeq", "gptq", "gptaq", "cafeq+gptaq")
TRANSFORMS = ("single", "vo", "updown")
JOINT_PAIRS = ("vo", "updown")
JOINT_RULES = ("sink", "sink-loose", "pqe")  # when a pair keeps its joint rounding (methods/transform_planner.py)
INPUT_WEIGHTS = ("uniform", "noise")  # how the input channels of a stream-reading weight count in its learned error
LR_SCHEDULES = ("constant", "cosine")  # the learners' learning rate over their steps
ONLINE_REGIMES = ("batch", "token")  # what --online-budget is a fraction of (methods/online_cost.py)
# how the online x T^-1 is written (passes/online_transform.py); auto: conv for causal LMs, else matmul
ONLINE_LAYOUTS = ("auto", "matmul", "conv")
DEVICES = ("auto", "cpu", "cuda")
EXECUTORS = ("local", "ray")  # where the learning and joint-rounding tasks run (workers.py)
DTYPES = ("float32", "float16", "bfloat16")  # of the compiled model (passes/precision.py)


def opt(help: str, *, flag: str | tuple[str, str] | None = None, choices: tuple | None = None,
        cli: bool = True, kind: str | None = None) -> dict[str, Any]:
    """A field's metadata. ``flag``: the command-line flag when it is not ``--field-name`` (a boolean
    defaulting to True gets ``--no-field-name``; a pair names the on and off flags of a tri-state
    boolean); ``kind``: how the CLI parses text ("group_size", "list"); ``cli=False``: not an option."""
    return {"help": help, "flag": flag, "choices": choices, "cli": cli, "kind": kind}


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of field ``name`` of config class ``cls`` (for messages)."""
    meta = next(f.metadata for f in fields(cls) if f.name == name)
    flag = meta.get("flag")
    if isinstance(flag, tuple):
        return flag[0]
    if flag:
        return flag
    return "--" + name.replace("_", "-")


def _bad(cls: type, name: str, problem: str) -> ConfigError:
    return ConfigError(f"{name} ({flag_of(cls, name)}) {problem}")


@dataclass(frozen=True)
class QuantConfig:
    """What grid each weight gets. ``group_size`` 0 means per output channel."""

    bits: int = field(default=4, metadata=opt("bits per weight (3-bit codes use the 4-bit container)",
                                               choices=SUPPORTED_BITS))
    group_size: int = field(default=32, metadata=opt(
        "rows of K sharing one scale: a power of two in 16..256, or 'channel'", kind="group_size"))
    symmetric: bool = field(default=False, metadata=opt(
        "symmetric grid (ONNX Runtime's convention) or asymmetric with integer zero points",
        flag=("--sym", "--asym")))

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise _bad(QuantConfig, "bits", f"must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        g = self.group_size
        if g != PER_CHANNEL and (g < 16 or g > 256 or g & (g - 1)):
            raise _bad(QuantConfig, "group_size", f"must be a power of two in 16..256 or 'channel', got {g}")

    @property
    def per_channel(self) -> bool:
        return self.group_size == PER_CHANNEL

    def describe(self) -> str:
        grp = "per-channel" if self.per_channel else f"block {self.group_size}"
        return f"{self.bits}-bit {grp} {'sym' if self.symmetric else 'asym'}"

    def tag(self) -> str:
        """Short name of the setting, for file names: ``w4-b32-asym``."""
        grp = "ch" if self.per_channel else f"b{self.group_size}"
        return f"w{self.bits}-{grp}-{'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class MatchConfig:
    """Which weights the matcher offers for quantization. Embedding tables are quantized along the
    hidden axis, on the output head's grid, and read by GatherBlockQuantized (only the rows asked for) or
    dequantized whole by a standard DequantizeLinear before the Gather (smaller files, not faster ones)."""

    # a decode step reads the whole head: at SmolLM2's size (49152 x 576, tied to the embedding) a float head
    # is more bytes per token than all 30 layers at 4 bits. 8-bit costs nothing measurable (4-bit block 128
    # sym rtn: perplexity 33.80 float head, 33.77 8-bit, 44.24 4-bit) and decodes 14% faster at accuracy
    # level 4 (docs/serving.md). None: on for a decoder that serves tokens (a KV-cache graph), off for every
    # other graph, and off for an 8-bit head below --accuracy-level 4 (pipeline._resolve_head: 4x slower)
    quantize_lm_head: bool | None = field(default=None, metadata=opt(
        "quantize the output head (the logits MatMul) on its own grid (--head-bits), rounded to nearest; a head "
        "tied to the embedding gets its own quantized copy (default: on for KV-cache decoders, which read the "
        "whole head every token)", flag=("--quantize-lm-head", "--no-quantize-lm-head")))
    # a decoder reads one row of its embedding table per token, yet a float table is most of a small LLM's file
    # (SmolLM2: 113 of 198 MB at 4 bits with an 8-bit head). None: on for a KV-cache decoder whose tables
    # GatherBlockQuantized can read on the head's grid (pipeline._resolve_embeddings), off for every other graph
    quantize_embeddings: bool | None = field(default=None, metadata=opt(
        "also quantize embedding tables, on the output head's grid (--head-bits, --head-group-size, --head-sym), "
        "rounded to nearest (default: on for KV-cache decoders, read with GatherBlockQuantized; off otherwise)",
        flag=("--quantize-embeddings", "--no-quantize-embeddings")))
    head_bits: int | None = field(default=8, metadata=opt(
        "bits of the output head, rounded to nearest on its own grid (--head-group-size, --head-sym; None in "
        "the API, with both of those None too: --bits, and the method's own rounding)", choices=SUPPORTED_BITS))
    # onnxruntime-genai's builder stores its int4 head in blocks of 32, asymmetric: on SmolLM2 (rtn 4-bit block
    # 128 sym body, tools/residual_rotation.py's perplexity) a 4-bit head costs 33.14 -> 43.39 in blocks of 128
    # sym, 36.88 in blocks of 32 asym, 35.56 with SINQ's scales (--head-scales): the serving trade of a head
    # half the bytes of an 8-bit one
    head_group_size: int | None = field(default=None, metadata=opt(
        "block of the output head's own grid (default: --group-size)", kind="group_size"))
    head_symmetric: bool | None = field(default=None, metadata=opt(
        "symmetric or asymmetric grid for the output head (default: the model's, --sym / --asym)",
        flag=("--head-sym", "--head-asym")))
    head_scales: bool = field(default=True, metadata=opt(
        "balance a head rounded to fewer than 8 bits with SINQ's Sinkhorn scales (their input scale folded into "
        "the gain of the norm before the head: free at run time); kept only where they lower the head's error"))
    # why the head stays float where the compiler, not the user, turned it off (pipeline._resolve_head)
    head_float_reason: str = ""
    gather_embeddings: bool | None = field(default=None, metadata=opt(
        "read quantized embedding tables with com.microsoft GatherBlockQuantized (only the rows a run asks "
        "for) instead of dequantizing the whole table every run (default: on for KV-cache decoders)",
        flag=("--gather-embeddings", "--no-gather-embeddings")))


@dataclass(frozen=True)
class CafeqConfig:
    """CafeQ's transforms (and the ``rotate`` baseline's): which kinds, and how they are learned."""

    transforms: tuple[str, ...] = field(default=TRANSFORMS, metadata=opt(
        "any subset of single (block-diagonal T, online x T^-1 per sibling group), vo (V·O per KV head, "
        "folded), updown (up·down diagonal + permutation, folded)", kind="list"))
    block_size: int = field(default=64, metadata=opt(
        "b of the single-matrix transforms (online cost ~ b/N)"))
    loss: str = field(default="ste", metadata=opt(
        "ste: straight-through Frobenius; lse: LogSumExp smooth range", flag="--pseudo-loss",
        choices=("ste", "lse")))
    optimizer: str = field(default="adam", metadata=opt(
        "adam (+ orthonormality penalty) or cayley (orthogonal)", choices=("adam", "cayley")))
    steps: int = field(default=400, metadata=opt("optimiser steps per learned transform"))
    patience: int = field(default=100, metadata=opt(
        "stop a learner once its best error has not fallen by 0.01% in this many steps (0: never)"))
    lr: float = field(default=2e-2, metadata=opt("learning rate"))
    lr_schedule: str = field(default="constant", metadata=opt(
        "the learners' rate over their steps: constant, or cosine (from --lr down to 0 at the last step)",
        choices=LR_SCHEDULES))
    ortho_reg: float = field(default=0.0, metadata=opt("orthonormality penalty weight (adam)"))
    temperature: float = field(default=20.0, metadata=opt("LSE temperature (--pseudo-loss lse)"))
    init: str = field(default="identity", metadata=opt(
        "start of the learned transforms (rotate: orthogonal unless hadamard)",
        choices=("identity", "orthogonal", "hadamard")))
    # the most the online x T^-1 ops may add to run time (a fraction), by methods/online_cost.py's model
    # of the regime: batch (arithmetic; prefill, encoders) or token (a decoder's batch-1 token step, where
    # each op's fixed cost counts: SmolLM2 keeps 23 of its 60 groups' ops); cheapest first
    online_budget: float = field(default=0.03, metadata=opt(
        "the most the online x T^-1 ops may add to run time, as a fraction"))
    online_regime: str = field(default="batch", metadata=opt(
        "run time the budget is counted in: batch (arithmetic) or token (a decoder's batch-1 token step, "
        "where each op's fixed cost counts; fewer ops, less accuracy)", choices=ONLINE_REGIMES))
    online_layout: str = field(default="auto", metadata=opt(
        "how the online x T^-1 ops are written: matmul (batched MatMul: encoders, prefill), conv (grouped "
        "1x1 Conv: a decoder's batch-1 token steps), auto (conv for causal LMs)", choices=ONLINE_LAYOUTS))
    column_batch: int = field(default=1024, metadata=opt(
        "wide groups learn on this many random columns per step", cli=False))
    # joint rounding of coupled pairs after the transforms (cafeq only): which pair kinds, how many
    # alternations (one round = producer's step, then consumer's)
    joint_pairs: tuple[str, ...] = field(default=JOINT_PAIRS, metadata=opt(
        "cafeq: which coupled pairs are rounded jointly (subset of vo,updown; empty: none)", kind="list"))
    joint_rounds: int = field(default=4, metadata=opt("cafeq: alternations of joint rounding per V·O pair"))
    joint_mlp_rounds: int = field(default=2, metadata=opt(
        "cafeq: alternations of joint rounding per up·down pair (wide: each costs ~10x a V·O round)"))
    # MiniLM 3-bit fidelity (1 - cos, MLP pairs only): 0.1083 without, 0.1049 at 1, 0.0846 at 4
    joint_channel_weight: float = field(default=4.0, metadata=opt(
        "cafeq, MLP pairs: weight of each channel's own product error against the whole product's (the "
        "activation between up and down varies per token)"))
    # a pair's working set (methods/transform_planner.joint_memory_bytes): ~7 S^2 + 11 C K float64, S the Hessians'
    # width (C, or a block of --joint-channel-block); measured 1.6 GB at C = 5632 in two blocks, 4.7 GB at C = 14336
    # wide MLP pairs are rounded in blocks of channels (each block's target the residual the others leave):
    # memory ~ block^2 + the weights instead of C^2; on a 5632-channel pair two blocks cost 0.4% of PQE
    joint_channel_block: int = field(default=4096, metadata=opt(
        "cafeq: an up·down pair wider than this many channels is jointly rounded a block of channels at a time"))
    # 8: Llama-3-8B's MLP pair (C = 14336, K = 4096, four blocks of 3584) is estimated at 5.5 GB (4.7 GB measured) and
    # was skipped at the earlier 4; a 70B MLP pair (C = 28672, K = 8192) is estimated at about 20 GB, still over
    joint_max_gb: float = field(default=8.0, metadata=opt(
        "skip joint rounding of a pair needing more memory than this, in GB (wide MLPs), with a warning"))
    # the sink rule turns nearly every up·down pair down, and each of their rounds costs ~7x a V·O round: judged
    # after this many rounds first, only the pairs that pass run the rest (SmolLM2 without transforms, 4-bit block
    # 128 asym and 3-bit block 128 sym: the rule after 1 round and after 2 agreed on all 30 up·down pairs; on 2 of 30
    # V·O pairs it did not: tools/joint_ablation.py --rounds-table)
    joint_mlp_screen: int = field(default=1, metadata=opt(
        "cafeq, --joint-rule sink/sink-loose on a decoder: judge each up·down pair after this many rounds and run "
        "the rest of its --joint-mlp-rounds only if it passes (0: run them all first)"))
    # SmolLM2 3-bit block 128 sym perplexity (fp32 24.86): no joint rounding 57.60; every pair joint (pqe) 74.84;
    # sink-loose 59.65 (45 of 60 pairs joint); sink 55.03 (7 of 60)
    joint_rule: str = field(default="sink", metadata=opt(
        "cafeq: which pairs keep their joint rounding. sink: on a decoder, only those whose squared output error "
        "at the attention sink (a one-token forward of BOS, no data) falls at least by the share their product "
        "error falls; sink-loose: those whose sink error does not grow; on an encoder, and with pqe: every pair "
        "whose product error it lowers", choices=JOINT_RULES))
    # MiniLM 3-bit block 128 asym, seeds 0/1/2, mean cosine (qcompiler eval --reference minilm): noise 0.9208 0.9250
    # 0.9235, uniform 0.9207 0.9089 0.9159; SmolLM2 3-bit block 128 sym perplexity: docs/methods.md
    input_weights: str = field(default="noise", metadata=opt(
        "cafeq: how each input channel of a weight that reads the residual stream (q/k/v, gate/up, V, up) counts in "
        "the errors its transforms are learned on and in joint rounding's product error. noise: by its mean square "
        "in a forward of uniformly random token ids (no text: 4 x 256 tokens); uniform: alike",
        choices=INPUT_WEIGHTS))

    def __post_init__(self) -> None:
        bad = [t for t in self.transforms if t not in TRANSFORMS]
        if bad:
            raise _bad(CafeqConfig, "transforms", f"takes a subset of {','.join(TRANSFORMS)}, got {','.join(bad)}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise _bad(CafeqConfig, "block_size", f"must be a power of two (1: diagonal), got {self.block_size}")
        for name in ("loss", "optimizer", "init", "online_regime", "online_layout", "joint_rule"):
            choices = next(f.metadata["choices"] for f in fields(CafeqConfig) if f.name == name)
            if getattr(self, name) not in choices:
                raise _bad(CafeqConfig, name, f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.steps < 0 or self.patience < 0:
            raise ConfigError("steps (--steps) and patience (--patience) must be >= 0")
        if not self.lr > 0 or self.ortho_reg < 0:
            raise ConfigError("lr (--lr) must be > 0 and ortho_reg (--ortho-reg) >= 0")
        if not 0 <= self.online_budget <= 1:
            raise _bad(CafeqConfig, "online_budget", f"must be in [0, 1], got {self.online_budget}")
        bad = [t for t in self.joint_pairs if t not in JOINT_PAIRS]
        if bad:
            raise _bad(CafeqConfig, "joint_pairs", f"takes a subset of {','.join(JOINT_PAIRS)}, got {','.join(bad)}")
        if not (0 <= self.joint_rounds <= 50 and 0 <= self.joint_mlp_rounds <= 50):
            raise ConfigError(f"joint_rounds (--joint-rounds) and joint_mlp_rounds (--joint-mlp-rounds) must be "
                              f"in 0..50, got {self.joint_rounds}, {self.joint_mlp_rounds}")
        if not 0 <= self.joint_mlp_screen <= 50:
            raise _bad(CafeqConfig, "joint_mlp_screen", f"must be in 0..50, got {self.joint_mlp_screen}")
        if self.joint_channel_block < 64:
            raise _bad(CafeqConfig, "joint_channel_block", f"must be >= 64, got {self.joint_channel_block}")
        if not self.joint_max_gb > 0:
            raise _bad(CafeqConfig, "joint_max_gb", f"must be > 0, got {self.joint_max_gb}")
        if not self.joint_channel_weight >= 0:
            raise _bad(CafeqConfig, "joint_channel_weight", f"must be >= 0, got {self.joint_channel_weight}")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data and the GPTQ/GPTAQ solver (methods gptq, gptaq, cafeq+gptaq).

    Defaults are smaller than the papers' 128 x 2048 tokens: 64 x 512 fits this project's 2-core
    machines (SmolLM2-135M in minutes)."""

    source: str | None = field(default=None, metadata=opt(
        "calibration text file (.txt, .gz, ...) or .npy of token ids (default: Python's documentation, "
        "shipped with CPython)", flag="--calib"))
    tokenizer: str | None = field(default=None, metadata=opt(
        "tokenizer folder for the calibration text (default: the model's)"))
    samples: int = field(default=64, metadata=opt("calibration sequences", flag="--calib-samples"))
    seqlen: int = field(default=512, metadata=opt("tokens per sequence", flag="--calib-seqlen"))
    holdout: int = field(default=0, metadata=opt(
        "extra held-out sequences: report ||X W_hat - X~ W|| per site on them", flag="--calib-holdout"))
    batch: int = field(default=8, metadata=opt("sequences per ONNX Runtime run", flag="--calib-batch"))
    percdamp: float = field(default=0.01, metadata=opt("Hessian damping, fraction of mean diag"))
    act_order: bool = field(default=False, metadata=opt("round inputs by decreasing activation energy"))
    alpha: float = field(default=0.25, metadata=opt("GPTAQ: weight of the asymmetric term"))
    block: int = field(default=128, metadata=opt("rows per lazy batch update", flag="--gptq-block"))
    # attention V projections: round each KV head's columns against the error the attention output sees,
    # ||A X dW|| (A the attention weights), not ||X dW||: attention sinks make a few tokens' values count
    # far more than their share of X (docs/methods.md)
    attention_values: bool = field(default=True, metadata=opt(
        "round attention V projections as attention mixes their inputs (A X); off: on X alone"))

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 2 or self.holdout < 0 or self.batch < 1:
            raise ConfigError("samples (--calib-samples) >= 1, seqlen (--calib-seqlen) >= 2, holdout "
                              "(--calib-holdout) >= 0 and batch (--calib-batch) >= 1 are required")
        if not 0 <= self.percdamp <= 1:
            raise _bad(CalibConfig, "percdamp", f"must be in [0, 1], got {self.percdamp}")
        if not self.alpha >= 0:
            raise _bad(CalibConfig, "alpha", f"must be >= 0, got {self.alpha}")
        if self.block < 1:
            raise _bad(CalibConfig, "block", f"must be >= 1, got {self.block}")


@dataclass(frozen=True)
class CompileConfig:
    quant: QuantConfig = field(default_factory=QuantConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    method: str = field(default="rtn", metadata=opt(
        "rtn: round to nearest; rotate: random rotations; sinq: Sinkhorn-balanced scales folded into the "
        "model, no data; cafeq: learned transforms + joint rounding, no data; gptq / gptaq / cafeq+gptaq: "
        "calibrated (see docs/methods.md)", choices=METHODS))
    format: str = field(default="matmulnbits", metadata=opt(
        "matmulnbits: com.microsoft MatMulNBits; qdq: DequantizeLinear (opset 21) + MatMul", choices=FORMATS))
    accuracy_level: int = field(default=1, metadata=opt(
        "MatMulNBits accuracy_level on every node: 1 float activations, 4 int8 activations (0 unset, 2 fp16, "
        "3 bf16)", choices=(0, 1, 2, 3, 4)))
    # passes/precision.py: norm statistics and rotary angles stay float32; float graph I/O (KV cache, logits)
    # takes the dtype
    dtype: str = field(default="float32", metadata=opt(
        "precision of the compiled model's activations, float weights, scales and float inputs/outputs (the KV "
        "cache too: half the bytes at float16); norm statistics and rotary angles stay float32. bfloat16: "
        "ONNX Runtime's CPU provider has no kernels for it, so it is validated on CUDA only (--device cuda)",
        choices=DTYPES))
    package: str = field(default="onnx", metadata=opt(
        "onnx: the model file (-o OUT.onnx); genai: a folder that onnxruntime-genai's generator loads as it is "
        "(-o DIR: model.onnx, genai_config.json, tokenizer files; causal LMs with a KV cache)",
        choices=("onnx", "genai")))
    validate: bool = field(default=True, metadata=opt("skip running the result against the original"))
    # validation gate: refuse to write a model whose outputs are non-finite or, when set, whose relative
    # output error on the sample inputs exceeds max_error; force writes it anyway (with a warning)
    max_error: float | None = field(default=None, metadata=opt(
        "refuse to write the model (exit 3) when its relative output error against the original on the "
        "validation inputs exceeds this; non-finite outputs are always refused"))
    force: bool = field(default=False, metadata=opt("write the model even when validation fails"))
    cafeq: CafeqConfig = field(default_factory=CafeqConfig)
    # test hook: apply the method's transforms but keep float weights (exactness checks)
    quantize_weights: bool = field(default=True, metadata=opt(
        "apply the method's transforms but keep float weights (checks that they are exact)",
        flag="--transforms-only"))
    calib: CalibConfig = field(default_factory=CalibConfig)
    # streaming compile: weights stay in their files, sites are planned and rewritten a chunk at a time,
    # results go straight to the output's data file. None: on above STREAM_AUTO_BYTES of fp32 weights
    stream: bool | None = field(default=None, metadata=opt(
        "leave the weights on disk (an .onnx input's external data; a Hugging Face folder's safetensors, "
        "exported without loading them) and compile a chunk at a time; the output gets external data "
        "(default: on above 2 GiB of fp32 weights)", flag=("--stream", "--no-stream")))
    # fp32 weight MB planned together (a coupled unit is never split); None: the method's own default
    # (transform methods hold ~10 float64 copies of a chunk's weights while they learn and round)
    stream_chunk_mb: int | None = field(default=None, metadata=opt(
        "fp32 weight MB planned at once when streaming (default: the method's: rtn 256, cafeq/rotate 16)"))
    # a learned method's streamed compile plans consecutive chunks together (up to 2 units per worker, within
    # this many MB of fp32 weights) so that each of its phases has a task per worker; the compiling process holds
    # about 4x the window's fp32 bytes while it plans (measured on an 8B layer's chunks)
    stream_window_mb: int = field(default=1024, metadata=opt(
        "a streamed compile with workers: fp32 weight MB of consecutive chunks planned side by side (at most 2 "
        "coupled units per worker; the output is the same bytes)"))
    resume: bool = field(default=False, metadata=opt(
        "a streamed compile: keep each finished chunk's plan beside the output (.OUTPUT.chunks/, removed when the "
        "compile succeeds) and reuse the plans an interrupted run of the same command left there"))
    kv_cache: bool = field(default=True, metadata=opt(
        "export a Hugging Face causal LM without its KV cache (inputs input_ids and attention_mask only): a "
        "graph to score text, not to serve tokens"))
    device: str = field(default="auto", metadata=opt(
        "where torch learns and solves and ONNX Runtime validates: auto (CUDA when present), cpu or cuda",
        choices=DEVICES))
    # worker processes for the learners, joint rounding and the calibrated solves (0: the machine's cores, for a
    # model big enough to pay the workers' start); every task runs on one thread, so the plan is the same for any value
    jobs: int = field(default=0, metadata=opt(
        "worker processes for learning, joint rounding and the calibrated solves (0: one per core on models of 1M+ "
        "weights); the result does not depend on it"))
    executor: str = field(default="local", metadata=opt(
        "where the learning, joint-rounding and calibrated-solve tasks run: local (--jobs worker processes here) or "
        "ray (Ray tasks on the cluster at --ray-address, or on a Ray instance started here with --jobs CPUs); same "
        "output",
        choices=EXECUTORS))
    ray_address: str = field(default="", metadata=opt(
        "--executor ray: the cluster to join (auto, or ray://HEAD:10001); empty: start a local Ray instance"))
    seed: int = field(default=0, metadata=opt(
        "seed of the learners' random starts and subsets, rotate's rotations and the calibration windows"))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise _bad(CompileConfig, "method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.format not in FORMATS:
            raise _bad(CompileConfig, "format", f"must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise _bad(CompileConfig, "accuracy_level", f"must be 0..4, got {self.accuracy_level}")
        if self.dtype not in DTYPES:
            raise _bad(CompileConfig, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype == "bfloat16" and self.validate and self.device != "cuda":
            raise ConfigError("dtype bfloat16 (--dtype bfloat16): ONNX Runtime's CPU provider has no bfloat16 kernels "
                              "(Add, Mul, MatMul, Softmax), so the model cannot be validated on the CPU: use --device "
                              "cuda, --no-validate, or --dtype float16")
        if self.dtype != "float32" and self.stream:
            raise ConfigError(f"dtype {self.dtype} (--dtype) is not supported with a streamed compile (--stream)")
        if self.max_error is not None and not (self.max_error > 0 and math.isfinite(self.max_error)):
            raise _bad(CompileConfig, "max_error", f"must be a positive number, got {self.max_error}")
        if self.max_error is not None and not self.validate:
            raise ConfigError("max_error (--max-error) needs validation: drop --no-validate")
        if self.stream_chunk_mb is not None and self.stream_chunk_mb < 1:
            raise _bad(CompileConfig, "stream_chunk_mb", f"must be >= 1, got {self.stream_chunk_mb}")
        if self.stream_window_mb < 1:
            raise _bad(CompileConfig, "stream_window_mb", f"must be >= 1, got {self.stream_window_mb}")
        if self.device not in DEVICES:
            raise _bad(CompileConfig, "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.package == "genai" and not self.kv_cache:
            raise ConfigError("package genai (--package genai) needs the KV cache: drop --no-kv-cache")
        if self.jobs < 0:
            raise _bad(CompileConfig, "jobs", f"must be >= 0 (0: one per core), got {self.jobs}")
        if self.executor not in EXECUTORS:
            raise _bad(CompileConfig, "executor", f"must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.ray_address and self.executor != "ray":
            raise ConfigError("--ray-address needs --executor ray")
