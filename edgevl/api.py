"""The on-device Python API: ``vlm = edgevl.load(bundle)``; ``vlm.generate(image, prompt)``.

Numpy + one backend; never torch or transformers. A ``VLM`` is thread-safe: without batching,
concurrent calls take turns on one engine; with ``batching=True`` they go through the dynamic
batcher (vision) and the in-flight scheduler (decode), see edgevl.runtimes.scheduler.
"""

from __future__ import annotations

import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edgevl.bundle import Bundle, load_bundle
from edgevl.errors import BackendUnavailable
from edgevl.preprocess import preprocess
from edgevl.runtimes.engine import Engine
from edgevl.runtimes.generation import stream_tokens
from edgevl.runtimes.registry import BACKENDS, installed_backends
from edgevl.runtimes.sampling import SamplingParams


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    timings_ms: dict = field(default_factory=dict)
    prompt_tokens: int = 0
    finish_reason: str = "length"

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "timings_ms": self.timings_ms,
                "prompt_tokens": self.prompt_tokens, "finish_reason": self.finish_reason}


def _has_nvidia_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/dev/nvhost-ctrl").exists()


def choose_backend(bundle: Bundle) -> tuple[str, str]:
    """(backend, reason): the best installed backend for this bundle on this machine."""
    installed = installed_backends()
    target = bundle.manifest.get("target")
    has_engine = any("tensorrt" in p.get("artifacts", {}) for p in bundle.parts.values())
    if has_engine and "tensorrt" in installed and _has_nvidia_gpu():
        return "tensorrt", "bundle has TensorRT engines and an NVIDIA GPU is present"
    if target == "openvino" and "openvino" in installed:
        return "openvino", "bundle was built for OpenVINO"
    if target == "onnxruntime" and "onnxruntime" in installed:
        return "onnxruntime", "bundle was built for ONNX Runtime"
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and "openvino" in installed:
        return "openvino", "x86 CPU with OpenVINO installed"
    if "onnxruntime" in installed:
        return "onnxruntime", "ONNX Runtime (runs Q/DQ INT8 natively on x86 and ARM)"
    raise BackendUnavailable(f"no backend is installed; install one of: "
                             + ", ".join(f"{b.name} (`pip install {b.extra}`)" for b in BACKENDS.values()))


