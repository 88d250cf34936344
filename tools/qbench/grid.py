"""What the bench runs: settings, methods (ours and the peers') and which setting each method supports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    bits: int
    block: int
    sym: bool

    @property
    def key(self) -> str:
        return f"w{self.bits}-b{self.block}-{'sym' if self.sym else 'asym'}"

    @property
    def label(self) -> str:
        return f"{self.bits}-bit block {self.block} {'sym' if self.sym else 'asym'}"

    @classmethod
    def parse(cls, key: str) -> Setting:
        try:
            w, b, s = key.split("-")
            if not (w[0] == "w" and b[0] == "b" and s in ("sym", "asym")):
                raise ValueError
            return cls(int(w[1:]), int(b[1:]), s == "sym")
        except ValueError:
            raise ValueError(f"bad setting {key!r}: expected like w4-b128-sym") from None


# the grid, plus 4-bit block 32 sym: the one scheme the onnxsim quantizers write
SETTINGS = tuple(Setting.parse(k) for k in (
    "w4-b32-asym", "w4-b32-sym", "w4-b128-sym", "w4-b128-asym", "w3-b128-sym", "w3-b128-asym",
    "w2-b32-asym", "w8-b128-asym"))

# the real models of the committed page and their kind (encoder: embedding fidelity; lm: perplexity)
MODELS = {"minilm": "encoder", "smollm2": "lm", "gemma3": "lm"}
# what a reader must know to read a model's tables, printed under its heading
MODEL_NOTES = {
    "smollm2": "SmolLM2's only offline copy is a Q4_1 GGUF file dequantized to fp32 (DATA.md): every weight "
               "already lies on an asymmetric 4-bit grid of 32-wide blocks along K whose offset is a float. "
               "ORT's HQQ writes float zero points, so at 4-bit block 32 asym it can land on that grid and "
               "come out near fp32; integer zero points (ours, ORT DEFAULT, k_quant) cannot. Compare methods "
               "at 3 bits and symmetric grids. Float zero points also take MatMulNBits off its fast CPU path "
               "(ort-hqq's latency)",
    "gemma3": "Gemma 3 270M (base) ships only as a Q4_K_M GGUF file dequantized to fp32: q, k, gate and up lie on "
              "5-bit grids of 32-wide blocks (Q5_0), o and half of down on 4-bit K-quant grids (Q4_K), the rest "
              "on 6- and 8-bit ones, none the grids compared here. 4 query heads share one KV head of 256; a "
              "262k-token vocabulary makes its embedding 0.67 GB of the 1.07 GB, kept float (our rows also "
              "keep the head tied to it float). Perplexity windows begin with its BOS token",
}
# how much dearer a row is than on MiniLM (SmolLM2: 4x the weights, 4x the calibration tokens)
MODEL_SCALE = {"smollm2": 8, "gemma3": 8}

# the rows that are not a weight-quantization setting: the float model, and ORT's stock int8 quantizer
REFERENCE = "reference"


@dataclass(frozen=True)
class Method:
    name: str
    owner: str  # ours | onnxruntime | onnxsim
    summary: str
    bits: tuple[int, ...] = (2, 3, 4, 8)
    blocks: tuple[int, ...] | None = None  # None: any
    sym: tuple[bool, ...] = (False, True)
    calibrated: bool = False
    cost: int = 15  # rough seconds of a MiniLM row: the run order (cheap rows first fill every table early)
    note: str = ""  # a known limitation of the tool, printed under the page's method table

    def unsupported(self, s: Setting) -> str | None:
        """Why this method does not run at ``s``, or None when it does."""
        if s.bits not in self.bits:
            return f"no {s.bits}-bit mode"
        if self.blocks is not None and s.block not in self.blocks:
            return f"block {s.block} not supported (only {', '.join(map(str, self.blocks))})"
        if s.sym not in self.sym:
            return "no symmetric mode" if s.sym else "no asymmetric mode"
        return None


# a peers' bug, in ``make_matmul_weight_only_node`` (Intel Neural Compressor's code, vendored in ONNX Runtime)
_ODD_BLOCKS = ("ONNX Runtime 1.31 packs 4-bit zero points as one run over all rows, not row by row, so it "
               "fails (`cannot reshape array`) wherever it writes zero points and a row has an odd number of "
               "blocks (K = 384 or 576 at block 128)")

METHODS: tuple[Method, ...] = (
    Method("rtn", "ours", "round to nearest"),
    Method("rotate", "ours", "random block rotations (the transforms' baseline)", cost=20),
    Method("sinq", "ours", "SINQ: Sinkhorn-balanced groups, scales folded into the model (no online op)", cost=10),
    Method("cafeq-transforms", "ours", "CafeQ learned transforms, plain rounding", cost=100),
    Method("cafeq", "ours", "CafeQ transforms + joint rounding of coupled pairs", cost=200),
    Method("gptq", "ours", "GPTQ", calibrated=True, cost=80),
    Method("gptaq", "ours", "GPTAQ", calibrated=True, cost=90),
    Method("cafeq+gptaq", "ours", "CafeQ transforms, GPTAQ rounding", calibrated=True, cost=600),
    Method("ort-default", "onnxruntime", "MatMulNBitsQuantizer DEFAULT (RTN)", bits=(2, 4, 8), cost=20),
    Method("ort-hqq", "onnxruntime", "MatMulNBitsQuantizer HQQ", bits=(2, 4, 8), sym=(False,), cost=30),
    Method("ort-kquant", "onnxruntime", "MatMulNBitsQuantizer k_quant", bits=(4,), cost=30,
           note=_ODD_BLOCKS + " (k_quant always writes them)"),
    Method("ort-gptq", "onnxruntime", "MatMulNBitsQuantizer GPTQ", bits=(4,), calibrated=True, cost=200,
           note=_ODD_BLOCKS + " (GPTQ writes them when asymmetric)"),
    Method("onnxsim-int4", "onnxsim", "quantize_weight_only_int4 (RTN; int4 DequantizeLinear, opset 21)",
           bits=(4,), blocks=(32,), sym=(True,), cost=30),
    Method("onnxsim-hqq", "onnxsim",
           "quantize_weight_only_int4_hqq (writes the dequantized weights back as float32: no smaller file)",
           bits=(4,), blocks=(32,), sym=(False,), cost=30),
    Method("onnxsim-quarot", "onnxsim", "apply_quarot_fused (W4A4: activations quantized too)", bits=(4,),
           sym=(True,), cost=30),
    Method("onnxsim-gptq", "onnxsim", "apply_gptq on quantize_weight_only_int4", bits=(4,), blocks=(32,),
           sym=(True,), calibrated=True, cost=150),
    Method("onnxsim-gptaq", "onnxsim", "apply_gptaq on quantize_weight_only_int4", bits=(4,), blocks=(32,),
           sym=(True,), calibrated=True, cost=250),
    Method("onnxsim-awq", "onnxsim", "apply_awq on quantize_weight_only_int4", bits=(4,), blocks=(32,),
           sym=(True,), calibrated=True, cost=250),
)
REFERENCE_METHODS: tuple[Method, ...] = (
    Method("fp32", "ours", "the float model", bits=()),
    Method("ort-int8-dynamic", "onnxruntime", "quantize_dynamic int8 (weights and activations)", bits=()),
)
BY_NAME = {m.name: m for m in METHODS + REFERENCE_METHODS}


@dataclass(frozen=True)
class RowSpec:
    model: str
    setting: str  # a Setting key or REFERENCE
    method: str

    @property
    def key(self) -> str:
        return f"{self.model}/{self.setting}/{self.method}"


def plan_rows(models: list[str], settings: list[Setting], methods: list[str]) -> list[RowSpec]:
    """Every supported (model, setting, method): references first, then by estimated time.

    Cheap rows of every model come before dear ones, so that a long run fills every table early
    and an interrupted one has the cheap rows of every model.
    """
    for name in methods:
        if name not in BY_NAME:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(BY_NAME)}")
    refs = {m.name for m in REFERENCE_METHODS}
    rows = [RowSpec(model, REFERENCE, m.name) for model in models for m in REFERENCE_METHODS if m.name in methods]
    chosen = [BY_NAME[n] for n in dict.fromkeys(methods) if n not in refs]
    timed = [(m.cost * MODEL_SCALE.get(model, 1), mi, i, RowSpec(model, s.key, m.name))
             for mi, model in enumerate(models) for i, m in enumerate(chosen) for s in settings
             if m.unsupported(s) is None]
    return rows + [r for *_, r in sorted(timed, key=lambda t: t[:3])]


def full_plan(models: tuple[str, ...] = tuple(MODELS)) -> list[RowSpec]:
    """The whole grid of the committed results page: every model, setting and method."""
    return plan_rows(list(models), list(SETTINGS), [m.name for m in REFERENCE_METHODS + METHODS])
