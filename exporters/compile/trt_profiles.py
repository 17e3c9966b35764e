"""TensorRT optimization profiles from a bundle manifest (pure: no tensorrt, no onnx).

Every dynamic axis of a part's inputs is named in the manifest (``batch``, ``seq``,
``capacity``); a profile gives each input a (min, opt, max) shape by looking its axis names up
in ranges set from flags with defaults taken from the manifest:

- batch:    1 .. --max-batch (8: the scheduler's and batcher's default), opt --opt-batch (1)
- seq:      1 .. --max-seq (the context, capped at 1024), opt --opt-seq (one image block
            plus 32 text tokens: a typical single-image prompt)
- capacity: 1 .. --max-capacity (the context), opt --opt-capacity (the power-of-two cache the
            runtime allocates for that prompt and its answer)
- any other axis name: ``--dim NAME=MIN:OPT:MAX`` (also overrides the three above).

The decoder gets two profiles by default ("split"): **prefill** (seq 1..max, opt = a prompt)
and **decode** (seq exactly 1, opt batch = --opt-batch). TensorRT chooses kernels at the opt
shape; a decode step is a batch of matrix-vector products (bandwidth-bound) and a prefill is a
real matrix multiply (compute-bound), so one profile tuned for either runs the other with the
wrong tactics. The cost is a larger engine (tactics per profile; weights are shared) and a
cheap asynchronous profile switch when the runner alternates. ``--decoder-profiles single``
builds one profile (seq 1..max, opt 1: decode dominates the step count) for the smallest
engine. Vision and embed get one profile each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgevl.errors import ConfigError

KNOWN_AXES = ("batch", "seq", "capacity")


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int

    def check(self, name: str) -> "AxisRange":
        if not (1 <= self.min <= self.opt <= self.max):
            raise ConfigError(f"axis {name!r}: need 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")
        return self

    @classmethod
    def parse(cls, text: str) -> tuple[str, "AxisRange"]:
        """``"seq=1:64:512"`` -> ("seq", AxisRange(1, 64, 512))."""
        try:
            name, spec = text.split("=", 1)
            lo, opt, hi = (int(v) for v in spec.split(":"))
        except ValueError:
            raise ConfigError(f"--dim {text!r}: expected NAME=MIN:OPT:MAX, e.g. seq=1:64:512") from None
        return name.strip(), cls(lo, opt, hi).check(name.strip())


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict            # input name -> (min shape, opt shape, max shape), tuples of ints

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


@dataclass
class ProfileOptions:
    max_batch: int = 8
    opt_batch: int = 1
    max_seq: int | None = None
    opt_seq: int | None = None
    max_capacity: int | None = None
    opt_capacity: int | None = None
    decoder_profiles: str = "split"           # "split" (prefill + decode) or "single"
    dims: dict = field(default_factory=dict)  # axis name -> AxisRange (--dim)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def axis_ranges(manifest: dict, opts: ProfileOptions) -> dict[str, AxisRange]:
    """The general (min, opt, max) of each named axis, defaults filled from the manifest."""
    context = int(manifest["decoder"]["max_position"])
    image_tokens = int(manifest.get("prompt", {}).get("image_seq_len", 0))
    max_seq = opts.max_seq or min(context, 1024)
    opt_seq = opts.opt_seq or min(max_seq, image_tokens + 32)
    max_cap = opts.max_capacity or context
    opt_cap = opts.opt_capacity or min(max_cap, max(64, _pow2_at_least(opt_seq + 64)))
    for flag, value in (("--max-seq", max_seq), ("--max-capacity", max_cap)):
        if value > context:
            raise ConfigError(f"{flag} {value} exceeds the model's context of {context} positions")
    ranges = {
        "batch": AxisRange(1, opts.opt_batch, opts.max_batch).check("batch (--opt-batch/--max-batch)"),
        "seq": AxisRange(1, opt_seq, max_seq).check("seq (--opt-seq/--max-seq)"),
        "capacity": AxisRange(1, opt_cap, max_cap).check("capacity (--opt-capacity/--max-capacity)"),
    }
    ranges.update({k: v.check(k) for k, v in opts.dims.items()})
    return ranges


def _shape_triple(part: str, tensor: dict, ranges: dict[str, AxisRange]) -> tuple:
    lo, opt, hi = [], [], []
    for axis, dim in enumerate(tensor["shape"]):
        if isinstance(dim, int) and dim > 0:
            lo.append(dim), opt.append(dim), hi.append(dim)
            continue
        name = str(dim) if dim else f"{tensor['name']}_dim{axis}"
        r = ranges.get(name)
        if r is None:
            raise ConfigError(f"part {part!r} input {tensor['name']!r} axis {axis} is dynamic ({name!r}) and edgevl "
                              f"has no default for it (it knows {', '.join(KNOWN_AXES)}); pass "
                              f"--dim {name}=MIN:OPT:MAX")
        lo.append(r.min), opt.append(r.opt), hi.append(r.max)
    return tuple(lo), tuple(opt), tuple(hi)


def _profile(part: str, name: str, inputs: list[dict], ranges: dict[str, AxisRange]) -> Profile:
    return Profile(name, {t["name"]: _shape_triple(part, t, ranges) for t in inputs})


def part_profiles(part: str, spec: dict, ranges: dict[str, AxisRange], decoder_profiles: str = "split") -> list[Profile]:
    inputs = spec["inputs"]
    dynamic = [t for t in inputs if any(not (isinstance(d, int) and d > 0) for d in t["shape"])]
    if not dynamic:
        return []                         # static shapes: TensorRT needs no profile
    has_cache = any(t["name"].startswith("past_key") for t in inputs)
    if part != "decoder" or not has_cache:
        return [_profile(part, "default", inputs, ranges)]
    seq, batch = ranges["seq"], ranges["batch"]
    if decoder_profiles == "single":
        return [_profile(part, "default", inputs, dict(ranges, seq=AxisRange(1, 1, seq.max)))]
    if decoder_profiles != "split":
        raise ConfigError(f"--decoder-profiles must be 'split' or 'single', got {decoder_profiles!r}")
    prefill = dict(ranges, batch=AxisRange(1, 1, batch.max))          # the runtime prefills one sequence at a time
    decode = dict(ranges, seq=AxisRange(1, 1, 1))
    return [_profile(part, "prefill", inputs, prefill), _profile(part, "decode", inputs, decode)]


def compute_profiles(manifest: dict, opts: ProfileOptions | None = None,
                     parts: list[str] | None = None) -> dict[str, list[Profile]]:
    """Profiles for each part of a bundle manifest (or the named ``parts``)."""
    opts = opts or ProfileOptions()
    ranges = axis_ranges(manifest, opts)
    wanted = parts or list(manifest["parts"])
    unknown = sorted(set(wanted) - set(manifest["parts"]))
    if unknown:
        raise ConfigError(f"bundle has no part(s) {unknown}; it has {sorted(manifest['parts'])}")
    return {p: part_profiles(p, manifest["parts"][p], ranges, opts.decoder_profiles) for p in wanted}