def half_the_cores() -> int:
    """Half the usable cores (at least 1): the thread count for model parts that run at the same
    time as other work (see ``batching_threads``; stream pipelines use it for every part)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores // 2)


def batching_threads() -> dict:
    """Threads per part with ``batching=True``: the scheduler decodes on one thread while the
    vision batcher encodes images on another, so full-width pools for both would oversubscribe
    the cores (and ONNX Runtime's pool threads spin). The decoder and the embedding lookup get half
    the cores; the vision part, which batches images and uses more threads well, keeps the
    backend's default. On the 2-core development VM, edgevl-tiny on ONNX Runtime at 8 concurrent
    requests: generation 4,589 tokens/s against 3,744 with default threads everywhere, vision
    unchanged (benchmarks/results/batching; 1 thread everywhere gave 5,584 but lost 21% of vision)."""
    half = half_the_cores()
    return {"vision": None, "embed": half, "decoder": half}


def sampling_params(defaults: dict, **overrides) -> SamplingParams:
    """The bundle's generation defaults (manifest ``generation``) with the caller's non-None overrides."""
    base = {k: v for k, v in defaults.items() if k in SamplingParams.__dataclass_fields__}
    base.update({k: v for k, v in overrides.items() if v is not None})
    if "stop_token_ids" in base:
        base["stop_token_ids"] = tuple(base["stop_token_ids"])
    return SamplingParams(**base).validate()


class VLM:
    def __init__(self, bundle: Bundle, backend: str, threads: int | dict | None = None, device: str | None = None,
                 options: dict | None = None, batching: bool = False, max_batch_size: int = 8,
                 max_wait_ms: float = 5.0, max_queue_size: int = 256):
        self.bundle, self.backend = bundle, backend
        if batching and threads is None:
            threads = batching_threads()
        self.engine = Engine(bundle, backend, threads=threads, device=device, options=options).activate()
        self.preprocess_spec = bundle.manifest["preprocess"]
        self.generation_defaults = dict(bundle.manifest.get("generation", {}))
        self._lock = threading.Lock()
        self.scheduler = None
        if batching:
            from edgevl.runtimes.scheduler import Scheduler

            self.scheduler = Scheduler(self.engine, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                       max_queue_size=max_queue_size)

    # -- helpers -----------------------------------------------------------------------------
    def _params(self, **overrides) -> SamplingParams:
        return sampling_params(self.generation_defaults, **overrides)

    def pixels(self, images, channels: str = "bgr") -> np.ndarray:
        return preprocess(images, self.preprocess_spec, channels)

    # -- API ---------------------------------------------------------------------------------
    def encode_images(self, images, channels: str = "bgr") -> np.ndarray:
        """Images -> embeddings (n_images, image_seq_len, hidden)."""
        pixels = self.pixels(images, channels)
        if self.scheduler is not None:
            return self.scheduler.encode(pixels)
        with self._lock:
            return self.engine.encode_images(pixels)

    def stream(self, images, prompt: str, channels: str = "bgr", timings: dict | None = None,
               **sampling) -> Iterator[str]:
        """Yield the answer's text as it grows: each piece is the new suffix of the decoded text
        (decoding the whole sequence each time keeps spaces and multi-byte characters right)."""
        tokens: list[int] = []
        text = ""
        for token in self._token_stream(images, prompt, channels, timings if timings is not None else {}, **sampling):
            tokens.append(token)
            new_text = self.engine.decode_tokens(tokens)
            if new_text.startswith(text) and len(new_text) > len(text):
                yield new_text[len(text):]
                text = new_text

    def generate(self, images, prompt: str, channels: str = "bgr", max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 stop_token_ids=None, deadline_s: float | None = None) -> GenerationResult:
        """Answer ``prompt`` about ``images`` (one, a list, or None). ``deadline_s`` (with
        ``batching=True``): fail with DeadlineExceeded if the answer is not finished in time."""
        timings: dict = {}
        t0 = time.perf_counter()
        tokens = list(self._token_stream(images, prompt, channels, timings, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k, top_p=top_p,
                                         repetition_penalty=repetition_penalty, seed=seed,
                                         stop_token_ids=stop_token_ids, deadline_s=deadline_s, streaming=False))
        steps = timings.pop("decode_steps", [])
        timings["decode_total"] = float(sum(steps))
        timings["decode_per_token"] = float(np.mean(steps)) if steps else 0.0
        timings["total"] = (time.perf_counter() - t0) * 1e3
        finish = timings.pop("finish_reason", "length")
        prompt_tokens = timings.pop("prompt_tokens", 0)
        timings = {k: round(v, 3) for k, v in timings.items()}
        return GenerationResult(self.engine.decode_tokens(tokens), tokens, timings, prompt_tokens, finish)

    def _token_stream(self, images, prompt, channels, timings, deadline_s=None, streaming=True,
                      **sampling) -> Iterator[int]:
        params = self._params(**sampling)
        if deadline_s is not None and self.scheduler is None:
            raise ValueError("deadline_s needs batching=True (the scheduler enforces deadlines); "
                             "load with edgevl.load(..., batching=True)")
        images_list = [] if images is None else images if isinstance(images, (list, tuple)) else [images]
        t = time.perf_counter()
        pixels = self.pixels(images_list, channels) if images_list else None
        timings["preprocess"] = (time.perf_counter() - t) * 1e3
        ids = self.engine.encode_prompt(prompt, n_images=len(images_list))
        timings["prompt_tokens"] = len(ids)
        if self.scheduler is not None:
            if streaming:
                yield from self.scheduler.stream(ids, pixels, params, timings, deadline_s=deadline_s)
                return
            # the whole answer at once: no hand-off between threads per token
            future = self.scheduler.submit(ids, pixels, params, timings, deadline_s=deadline_s)
            try:
                tokens = future.result()
            except BaseException:
                future.cancel()           # e.g. Ctrl-C while waiting: free its slot
                raise
            yield from tokens
            return
        with self._lock:
            t = time.perf_counter()
            embeds = self.engine.encode_images(pixels) if pixels is not None else None
            timings["vision"] = (time.perf_counter() - t) * 1e3
            yield from stream_tokens(self.engine, ids, embeds, params, timings)

    def answer(self, images, questions, channels: str = "rgb", **sampling) -> list[str]:
        """Answer (image, question) pairs: the evaluation interface (images are RGB by default)."""
        if self.scheduler is not None:
            # block=True: a long list waits for queue room instead of failing with QueueFull
            futures = [self.scheduler.submit(self.engine.encode_prompt(q), self.pixels([im], channels),
                                             self._params(**sampling), block=True)
                       for im, q in zip(images, questions)]
            return [self.engine.decode_tokens(f.result()) for f in futures]
        return [self.generate(im, q, channels=channels, **sampling).text for im, q in zip(images, questions)]

    def metrics(self) -> dict:
        """Batching metrics (queue depth, batch-size histogram, queue wait, per-request latency),
        for generation and for vision encoding; empty without ``batching=True``."""
        return self.scheduler.stats() if self.scheduler is not None else {}

    def health(self) -> dict:
        """Whether the scheduler and the vision batcher are alive, and their last errors."""
        return self.scheduler.health() if self.scheduler is not None else {"scheduler": None, "vision": None}

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()
        self.engine.close()

    def __enter__(self) -> "VLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(bundle: str | Path, backend: str | None = None, threads: int | dict | None = None, device: str | None = None,
         options: dict | None = None, batching: bool = False, max_batch_size: int = 8, max_wait_ms: float = 5.0,
         max_queue_size: int = 256, verbose: bool = True, trust=None) -> VLM:
    """Load a bundle on a backend (the best installed one for this machine when ``backend`` is None).
    ``threads`` (a count, or {part: count}) defaults to the backend's own choice, and with
    ``batching=True`` to ``batching_threads()`` (image encoding and decoding run at the same time).
    ``trust``: public keys (.pub files, folders of them) one of which must have signed the bundle;
    None applies the device policy ``EDGEVL_TRUST`` if set (see edgevl.signing)."""
    b = load_bundle(bundle, trust=trust)
    if backend is None:
        backend, reason = choose_backend(b)
        if verbose:
            print(f"edgevl: using backend {backend} ({reason})", file=sys.stderr)
    return VLM(b, backend, threads=threads, device=device, options=options, batching=batching,
               max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue_size=max_queue_size)
