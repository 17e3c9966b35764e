"""What a benchmark run measures: variants (model, backend, precision, batch) and its settings.

A *variant* is one row of the results table. Rows that share (model, tool, backend, precision)
are served by one worker process (one loaded model); that worker measures each batch size in
its own phase, smallest first, so the peak resident memory of a batch-1 row is read before any
larger batch ran (see orchestrate.py).

``tool`` says who prepared and runs the model: ``pytorch`` (the eager FP32 reference, always a
row), ``edgevl`` (a bundle on edgevl's runtime), or a peer (``ort-quantize-dynamic``, plain ONNX
Runtime quantization of our FP32 ONNX, run on edgevl's loop so only the quantizer differs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from edgevl.errors import ConfigError

REFERENCE_TOOL = "pytorch"
EDGEVL_TOOL = "edgevl"
KNOWN_BACKENDS = ("onnxruntime", "openvino", "tensorrt")


@dataclass(frozen=True)
class Setup:
    """One loaded model in one worker process: everything of a variant but the batch."""

    model: str
    tool: str            # pytorch | edgevl | a peer name
    backend: str         # pytorch | onnxruntime | openvino | tensorrt
    precision: str

    @property
    def key(self) -> str:
        tool = "" if self.tool in (REFERENCE_TOOL, EDGEVL_TOOL) else f"{self.tool}:"
        return f"{self.model}/{tool}{self.backend}/{self.precision}"

    @property
    def is_reference(self) -> bool:
        return self.tool == REFERENCE_TOOL

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Variant:
    setup: Setup
    batch: int

    @property
    def key(self) -> str:
        return f"{self.setup.key}/b{self.batch}"


@dataclass
class Settings:
    """How to measure (shared by every worker, sent to it as JSON)."""

    new_tokens: int = 32                    # fixed answer length: greedy, stop tokens ignored
    prompt: str = "describe the image."
    positions: tuple[int, ...] = (64, 512)  # decode speed measured with the cache filled this far
    position_steps: int = 16                # decode steps timed per position and round
    rounds: int = 5                         # every worker measures once per round, interleaved
    budget_s: float = 600.0                 # measuring time for the whole run (not builds or loads)
    generate_batches: tuple[int, ...] = (1,)  # batches at which TTFT/decode/e2e are measured
    threads: int | None = None              # None: all usable cores
    accuracy_scenes: int = 200              # held-out scenes for edgevl-tiny accuracy (0: skip)
    overhead_pairs: int = 20                # edgevl vs bare-session vision calls, alternated
    pause_s: float = 0.1                    # between workers: ORT's spinning threads go quiet (MEASURED.md 2)
    warmup: int = 2                         # untimed calls of each kind in a worker's first round
    spread_limit: float = 0.25

    def to_dict(self) -> dict:
        d = asdict(self)
        d["positions"] = list(self.positions)
        d["generate_batches"] = list(self.generate_batches)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        d = dict(d)
        d["positions"] = tuple(d.get("positions", (64, 512)))
        d["generate_batches"] = tuple(d.get("generate_batches", (1,)))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Plan:
    """Everything a run will do: setups, batch sizes, settings."""

    setups: list[Setup]
    batches: tuple[int, ...]
    settings: Settings = field(default_factory=Settings)

    @property
    def variants(self) -> list[Variant]:
        return [Variant(e, b) for e in self.setups for b in self.batches]

    def models(self) -> list[str]:
        return list(dict.fromkeys(e.model for e in self.setups))


def parse_list(text: str | None, what: str) -> list[str]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise ConfigError(f"--{what} is empty; give a comma-separated list")
    return list(dict.fromkeys(items))


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = sorted({int(b) for b in parse_list(text, "batch")})
    except ValueError as e:
        raise ConfigError(f"--batch must be comma-separated positive integers, got {text!r}") from e
    if batches[0] < 1:
        raise ConfigError(f"--batch sizes must be >= 1, got {text!r}")
    return tuple(batches)


def plan_setups(models: list[str], targets: list[str], precisions: list[str],
                 peers: list[str] | None = None) -> list[Setup]:
    """PyTorch eager FP32 first for each model (the reference every ratio is taken against),
    then every (target, precision), then peers. A precision written ``int8@edgevl-tiny`` applies
    to that model only (e.g. to skip INT8 builds of a large model)."""
    unknown = [t for t in targets if t not in KNOWN_BACKENDS]
    if unknown:
        raise ConfigError(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(KNOWN_BACKENDS)}")
    setups = []
    for model in models:
        setups.append(Setup(model, REFERENCE_TOOL, "pytorch", "fp32"))
        for target in targets:
            for precision in precisions:
                name, _, only = precision.partition("@")
                if not only or only == model:
                    setups.append(Setup(model, EDGEVL_TOOL, target, name))
        for peer in peers or []:
            from edgevl.benchmarks.peers import peer_setup

            setups.append(peer_setup(peer, model))
    return setups


def with_settings(plan: Plan, **changes) -> Plan:
    return Plan(plan.setups, plan.batches, replace(plan.settings, **changes))
