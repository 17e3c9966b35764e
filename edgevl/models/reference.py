"""The PyTorch reference for edgevl-tiny: preprocessing, prompt encoding and batched answering.

Training, evaluation, export parity and tests all build inputs through here, so "what PyTorch
answers" means one thing everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer

from edgevl.models.config import TinyVLMConfig
from edgevl.models.tokenizer import IMAGE, PROMPT_TEMPLATE
from edgevl.models.vlm import TinyVLM
from edgevl.prompting import render_prompt


def preprocess(images: list[np.ndarray], cfg: TinyVLMConfig) -> torch.Tensor:
    """RGB uint8 (S, S, 3) images of the model's size -> normalised (B, 3, S, S) float32."""
    x = torch.from_numpy(np.stack(images)).float().div_(255.0)
    mean = torch.tensor(cfg.image_mean).view(1, 1, 1, 3)
    std = torch.tensor(cfg.image_std).view(1, 1, 1, 3)
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()


def encode_prompt(tokenizer: Tokenizer, cfg: TinyVLMConfig, question: str) -> list[int]:
    text = render_prompt(PROMPT_TEMPLATE, question, IMAGE * cfg.image_seq_len)
    return tokenizer.encode(text, add_special_tokens=False).ids


def pad_right(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.int64)


class TorchAnswerer:
    """Answers (image, question) pairs with the PyTorch model, greedy, in batches."""

    def __init__(self, model: TinyVLM, tokenizer: Tokenizer, max_new_tokens: int = 32):
        self.model, self.tokenizer, self.max_new_tokens = model.eval(), tokenizer, max_new_tokens

    def __call__(self, images: list[np.ndarray], questions: list[str]) -> list[str]:
        cfg = self.model.cfg
        ids = pad_right([encode_prompt(self.tokenizer, cfg, q) for q in questions], cfg.pad_token_id)
        tokens = self.model.generate(preprocess(images, cfg), ids, max_new_tokens=self.max_new_tokens)
        return [self.tokenizer.decode(t) for t in tokens]
