"""Next-token choice in numpy: greedy, temperature, top-k, top-p, repetition penalty, seeded."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgevl.errors import InputError


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    repetition_penalty: float = 1.0   # 1 = off; >1 discourages tokens already in the sequence
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style, as transformers does: divide positive logits of seen tokens, multiply negative."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    picked = logits[seen]
    logits[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           seen: np.ndarray | None = None) -> int:
    """One token id from a (V,) row of logits."""
    logits = logits.astype(np.float32, copy=False)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature <= 0:
        return int(np.argmax(logits))
    z = logits / np.float32(params.temperature)
    if params.top_k > 0 and params.top_k < z.shape[0]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = cumulative - p[order] < params.top_p      # always keeps the most likely token
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.shape[0], p=p))
