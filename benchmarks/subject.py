"""What a worker measures: a *subject* is one loaded model (PyTorch eager, or a bundle on a
backend) behind the few calls every measurement needs.

All subjects run the same work so their numbers can be divided:

- ``encode(pixels)``: the vision encoder (+ projector) on already preprocessed pixels;
- ``generate(images, new_tokens)``: preprocess + tokenize + vision + prefill (= time to first
  token), then a plain greedy loop of exactly ``new_tokens`` tokens (stop tokens ignored, so
  every subject decodes the same number of steps);
- ``decode_at(position, steps, batch)``: decode steps with the KV cache already holding
  ``position`` tokens (filled directly: attention cost does not depend on the values).

Timings are taken inside with ``perf_counter`` so each phase is separated exactly.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass
class GenerationTiming:
    ttft_ms: float            # preprocess + tokenize + vision + prefill + first token chosen
    decode_ms: float          # the remaining new_tokens - 1 greedy steps
    e2e_ms: float
    new_tokens: int
    batch: int
    prompt_tokens: int

    @property
    def decode_tok_s(self) -> float | None:
        steps = self.new_tokens - 1
        return steps * self.batch / (self.decode_ms / 1e3) if steps > 0 and self.decode_ms > 0 else None


def scene_images(n: int, split: str = "test") -> list[np.ndarray]:
    """Held-out scenes (RGB uint8): the fixed inputs of every benchmark."""
    from edgevl.data.world import make_scene

    return [make_scene(split, i, seed=777).image() for i in range(n)]


class Subject(ABC):
    tool = "?"
    backend = "?"

    def __init__(self, model, precision: str, threads: int | None):
        self.model, self.precision, self.threads = model, precision, threads
        self.load_ms = 0.0

    def load(self) -> None:
        t = time.perf_counter()
        self._load()
        self.load_ms = (time.perf_counter() - t) * 1e3

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def pixels(self, images: list[np.ndarray]) -> Any: ...

    @abstractmethod
    def encode(self, pixels: Any) -> Any: ...

    @abstractmethod
    def generate(self, images: list[np.ndarray], prompt: str, new_tokens: int) -> GenerationTiming: ...

    @abstractmethod
    def decode_at(self, position: int, steps: int, batch: int = 1) -> list[float]:
        """Per-step milliseconds of ``steps`` decode steps starting at cache length ``position``."""

    @abstractmethod
    def max_position(self) -> int: ...

    def describe(self) -> dict:
        """Static facts: size on disk, bytes of weights one decode step reads, prompt shape."""
        return {}

    def answerer(self) -> Callable | None:
        """``(images, questions) -> answers`` for edgevl.evaluate, or None (no accuracy)."""
        return None

    def vision_overhead(self, pixels: Any, pairs: int) -> dict | None:
        """edgevl's own cost on the vision part vs the bare backend session (edgevl subjects)."""
        return None

    def close(self) -> None:
        pass
