"""Realistic decoder inputs for calibration and reports: real prompts, real image embeddings.

The FP32 bundle's own runtime (edgevl.runtimes.engine) encodes each image with the vision
part, merges the embeddings into the prompt with the embed part, prefills, and decodes a few
greedy steps; every feed the decoder receives on the way (the prefill with an empty cache, each
decode step with the real KV cache written so far) is recorded. So the decoder is calibrated on
exactly the tensors it sees in deployment, not on random tensors.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgevl.bundle import Bundle


class RecordingRunner:
    """Wraps a runner and keeps a copy of every feed (the runtime's cache arrays are views that
    later steps overwrite, so copies are needed)."""

    def __init__(self, inner, sink: list):
        self.inner, self.sink = inner, sink

    def infer(self, feeds: dict, check: bool = False) -> dict:
        self.sink.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.inner.infer(feeds, check=check)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def collect_decoder_feeds(bundle: Bundle, images: Sequence[np.ndarray], prompts: Sequence[str],
                          decode_steps: int = 4, backend: str = "onnxruntime", threads: int | None = None,
                          progress=None) -> list[dict]:
    """Prefill + up to ``decode_steps`` decode feeds per (image, prompt) pair, through ``bundle``."""
    from edgevl.preprocess import preprocess
    from edgevl.runtimes.engine import Engine
    from edgevl.runtimes.generation import stream_tokens
    from edgevl.runtimes.sampling import SamplingParams

    engine = Engine(bundle, backend, threads=threads)
    recorded: list[dict] = []
    engine.runners["decoder"] = RecordingRunner(engine.runners["decoder"], recorded)
    params = SamplingParams(max_new_tokens=decode_steps + 1)
    spec = bundle.manifest["preprocess"]
    try:
        for image, prompt in zip(images, prompts):
            embeds = engine.encode_images(preprocess([image], spec, channels="rgb"))
            for _ in stream_tokens(engine, engine.encode_prompt(prompt, 1), embeds, params):
                pass
            if progress is not None:
                progress.update(1)
    finally:
        engine.close()
    return recorded


def part_feeds(bundle: Bundle, source, parts, samples: int, decoder_prompts: int, decode_steps: int,
               threads: int | None = None, progress: bool = False) -> dict[str, list[dict]]:
    """Calibration feeds per part from one source: preprocessed pixels for the vision part, recorded
    prefill/decode feeds for the decoder (its images are the first ``decoder_prompts`` of the same
    source, paired with the source's prompts)."""
    from edgevl.exporters.quantize.calibration import vision_feeds

    out: dict[str, list[dict]] = {}
    if "vision" in parts:
        out["vision"] = vision_feeds(source, bundle.manifest["preprocess"], samples)
    if "decoder" in parts:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=decoder_prompts, desc="decoder calibration prompts", unit="prompt", leave=False)
        try:
            out["decoder"] = collect_decoder_feeds(bundle, source.images(decoder_prompts), source.prompts(decoder_prompts),
                                                   decode_steps, threads=threads, progress=bar)
        finally:
            if bar is not None:
                bar.close()
    return out


def held_out_feeds(bundle: Bundle, parts, n_images: int = 8, decode_steps: int = 4,
                   threads: int | None = None) -> dict[str, list[dict]]:
    """Inputs no calibration ever sees (the world's test split, its own seed), for reports."""
    from edgevl.exporters.quantize.calibration import held_out_source

    return part_feeds(bundle, held_out_source(), parts, n_images, n_images, decode_steps, threads)
