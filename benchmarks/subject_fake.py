"""A model-free subject with known costs, for testing the harness end to end (worker processes,
interleaving, statistics, failure handling, JSON and Markdown) in a second.

Its spec sets the simulated costs in milliseconds (``vision_ms``, ``prefill_ms``, ``step_ms``)
and ``fail`` = "load" | "round" makes it raise there, like a broken backend would (with
``fail_batch``, only at that batch size).
"""

from __future__ import annotations

import time

from edgevl.benchmarks.subject import GenerationTiming, Subject


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


class FakeSubject(Subject):
    tool = "fake"
    backend = "fake"

    def __init__(self, model, precision, threads, spec: dict):
        super().__init__(model, precision, threads)
        self.spec = spec
        self.vision_ms = float(spec.get("vision_ms", 1.0))
        self.prefill_ms = float(spec.get("prefill_ms", 1.0))
        self.step_ms = float(spec.get("step_ms", 0.5))

    def _fail(self, where: str, batch: int | None = None) -> None:
        if self.spec.get("fail") == where and self.spec.get("fail_batch") in (None, batch):
            raise RuntimeError(f"fake subject told to fail at {where}")

    def _load(self):
        self._fail("load")

    def pixels(self, images):
        return images

    def encode(self, pixels):
        self._fail("round", len(pixels))
        _busy(self.vision_ms * len(pixels))

    def generate(self, images, prompt, new_tokens):
        t0 = time.perf_counter()
        self.encode(images)
        _busy(self.prefill_ms)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            _busy(self.step_ms)
        t2 = time.perf_counter()
        return GenerationTiming((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3, new_tokens, len(images), 20)

    def decode_at(self, position, steps, batch=1):
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            _busy(self.step_ms * (1 + position / 4096))
            times.append((time.perf_counter() - t) * 1e3)
        return times

    def max_position(self):
        return 512

    def describe(self):
        return {"size_bytes": int(self.spec.get("size_bytes", 4_000_000)),
                "decoder_weight_bytes": int(self.spec.get("decoder_weight_bytes", 2_000_000)), "image_tokens": 16}
