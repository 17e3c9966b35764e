"""What a TensorRT engine's I/O looks like, read through the name-based tensor API (TensorRT
10+): names, direction, dtypes, shapes (-1 = dynamic) and each optimization profile's
min/opt/max per input; and which profile fits a set of input shapes.

Kept apart from the runner so it can be tested against a fake engine: the surface used is
``num_io_tensors``, ``get_tensor_name(i)``, ``get_tensor_mode(name)``, ``get_tensor_dtype(name)``,
``get_tensor_shape(name)``, ``num_optimization_profiles``,
``get_tensor_profile_shape(name, profile)`` and ``is_shape_inference_io(name)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgevl.errors import BundleError, InputError
from edgevl.runtimes.base import TensorInfo


def numpy_dtype(trt, trt_dtype, name: str) -> np.dtype:
    """``trt.nptype`` maps FLOAT, HALF, INT8, INT32, INT64, BOOL and UINT8 and raises TypeError
    for the rest (BF16, FP8, INT4, FP4: numpy has no such type), so such I/O cannot be bound."""
    try:
        return np.dtype(trt.nptype(trt_dtype))
    except TypeError:
        raise BundleError(f"engine tensor {name!r} has TensorRT type {trt_dtype}, which has no numpy equivalent, so "
                          "edgevl's TensorRT runner cannot bind it; rebuild the engine from a graph whose inputs and "
                          "outputs are float32/float16/int8/int32/int64/bool/uint8 (edgevl's FP16 conversion keeps "
                          "I/O in float32)") from None


@dataclass(frozen=True)
class TensorSlot:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple                    # engine shape, -1 for dynamic axes
    host_shape_tensor: bool = False  # TensorRT wants this input in host memory (shape tensor)

    def info(self) -> TensorInfo:
        return TensorInfo(self.name, self.dtype.name, tuple(None if d < 0 else int(d) for d in self.shape))


class EngineIO:
    def __init__(self, slots: list[TensorSlot], profiles: list[dict[str, tuple]]):
        self.slots = {s.name: s for s in slots}
        self.inputs = [s for s in slots if s.is_input]
        self.outputs = [s for s in slots if not s.is_input]
        self.profiles = profiles        # [{input name: (min, opt, max)}] per profile

    @classmethod
    def from_engine(cls, engine, trt) -> "EngineIO":
        slots = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = numpy_dtype(trt, engine.get_tensor_dtype(name), name)
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            host = bool(is_input and engine.is_shape_inference_io(name))
            slots.append(TensorSlot(name, is_input, dtype, shape, host))
        profiles = []
        for p in range(max(1, int(engine.num_optimization_profiles))):
            shapes = {}
            for s in slots:
                if s.is_input and not s.host_shape_tensor and any(d < 0 for d in s.shape):
                    lo, opt, hi = engine.get_tensor_profile_shape(s.name, p)
                    shapes[s.name] = (tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi))
            profiles.append(shapes)
        return cls(slots, profiles)

    # -- profile choice ------------------------------------------------------------------------
    def fits(self, profile: int, shapes: dict[str, tuple]) -> bool:
        for name, (lo, _, hi) in self.profiles[profile].items():
            shape = shapes[name]
            if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
                return False
        return True

    def choose_profile(self, shapes: dict[str, tuple], current: int | None = None) -> int:
        """The profile whose ranges contain ``shapes`` and whose opt shapes are closest (in log
        scale) to them: a decode step (seq 1) lands on the decode profile, a prompt on prefill.
        Ties keep the current profile, so alternating calls do not switch for nothing."""
        fitting = [p for p in range(len(self.profiles)) if self.fits(p, shapes)]
        if not fitting:
            raise InputError(self._no_profile_message(shapes))

        def distance(p):
            d = 0.0
            for name, (_, opt, _) in self.profiles[p].items():
                d += sum(abs(math.log(max(s, 1)) - math.log(max(o, 1))) for s, o in zip(shapes[name], opt))
            return (d, p != current, p)

        return min(fitting, key=distance)

    def _no_profile_message(self, shapes: dict[str, tuple]) -> str:
        lines = []
        for p, prof in enumerate(self.profiles):
            bad = [f"{n} {tuple(shapes[n])} not within {lo}..{hi}" for n, (lo, _, hi) in prof.items()
                   if len(shapes[n]) != len(lo) or any(s < a or s > b for s, a, b in zip(shapes[n], lo, hi))]
            lines.append(f"profile {p}: " + "; ".join(bad))
        head = "input shapes fit none of the engine's optimization profiles (" + " | ".join(lines) + "); "
        if self.profiles and all(lo == hi for prof in self.profiles for lo, _, hi in prof.values()):
            return head + ("this engine has static shapes (a DLA engine is built for one shape): feed exactly that "
                           "shape, or recompile for another batch with `edgevl compile BUNDLE --target tensorrt "
                           "--dla-core N --opt-batch B`")
        return head + ("rebuild the engine with larger ranges, e.g. `edgevl compile BUNDLE --target tensorrt "
                       "--max-batch N --max-seq N --max-capacity N`")

    def check_dtypes(self, feeds: dict) -> None:
        missing = sorted(s.name for s in self.inputs if s.name not in feeds)
        extra = sorted(set(feeds) - {s.name for s in self.inputs})
        if missing or extra:
            raise InputError(f"tensorrt: inputs missing {missing}, unexpected {extra}; the engine takes "
                             f"{[s.name for s in self.inputs]}")
        for s in self.inputs:
            dtype = np.dtype(feeds[s.name].dtype)
            if dtype != s.dtype:
                raise InputError(f"tensorrt: input {s.name!r} has dtype {dtype}, the engine takes {s.dtype}")
