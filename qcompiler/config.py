"""Typed, frozen configuration of a compile. Validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qcompiler.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
STREAM_AUTO_BYTES = 2 * 1024**3  # external data above this: stream unless told otherwise
STREAM_CHUNK_MB = {"rtn": 256, "rotate": 16, "cafeq": 16}  # default chunk per method (streaming)
PER_CHANNEL = 0  # group_size value meaning "one group spans all of K"
FORMATS = ("matmulnbits", "qdq")
METHODS = ("rtn", "cafeq", "rotate", "gptq", "gptaq", "cafeq+gptaq")
CALIBRATED_METHODS = ("gptq", "gptaq", "cafeq+gptaq")
TRANSFORMS = ("single", "vo", "updown")
JOINT_PAIRS = ("vo", "updown")
ONLINE_REGIMES = ("batch", "token")  # what --online-budget is a fraction of (methods/online_cost.py)
# how the online x T^-1 is written (passes/online_transform.py); auto: conv for causal LMs, else matmul
ONLINE_LAYOUTS = ("auto", "matmul", "conv")


@dataclass(frozen=True)
class QuantConfig:
    """What grid each weight gets. ``group_size`` 0 means per output channel."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        g = self.group_size
        if g != PER_CHANNEL and (g < 16 or g > 256 or g & (g - 1)):
            raise ConfigError(
                f"--group-size must be a power of two in 16..256 or 'channel', got {g}"
            )

    @property
    def per_channel(self) -> bool:
        return self.group_size == PER_CHANNEL

    def describe(self) -> str:
        grp = "per-channel" if self.per_channel else f"block {self.group_size}"
        return f"{self.bits}-bit {grp} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class MatchConfig:
    """Which weights the matcher offers for quantization. Embedding tables are quantized along the
    hidden axis and dequantized by a standard DequantizeLinear before the Gather (whole-table
    dequantization on every run: smaller files, not faster ones)."""

    quantize_lm_head: bool = False
    quantize_embeddings: bool = False


