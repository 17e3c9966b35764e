"""The runner contract: one small interface per backend (after Polygraphy's runners).

A runner wraps one part of a bundle (one ONNX graph or compiled artefact) on one backend:

    runner = OnnxRuntimeRunner(path, threads=2)   # cheap: nothing loaded yet
    runner.activate()                             # loads/compiles (also done lazily by infer)
    runner.inputs, runner.outputs                 # [TensorInfo(name, dtype, shape)]
    outputs = runner.infer({"pixel_values": x})   # dict name -> numpy array
    runner.last_infer_ms                          # wall time of the last infer
    runner.close()

Shapes use ``None`` for dynamic axes. Backends differ in how they are configured (threads,
precision hints, device), not in how they are called.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                      # numpy dtype name: "float32", "int64", ...
    shape: tuple                    # ints, or None for a dynamic axis

    def check(self, array: np.ndarray, part: str = "") -> None:
        """Raise a clear InputError when ``array`` cannot feed this input."""
        from edgevl.errors import InputError

        where = f"{part}: " if part else ""
        if array.dtype != np.dtype(self.dtype):
            raise InputError(f"{where}input {self.name!r} has dtype {array.dtype}, expected {self.dtype}")
        if len(array.shape) != len(self.shape) or any(
                s is not None and s != a for s, a in zip(self.shape, array.shape)):
            raise InputError(f"{where}input {self.name!r} has shape {tuple(array.shape)}, "
                             f"expected {tuple('?' if s is None else s for s in self.shape)}")


class Runner(ABC):
    """Base of every backend runner. Subclasses implement ``_load``, ``_infer`` and ``_close``."""

    backend: str = "?"

    def __init__(self, path: str | Path, *, precision: str = "fp32", threads: int | None = None,
                 device: str | None = None, options: dict | None = None):
        self.path = Path(path)
        self.precision = precision
        self.threads = threads
        self.device = device
        self.options = dict(options or {})
        self.active = False
        self.last_infer_ms = 0.0
        self.load_ms = 0.0
        self._inputs: list[TensorInfo] = []
        self._outputs: list[TensorInfo] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if not self.active:
            t = time.perf_counter()
            self._inputs, self._outputs = self._load()
            self.load_ms = (time.perf_counter() - t) * 1e3
            self.active = True
        return self

    def close(self) -> None:
        if self.active:
            self._close()
            self.active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- description -------------------------------------------------------------------------
    @property
    def inputs(self) -> list[TensorInfo]:
        return self.activate()._inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self.activate()._outputs

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    # -- inference ---------------------------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray], check: bool = False) -> dict[str, np.ndarray]:
        """Run the part. ``check=True`` validates names, dtypes and shapes first (slower)."""
        self.activate()
        if check:
            self.check_feeds(feeds)
        t = time.perf_counter()
        out = self._infer(feeds)
        self.last_infer_ms = (time.perf_counter() - t) * 1e3
        return out

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        from edgevl.errors import InputError

        expected = {t.name: t for t in self.inputs}
        missing = sorted(set(expected) - set(feeds))
        extra = sorted(set(feeds) - set(expected))
        if missing or extra:
            raise InputError(f"{self.path.name}: inputs missing {missing}, unexpected {extra}; "
                             f"the part takes {sorted(expected)}")
        for name, info in expected.items():
            info.check(feeds[name], self.path.name)

    @abstractmethod
    def _load(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        ...

    @abstractmethod
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...

    def _close(self) -> None:
        pass

    def new_kv_cache(self, **spec):
        """Hook for runners that keep the decoder's KV cache themselves (on a device): return an
        object with KVCache's interface, or None (the default) for Engine's host KVCache.
        ``spec``: n_layers, n_kv_heads, head_dim, slots, capacity, max_capacity, dtype."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path.name!r}, precision={self.precision!r})"
