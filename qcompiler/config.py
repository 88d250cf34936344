"""Typed, frozen configuration of a compile. Validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from qcompiler.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
PER_CHANNEL = 0  # group_size value meaning "one group spans all of K"
FORMATS = ("matmulnbits", "qdq")
METHODS = ("rtn",)


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
class CompileConfig:
    quant: QuantConfig = field(default_factory=QuantConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    method: str = "rtn"
    format: str = "matmulnbits"
    # MatMulNBits accuracy_level written on every node: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8.
    accuracy_level: int = 1
    validate: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"--accuracy-level must be 0..4, got {self.accuracy_level}")
