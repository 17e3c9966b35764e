"""The ``image_span`` decoder input (numpy only): where a prompt's image block sits.

A decoder exported with ``image_bidirectional`` (Gemma 3) lets the tokens of the image block
attend to each other in both directions during prefill, as transformers does with its
``token_type_ids`` mask; every other token stays causal. The graph takes the block as
``image_span`` (B, 2) int64: the [start, end) absolute positions of the block among the call's
tokens, start == end for none. A prompt is prefilled in one call, so the span found in its ids
is exact; a decode step's one new token is text, so its span is empty. The runtime keeps no
state for it, which is why in-flight batching (rows at different positions) needs nothing more.

One block per prompt: the graph input has one span per row. A prompt with two image blocks is
refused rather than run with the second block causal (transformers would give another answer).
"""

from __future__ import annotations

import numpy as np

from edgevl.errors import InputError


def prompt_spans(ids: np.ndarray, image_token_id: int, past_len: np.ndarray) -> np.ndarray:
    """(k, T) prompt ids entering a cache at ``past_len`` (k,) -> (k, 2) int64 [start, end)."""
    ids = np.atleast_2d(ids)
    spans = np.zeros((ids.shape[0], 2), np.int64)
    for row, row_ids in enumerate(ids):
        slots = np.flatnonzero(row_ids == image_token_id)
        if not len(slots):
            spans[row] = past_len[row]
            continue
        start, end = int(slots[0]), int(slots[-1]) + 1
        if end - start != len(slots):
            raise InputError(f"the prompt has {len(slots)} image tokens that are not one contiguous block (from "
                             f"position {start} to {end - 1}); this bundle's decoder attends bidirectionally over "
                             "one image block per prompt: pass one image")
        spans[row] = (past_len[row] + start, past_len[row] + end)
    return spans


def step_spans(n: int) -> np.ndarray:
    """Decode steps: (n, 2) empty spans."""
    return np.zeros((n, 2), np.int64)
