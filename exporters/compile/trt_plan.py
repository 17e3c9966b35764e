"""How to ask TensorRT for a precision, per TensorRT version (pure: the version is passed in).

TensorRT 10.x (JetPack 6) has weakly typed networks: the graph stays FP32 and builder flags
let TensorRT pick lower-precision kernels (FP16) or honour Q/DQ nodes as INT8 (INT8, with
FP16 for the layers between them). TensorRT 11.x removed those flags and implicit
calibration: every network is strongly typed, tensors run in the type the graph gives them,
so FP16 needs an FP16 graph (edgevl converts the ONNX, keeping norms/softmax/reductions in
FP32, see fp16.py) and INT8 comes only from Q/DQ nodes.

DLA (Jetson AGX/NX Orin, Xavier) is decided by the DLA core count the builder reports, not by
the version: TensorRT 10.0-10.7 have it on JetPack 6, 10.8+ and 11.0-11.3 have none, 11.4.1
restores it on Jetson AGX Orin with JetPack 7.2.2+ (strongly typed, GPU fallback as in 10.x),
11.5 drops JetPack (NVIDIA's "Working with DLA" and 10.x-to-11.x Jetson migration pages). The
version only words the message. DLA runs FP16 or INT8 and has no dynamic dimensions, so a DLA
part gets one static profile (min = opt = max, see ``static_profiles``).

    plan_build("10.3.0", "fp16")               -> weak typing, flags FP16
    plan_build("11.4.0", "fp16")               -> strong typing, convert the ONNX to FP16
    plan_build("10.3.0", "int8", has_qdq=True) -> weak typing, flags INT8 + FP16
    plan_build("11.4.0", "int8", has_qdq=True) -> strong typing, Q/DQ as given, floats stay FP32
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from edgevl.errors import ConfigError
from edgevl.exporters.compile.trt_profiles import Profile

PRECISIONS = ("fp32", "fp16", "int8")
QUANTIZE_HINT = ("quantize the bundle first (Q/DQ INT8, e.g. with edgevl.exporters.quantize) and compile "
                 "that bundle")


def parse_version(version: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", str(version))
    if not nums:
        raise ConfigError(f"cannot read a TensorRT version from {version!r}")
    return tuple(int(n) for n in nums[:4])


@dataclass(frozen=True)
class BuildPlan:
    tensorrt_version: str
    precision: str                      # what the part runs in: fp32 | fp16 | int8
    strongly_typed: bool                # create the network with STRONGLY_TYPED
    builder_flags: tuple = ()           # BuilderFlag names to set
    cleared_flags: tuple = ()           # BuilderFlag names to clear (when the version has them)
    convert_fp16: bool = False          # convert the ONNX floats to FP16 before parsing
    dla_core: int | None = None
    notes: tuple = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["builder_flags"], d["cleared_flags"], d["notes"] = (list(self.builder_flags), list(self.cleared_flags),
                                                              list(self.notes))
        return d


def part_precision(requested: str, has_qdq: bool, part: str) -> str:
    """The precision one part is built in. ``auto``: INT8 when the part has Q/DQ nodes, else FP16.
    An INT8 request for a part without Q/DQ (embeddings are usually left in float) builds FP16."""
    if requested not in ("auto", *PRECISIONS):
        raise ConfigError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {requested!r}")
    if has_qdq:
        if requested in ("fp16", "fp32"):
            raise ConfigError(f"part {part!r} has Q/DQ nodes, so it is INT8 by construction; compile it with --int8 "
                              f"(or --precision auto), or compile the float bundle for {requested}")
        return "int8"
    if requested == "int8":
        return "fp16"
    return "fp16" if requested == "auto" else requested


def dla_unavailable_reason(tensorrt_version: str) -> str:
    """Why a TensorRT version may report no DLA core (the message only; the decision is the count)."""
    v = parse_version(tensorrt_version) + (0, 0, 0)
    if v[0] == 10 and v[1] >= 8:
        return f"TensorRT {tensorrt_version} has no DLA support (10.7 was the last 10.x release with DLA)"
    if v[0] == 11 and v[1] <= 3:
        return (f"TensorRT {tensorrt_version} has no DLA support (11.0-11.3 dropped it; 11.4.1 restores it on Jetson "
                "AGX Orin with JetPack 7.2.2 or later)")
    if v[0] == 11 and v[:3] == (11, 4, 0):
        return "TensorRT 11.4.0 has DLA only on Windows on ARM; Jetson AGX Orin needs 11.4.1 with JetPack 7.2.2+"
    if v[0] >= 11 and v[:2] >= (11, 5):
        return (f"TensorRT {tensorrt_version} does not support JetPack; Jetson AGX Orin has DLA through TensorRT "
                "11.4.1 (JetPack 7.2.2+) or 10.x up to 10.7 (JetPack 6)")
    return "DLA exists on Jetson AGX/NX Orin and Xavier only"


def plan_build(tensorrt_version: str, precision: str, *, has_qdq: bool = False, dla_core: int | None = None,
               int8_float: str = "fp16", dla_cores: int | None = None) -> BuildPlan:
    """``dla_cores``: the builder's ``num_DLA_cores``; required when ``dla_core`` is set."""
    major = parse_version(tensorrt_version)[0]
    if major < 10:
        raise ConfigError(f"TensorRT {tensorrt_version} is too old: edgevl needs TensorRT 10 or newer (the name-based "
                          "tensor API); JetPack 6 ships 10.x")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "int8" and not has_qdq:
        raise ConfigError("INT8 needs an explicitly quantized (Q/DQ) graph: TensorRT 11 has no implicit calibration "
                          f"and edgevl does not use TensorRT 10's calibrators; {QUANTIZE_HINT}")
    if int8_float not in ("fp16", "fp32"):
        raise ConfigError(f"int8_float must be fp16 or fp32, got {int8_float!r}")
    if dla_core is not None:
        if dla_core < 0:
            raise ConfigError(f"--dla-core must be >= 0, got {dla_core}")
        if dla_cores is None:
            raise TypeError("plan_build: dla_cores (the builder's num_DLA_cores) is required with dla_core")
        if dla_core >= dla_cores:
            why = "" if dla_cores else f" ({dla_unavailable_reason(tensorrt_version)})"
            raise ConfigError(f"--dla-core {dla_core}: this device reports {dla_cores} DLA core(s) to TensorRT "
                              f"{tensorrt_version}{why}; drop --dla-core or use a core below {dla_cores}")
        if precision == "fp32":
            raise ConfigError("DLA runs only FP16 or INT8: use --fp16 or --int8 with --dla-core")

    # FP32 is only FP32 with TF32 off: on Ampere and newer TensorRT allows TF32 matmuls by default.
    no_tf32 = ("TF32",)
    fallback = ("GPU_FALLBACK",) if dla_core is not None else ()
    dla_note = (("DLA has no dynamic dimensions: this part is built for one static shape (the opt shape; "
                 "--opt-batch sets its batch) and layers the DLA cannot run fall back to the GPU",)
                if dla_core is not None else ())
    if major >= 11:
        if precision == "fp32":
            return BuildPlan(tensorrt_version, "fp32", True, cleared_flags=no_tf32)
        if precision == "fp16":
            return BuildPlan(tensorrt_version, "fp16", True, fallback, convert_fp16=True, dla_core=dla_core, notes=(
                "TensorRT 11 is strongly typed: the ONNX is converted to FP16 (norms, softmax and reductions "
                "stay FP32; inputs and outputs stay FP32)",) + dla_note)
        notes = ("TensorRT 11 is strongly typed: Q/DQ pairs run INT8; the layers between them run in the "
                 "graph's float type (FP32)",)
        if int8_float == "fp16":
            notes += ("int8_float=fp16 is a TensorRT 10 setting; on TensorRT 11 float layers keep the graph's type",)
        return BuildPlan(tensorrt_version, "int8", True, fallback, dla_core=dla_core, notes=notes + dla_note)

    if precision == "fp32":
        return BuildPlan(tensorrt_version, "fp32", False, cleared_flags=no_tf32)
    if precision == "fp16":
        return BuildPlan(tensorrt_version, "fp16", False, ("FP16",) + fallback, dla_core=dla_core, notes=dla_note)
    flags = ("INT8", "FP16") if int8_float == "fp16" else ("INT8",)
    return BuildPlan(tensorrt_version, "int8", False, flags + fallback,
                     cleared_flags=() if int8_float == "fp16" else no_tf32, dla_core=dla_core,
                     notes=(f"TensorRT 10 weak typing: Q/DQ pairs run INT8, the layers between them may run "
                            f"{int8_float.upper()}",) + dla_note)


def static_profiles(profiles: list[Profile]) -> list[Profile]:
    """DLA has no dynamic dimensions ("the profile's min, max, and opt values must be equal",
    DLA Supported Layers and Restrictions): one profile pinned at the first profile's opt shape.
    A part with static inputs (no profile) stays without one."""
    if not profiles:
        return []
    first = profiles[0]
    return [Profile("static", {name: (opt, opt, opt) for name, (_, opt, _) in first.shapes.items()})]