@dataclass(frozen=True)
class CafeqConfig:
    """CafeQ's transforms (and the ``rotate`` baseline's): which kinds, and how they are learned."""

    transforms: tuple[str, ...] = TRANSFORMS
    block_size: int = 64  # b of the block-diagonal single-matrix transforms (online cost ~ b/N)
    loss: str = "ste"  # ste (straight-through Frobenius) | lse (LogSumExp smooth range)
    optimizer: str = "adam"  # adam (+ orthonormality penalty) | cayley (orthogonal)
    steps: int = 400
    patience: int = 100  # a learner stops once its best error has not fallen by 0.01% in this many steps
    lr: float = 2e-2
    ortho_reg: float = 0.0
    temperature: float = 20.0
    init: str = "identity"  # identity | orthogonal | hadamard (rotate: orthogonal unless hadamard)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda: where torch learns
    # the most the online x T^-1 ops may add to run time (a fraction), by methods/online_cost.py's model
    # of the regime: batch (arithmetic; prefill, encoders) or token (a decoder's batch-1 token step, where
    # each op's fixed cost counts: SmolLM2 keeps 23 of its 60 groups' ops); cheapest first
    online_budget: float = 0.03
    online_regime: str = "batch"  # one of ONLINE_REGIMES
    # the ops' layout, one of ONLINE_LAYOUTS: matmul (batched MatMul; fastest for encoders and prefill) or conv
    # (grouped 1x1 Conv; fastest at a decoder's batch-1 token step); auto picks conv for causal LMs
    online_layout: str = "auto"
    column_batch: int = 1024  # wide groups learn on this many random columns per step
    # worker processes for the learners and joint rounding (0: the machine's cores, for a model big
    # enough to pay the workers' start); every task runs on one thread, so the plan is the same for any value
    jobs: int = 0
    # joint rounding of coupled pairs after the transforms (cafeq only): which pair kinds, how many
    # alternations (one round = producer's step, then consumer's)
    joint_pairs: tuple[str, ...] = JOINT_PAIRS
    joint_rounds: int = 4  # V·O pairs
    joint_mlp_rounds: int = 2  # up·down pairs (wide: each round costs ~10x a V·O round)
    # MLP pairs: weight of each channel's own product error (the activation between the factors);
    # MiniLM 3-bit fidelity (1 - cos, MLP pairs only): 0.1083 without, 0.1049 at 1, 0.0846 at 4
    joint_channel_weight: float = 4.0
    # a pair whose joint rounding would need more memory than this is rounded plainly (with a warning):
    # MLP pairs cost ~26 x C^2 float64 (C = intermediate width): 0.5 GB for C = 1536, 7 GB for 5632
    joint_max_gb: float = 4.0

    def __post_init__(self) -> None:
        bad = [t for t in self.transforms if t not in TRANSFORMS]
        if bad:
            raise ConfigError(f"--transforms takes a subset of {','.join(TRANSFORMS)}, got {','.join(bad)}")
        if self.block_size < 2 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two >= 2, got {self.block_size}")
        if self.loss not in ("ste", "lse"):
            raise ConfigError(f"--pseudo-loss must be ste or lse, got {self.loss!r}")
        if self.optimizer not in ("adam", "cayley"):
            raise ConfigError(f"--optimizer must be adam or cayley, got {self.optimizer!r}")
        if self.init not in ("identity", "orthogonal", "hadamard"):
            raise ConfigError(f"--init must be identity, orthogonal or hadamard, got {self.init!r}")
        if self.jobs < 0:
            raise ConfigError(f"--jobs must be >= 0 (0: one per core), got {self.jobs}")
        if self.steps < 0 or self.patience < 0 or not self.lr > 0 or self.ortho_reg < 0:
            raise ConfigError("--steps and --patience must be >= 0, --lr > 0 and --ortho-reg >= 0")
        if not 0 <= self.online_budget <= 1:
            raise ConfigError(f"--online-budget must be in [0, 1], got {self.online_budget}")
        if self.online_regime not in ONLINE_REGIMES:
            raise ConfigError(f"--online-regime must be one of {', '.join(ONLINE_REGIMES)}, got "
                              f"{self.online_regime!r}")
        if self.online_layout not in ONLINE_LAYOUTS:
            raise ConfigError(f"--online-layout must be one of {', '.join(ONLINE_LAYOUTS)}, got "
                              f"{self.online_layout!r}")
        bad = [t for t in self.joint_pairs if t not in JOINT_PAIRS]
        if bad:
            raise ConfigError(f"--joint-pairs takes a subset of {','.join(JOINT_PAIRS)}, got {','.join(bad)}")
        if not (0 <= self.joint_rounds <= 50 and 0 <= self.joint_mlp_rounds <= 50):
            raise ConfigError(f"--joint-rounds and --joint-mlp-rounds must be in 0..50, got {self.joint_rounds}, "
                              f"{self.joint_mlp_rounds}")
        if not self.joint_max_gb > 0:
            raise ConfigError(f"--joint-max-gb must be > 0, got {self.joint_max_gb}")
        if not self.joint_channel_weight >= 0:
            raise ConfigError(f"--joint-channel-weight must be >= 0, got {self.joint_channel_weight}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data and the GPTQ/GPTAQ solver (methods gptq, gptaq, cafeq+gptaq).

    Defaults are smaller than the papers' 128 x 2048 tokens: 64 x 512 fits this project's 2-core
    machines (SmolLM2-135M in minutes)."""

    source: str | None = None  # text file (.txt/.gz/.rst...) or .npy of token ids; None: Python's docs
    tokenizer: str | None = None  # tokenizer folder, for a bare .onnx input
    samples: int = 64  # calibration sequences
    seqlen: int = 512  # tokens per sequence
    holdout: int = 0  # extra sequences, not used to fit: per-site ||X W_hat - X~ W|| is measured on them
    batch: int = 8  # sequences per ONNX Runtime run
    percdamp: float = 0.01
    act_order: bool = False
    alpha: float = 0.25  # GPTAQ's asymmetric term (the official code's default)
    block: int = 128  # lazy-batch rows of the solver
    seed: int = 0  # which windows of the text are drawn
    # attention V projections: round each KV head's columns against the error the attention output sees,
    # ||A X dW|| (A the attention weights), not ||X dW||: attention sinks make a few tokens' values count
    # far more than their share of X (README, "Calibrated methods")
    attention_values: bool = True

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 2 or self.holdout < 0 or self.batch < 1:
            raise ConfigError("--calib-samples >= 1, --calib-seqlen >= 2, --calib-holdout >= 0 and "
                              "--calib-batch >= 1 are required")
        if not 0 <= self.percdamp <= 1:
            raise ConfigError(f"--percdamp must be in [0, 1], got {self.percdamp}")
        if not self.alpha >= 0:
            raise ConfigError(f"--alpha must be >= 0, got {self.alpha}")
        if self.block < 1:
            raise ConfigError(f"--gptq-block must be >= 1, got {self.block}")


@dataclass(frozen=True)
class CompileConfig:
    quant: QuantConfig = field(default_factory=QuantConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    method: str = "rtn"
    format: str = "matmulnbits"
    # MatMulNBits accuracy_level written on every node: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8.
    accuracy_level: int = 1
    validate: bool = True
    # validation gate: refuse to write a model whose outputs are non-finite or, when set, whose relative
    # output error on the sample inputs exceeds max_error; force writes it anyway (with a warning)
    max_error: float | None = None
    force: bool = False
    cafeq: CafeqConfig = field(default_factory=CafeqConfig)
    # test hook: apply the method's transforms but keep float weights (exactness checks)
    quantize_weights: bool = True
    calib: CalibConfig = field(default_factory=CalibConfig)
    # streaming compile (ONNX inputs with external data): weights stay in their files, sites are planned
    # and rewritten a chunk at a time, results go straight to the output's data file. None: on when the
    # input keeps more than STREAM_AUTO_BYTES in external data
    stream: bool | None = None
    # fp32 weight MB planned together (a coupled unit is never split); None: STREAM_CHUNK_MB by method
    # (transform methods hold ~10 float64 copies of a chunk's weights while they learn and round)
    stream_chunk_mb: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"--accuracy-level must be 0..4, got {self.accuracy_level}")
        if self.max_error is not None and not (self.max_error > 0 and math.isfinite(self.max_error)):
            raise ConfigError(f"--max-error must be a positive number, got {self.max_error}")
        if self.max_error is not None and not self.validate:
            raise ConfigError("--max-error needs validation: drop --no-validate")
        if self.stream_chunk_mb is not None and self.stream_chunk_mb < 1:
            raise ConfigError(f"--stream-chunk-mb must be >= 1, got {self.stream_chunk_mb}")
        if self.stream:
            self.check_streamable()

    @property
    def chunk_mb(self) -> int:
        return self.stream_chunk_mb or STREAM_CHUNK_MB.get(self.method, 64)

    def check_streamable(self) -> None:
        """Raise ConfigError for what a streaming compile cannot do."""
        if self.method in CALIBRATED_METHODS:
            raise ConfigError(f"--method {self.method} runs the whole model on calibration data: a streaming "
                              f"compile supports rtn, rotate and cafeq")

