"""3-D (temporal, height, width) positions for multimodal RoPE (Qwen2-VL / Qwen2.5-VL), numpy only.

A decoder with ``mrope_section`` takes ``position_ids`` (3, B, T) beside ``past_len``
(edgevl.models.decoder). The positions follow transformers' ``get_rope_index`` for still
images, from the manifest's ``mrope`` section (the image token and the merged grid of the one
fixed image size):

- text: t = h = w = the running position (0, 1, 2, ... from the prompt's start);
- an image block of ``grid_h * grid_w`` tokens starting at position ``s``: t = s,
  h = s + row, w = s + column (row-major over the merged grid); the running position then
  jumps to ``s + max(grid_h, grid_w)``, not ``s + grid_h * grid_w``;
- so after a prompt of ``T`` tokens the next position is ``T + delta`` (``delta`` <= 0, one
  value per prompt), and every decode step is ``past_len + delta`` on all three axes.

``delta`` is a property of the sequence, not of the step: the runtime keeps it per KV-cache
slot (``KVCache.position_delta``, moved with the slot), so rows of one decode batch at
different positions and with different prompts each get their own (in-flight batching stays
exact).
"""

from __future__ import annotations

import numpy as np

from edgevl.errors import InputError


class MRoPEPositions:
    def __init__(self, section: dict):
        self.image_token_id = int(section["image_token_id"])
        self.video_token_id = section.get("video_token_id")
        self.grid_h, self.grid_w = (int(n) for n in section["grid"])
        n = self.grid_h * self.grid_w
        rows, cols = np.divmod(np.arange(n, dtype=np.int64), self.grid_w)
        self.block = np.stack((np.zeros(n, np.int64), rows, cols))      # (3, N) offsets from the block's start

    def prompt(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        """ids (T,) -> (positions (3, T) int64, delta): delta = next position - T."""
        ids = np.asarray(ids).reshape(-1)
        if self.video_token_id is not None and (ids == int(self.video_token_id)).any():
            raise InputError("the prompt holds video tokens (<|video_pad|>): video input is not supported by edgevl "
                             "bundles (one fixed image block per image); pass video frames as images")
        is_image = ids == self.image_token_id
        out = np.empty((3, len(ids)), np.int64)
        n_block = len(self.block[0])
        pos = i = 0
        while i < len(ids):
            if not is_image[i]:
                out[:, i] = pos
                pos, i = pos + 1, i + 1
                continue
            run = int(np.argmin(is_image[i:])) if not is_image[i:].all() else len(ids) - i
            if run % n_block:
                raise InputError(f"the prompt has {run} image tokens in a row but the bundle's image block is "
                                 f"{n_block} ({self.grid_h}x{self.grid_w} merged patches); build prompts with the "
                                 "bundle's template (one image block per image)")
            for _ in range(run // n_block):   # blocks back to back: each its own image
                out[:, i:i + n_block] = pos + self.block
                pos, i = pos + max(self.grid_h, self.grid_w), i + n_block
        return out, pos - len(ids)

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids (k, T) of prompts starting at position 0 -> (position_ids (3, k, T), deltas (k,))."""
        pairs = [self.prompt(row) for row in np.asarray(ids).reshape(len(ids), -1)]
        return np.stack([p for p, _ in pairs], axis=1), np.asarray([d for _, d in pairs], np.int64)

    @staticmethod
    def decode(past_len: np.ndarray, deltas: np.ndarray) -> np.ndarray:
        """One new token per row -> position_ids (3, n, 1)."""
        pos = (np.asarray(past_len, np.int64) + np.asarray(deltas, np.int64))[None, :, None]
        return np.ascontiguousarray(np.broadcast_to(pos, (3, pos.shape[1], 1)))
