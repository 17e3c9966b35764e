"""Quantization recipes: typed, frozen dataclasses, validated before any work starts.

A recipe is everything that decides the numbers of a quantized bundle; it is written into the
manifest's ``quantization`` field verbatim, so a bundle says how it was made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edgevl.errors import ConfigError

METHODS = ("minmax", "entropy", "percentile")
QUANTIZABLE_PARTS = ("vision", "decoder")          # the embed part is a table lookup: it stays float
EVAL_BACKENDS = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class FloatRule:
    """Which nodes stay in float, by rule (see float_rules.py for the reasons).

    ``lm_head``: "auto" quantizes the LM head only if that keeps greedy top-1 agreement of the
    decoder's logits within ``lm_head_tolerance`` on held-out feeds; "float" always keeps it;
    "int8" always quantizes it. ``extra_float`` are fnmatch patterns of node names to keep float.
    """

    lm_head: str = "auto"
    lm_head_tolerance: float = 0.01
    decoder_attention: str = "float"     # "float" or "int8": the decoder's activation x activation MatMuls
    extra_float: tuple[str, ...] = ()

    def validate(self) -> "FloatRule":
        if self.lm_head not in ("auto", "float", "int8"):
            raise ConfigError(f"lm_head rule must be 'auto', 'float' or 'int8', got {self.lm_head!r}")
        if self.decoder_attention not in ("float", "int8"):
            raise ConfigError(f"decoder_attention must be 'float' or 'int8', got {self.decoder_attention!r}")
        if not 0 <= self.lm_head_tolerance <= 1:
            raise ConfigError(f"lm_head_tolerance is a fraction in [0, 1], got {self.lm_head_tolerance}")
        return self


@dataclass(frozen=True)
class PTQRecipe:
    """Static INT8 post-training quantization to Q/DQ ONNX (ONNX Runtime's quantize_static).

    Weights: per-channel symmetric int8. Activations: per-tensor, symmetric int8 by default
    (zero point 0, the form TensorRT's explicit quantization requires, so one bundle serves
    every backend), or asymmetric uint8 (``activations``, see below).
    ``reduce_range`` stores weights in 7 bits: x86 CPUs without VNNI (this Skylake-SP, older
    edge boxes) run ONNX Runtime's u8s8/s8s8 kernels through vpmaddubsw, whose int16
    intermediate saturates with full 8-bit weights; measured on edgevl-tiny's vision part the
    integer kernels then drifted 3.5% (relative L2) from the Q/DQ simulation, and the end
    result was worse than with 7-bit weights (2.2% vs 3.6% error vs FP32). Turn it off only for
    bundles that will run on VNNI/ARM/GPU targets alone.
    """

    # percentile by default: on edgevl-tiny's decoder (placeholder checkpoint, 8 held-out prompts)
    # entropy's KL clipping of the linear layers' inputs cut outlier channels that carry signal:
    # logits cosine vs FP32 0.9936 / top-1 0.90, against 0.9998 / 1.00 for percentile and min-max
    method: str = "percentile"
    samples: int = 64                   # calibration images
    decoder_prompts: int = 32           # prompts (one image each) run to collect decoder feeds
    decode_steps: int = 4               # decode steps recorded after each prefill
    parts: tuple[str, ...] = QUANTIZABLE_PARTS
    # "int8": symmetric int8, zero point 0: what TensorRT's explicit quantization requires, and
    # ARM's preference. "uint8": asymmetric, ONNX Runtime's choice for x86: its S8->U8 rewrite
    # needs a QuantizeLinear with one consumer, and its optimizer merges the per-consumer ones
    # (q/k/v projections of one norm), so with int8 those MatMuls stayed float (SmolVLM-shaped
    # vision on this Skylake-SP: 36 of 97 MatMuls unfused, INT8 1.07x ORT FP32; uint8: all 85
    # weight MatMuls fused, 1.23x). `edgevl build --target onnxruntime` picks uint8.
    activations: str = "int8"
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    per_channel: bool = True
    reduce_range: bool = True
    percentile: float = 99.999
    entropy_bins: int = 2048
    float_rule: FloatRule = field(default_factory=FloatRule)
    budget_points: float = 1.0          # allowed accuracy loss (points) on every evaluated backend
    budget_metric: str = "auto"         # "accuracy" (task exact match), "agreement" (answers identical to
                                        # FP32's), "auto": accuracy for edgevl-tiny, agreement otherwise
    accept_loss: bool = False           # write the bundle even when the budget is broken
    eval_scenes: int = 200              # held-out scenes for the budget (5 questions each)
    eval_split: str = "val"             # budget scenes: validation, so the test split stays untuned
    eval_backends: tuple[str, ...] = EVAL_BACKENDS   # the installed ones among these are used
    sensitivity: bool = True            # keep the worst nodes float until the budget holds
    max_float_nodes: int = 8            # at most this many nodes moved to float by the pass
    seed: int = 0

    def validate(self) -> "PTQRecipe":
        if self.method not in METHODS:
            raise ConfigError(f"unknown calibration method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}")
        bad = [p for p in self.parts if p not in QUANTIZABLE_PARTS]
        if bad or not self.parts:
            raise ConfigError(f"parts {bad or '(none)'} cannot be INT8-quantized; choose from {QUANTIZABLE_PARTS} "
                              "(the embed part is a lookup table and stays float)")
        if self.activations not in ("int8", "uint8"):
            raise ConfigError(f"activations must be 'int8' (symmetric; TensorRT, ARM) or 'uint8' (ONNX Runtime on x86), "
                              f"got {self.activations!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.budget_points < 0:
            raise ConfigError(f"--budget is the accuracy loss allowed in points (>= 0), got {self.budget_points}")
        if self.eval_scenes < 1:
            raise ConfigError(f"eval_scenes must be at least 1, got {self.eval_scenes}")
        if self.budget_metric not in ("auto", "accuracy", "agreement"):
            raise ConfigError(f"budget_metric must be auto, accuracy or agreement, got {self.budget_metric!r}")
        if self.eval_split not in ("val", "test"):
            raise ConfigError(f"eval_split must be 'val' or 'test', got {self.eval_split!r}")
        bad = [b for b in self.eval_backends if b not in EVAL_BACKENDS]
        if bad:
            raise ConfigError(f"cannot evaluate on {bad}; choose from {EVAL_BACKENDS}")
        self.float_rule.validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)


ORT_BLOCK_SIZE = 128      # MatMulNBits pads a last partial block, so any input width takes it
SHARED_BLOCK_SIZE = 32    # NNCF's group size must divide every input width (edgevl-tiny: 192)


def weight_only_backends(target: str) -> tuple[str, ...]:
    """The backends a weight-only build for ``target`` writes artefacts for."""
    return EVAL_BACKENDS if target == "openvino" else ("onnxruntime",)


def default_block_size(backends) -> int:
    """Weight-only block size when none is given: 128 for ONNX Runtime-only bundles (fewer scales
    to apply: on the SmolVLM-256M-shaped decoder, ONNX Runtime INT4 108 vs 93 tokens/s and INT8
    82 vs 75 against blocks of 32 in one run, edgevl 0.1.0,
    benchmarks/results/quant_speed_smolvlm_256m_shaped_v0.1.0_blocks.json), 32
    when OpenVINO's NNCF compresses the same decoder too."""
    return ORT_BLOCK_SIZE if tuple(backends) == ("onnxruntime",) else SHARED_BLOCK_SIZE


@dataclass(frozen=True)
class WeightOnlyRecipe:
    """Block-wise weight-only quantization of the decoder's MatMuls (activations stay float).

    ``int8-wo`` / ``int4-wo``: symmetric, one scale per ``block_size`` input channels (the CLI's
    default comes from ``default_block_size``).
    ``accuracy_level`` is MatMulNBits' compute type on ONNX Runtime: 4 quantizes activations to
    int8 per block and runs integer dot products; None/0 computes in float. Measured on a
    SmolLM2-135M-shaped decoder, ORT 1.31, this Skylake-SP (decode step at position 128,
    loaded machine, same process): 8-bit with float compute ran 10x *slower* than FP32 ORT
    (1046 vs 101 ms/token), 8-bit level 4 ran 1.4x faster (72 ms), 4-bit level 4 1.5x faster
    than 8-bit level 4 (48 ms); logits cosine vs FP32 0.9958 (8-bit, random weights).
    OpenVINO gets an IR compressed by NNCF with the same bits and group size.
    """

    bits: int = 8
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = 4
    include_lm_head: bool = True
    backends: tuple[str, ...] = EVAL_BACKENDS

    @property
    def precision(self) -> str:
        return f"int{self.bits}-wo"

    def validate(self) -> "WeightOnlyRecipe":
        if self.bits not in (4, 8):
            raise ConfigError(f"weight-only bits must be 4 or 8, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level must be 0-4 or None, got {self.accuracy_level}")
        bad = [b for b in self.backends if b not in EVAL_BACKENDS]
        if bad:
            raise ConfigError(f"weight-only artefacts exist for {EVAL_BACKENDS}, not {bad}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QATRecipe:
    """Quantization-aware fine-tuning with NNCF fake quantization, then native Q/DQ export."""

    steps: int = 300
    batch_scenes: int = 8               # images per step, each with its five questions
    lr: float = 5e-5                    # quantizer scales and weights (MEASURED.md item 8)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    calib_samples: int = 32             # images for NNCF's initial range calibration
    decoder_prompts: int = 16
    eval_scenes: int = 200
    eval_split: str = "val"
    eval_backends: tuple[str, ...] = EVAL_BACKENDS
    seed: int = 0
    threads: int | None = None

    def validate(self) -> "QATRecipe":
        if self.steps < 0:
            raise ConfigError(f"--steps must be >= 0, got {self.steps}")
        if self.batch_scenes < 1 or self.calib_samples < 1 or self.decoder_prompts < 1:
            raise ConfigError("batch_scenes, calib_samples and decoder_prompts must be at least 1")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
