"""One generation request as the scheduler tracks it: prompt, sampler state, tokens, timings."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgevl.runtimes.sampling import SamplingParams


@dataclass(eq=False)
class Sequence:
    ids: np.ndarray                          # (T,) prompt token ids, image tokens included
    params: SamplingParams
    future: Future                           # a GenerationFuture of the token list
    timings: dict                            # ms, filled like generation.stream_tokens does
    on_token: Callable[[int], None] | None
    submitted: float                         # time.monotonic()
    deadline: float | None                   # time.monotonic() by which it must be finished
    stop: set = field(default_factory=set)
    vision_future: Future | None = None      # its images' embeddings, from the vision batcher
    tokens: list = field(default_factory=list)
    next_token: int | None = None            # fed to the next decode step
    leaving: bool = False                    # finished, failed or cancelled: free its slot
    error: BaseException | None = None
    finished: bool = False                   # its future has been resolved (or was cancelled)
    admitted: float = 0.0                    # time.monotonic() when it left the waiting queue
    prompt_embeds: np.ndarray | None = None  # (1, T, D) merged prompt, held only until its prefill

    def __post_init__(self):
        # its own generator, seeded per request: batching must not change what a seed samples
        self.rng = np.random.default_rng(self.params.seed)
        self.timings["decode_steps"] = []
        self._seen = list(self.ids) if self.params.repetition_penalty != 1.0 else None

    def seen_array(self) -> np.ndarray | None:
        """Prompt plus generated tokens, for the repetition penalty (None when it is off)."""
        if self._seen is None:
            return None
        return np.asarray(self._seen + self.tokens, dtype=np.int64)
