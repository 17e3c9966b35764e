"""Single-request generation on an Engine: preprocess, encode, prefill, decode token by token.

``stream_tokens`` is a generator so the API can offer both a blocking ``generate`` and a
streaming form from one loop; timings are filled into the dict it is given as it goes.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from edgevl.runtimes.engine import Engine
from edgevl.runtimes.sampling import SamplingParams, choose


def stream_tokens(engine: Engine, ids: np.ndarray, image_embeds: np.ndarray | None,
                  params: SamplingParams, timings: dict | None = None) -> Iterator[int]:
    """Yield new token ids (stop token excluded) for one prompt; fills ``timings`` (ms)."""
    timings = {} if timings is None else timings
    engine.check_context(len(ids), params.max_new_tokens)
    stop = set(engine.eos_ids) | set(params.stop_token_ids)
    rng = np.random.default_rng(params.seed)
    cache = engine.new_cache(slots=1, capacity=len(ids) + params.max_new_tokens)
    t0 = time.perf_counter()
    logits = engine.prefill(cache, 0, engine.merge(ids, image_embeds), ids)
    timings["prefill"] = (time.perf_counter() - t0) * 1e3
    seen = list(ids) if params.repetition_penalty != 1.0 else None
    decode_ms: list[float] = []
    timings["decode_steps"] = decode_ms
    for step in range(params.max_new_tokens):
        token = choose(logits, params, rng, np.asarray(seen, dtype=np.int64) if seen is not None else None)
        if token in stop:
            timings["finish_reason"] = "stop"
            return
        yield token
        if seen is not None:
            seen.append(token)
        if step == params.max_new_tokens - 1:
            break
        t = time.perf_counter()
        logits = engine.decode(cache, 1, np.asarray([token], dtype=np.int64))[0]
        decode_ms.append((time.perf_counter() - t) * 1e3)
    timings["finish_reason"] = "length"
