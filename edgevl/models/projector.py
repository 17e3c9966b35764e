"""Modality projector: pixel shuffle (as in Idefics3/SmolVLM) then a 2-layer MLP.

Pixel shuffle folds each s x s neighbourhood of patch features into one token, so the decoder
sees s*s times fewer image tokens; prefill cost on an edge device shrinks by the same factor.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgevl.models.config import TinyVLMConfig


def pixel_shuffle(x: torch.Tensor, grid: int, factor: int) -> torch.Tensor:
    """(B, grid*grid, D) -> (B, (grid/factor)^2, D*factor^2), neighbours folded into channels."""
    b, _, d = x.shape
    g = grid // factor
    x = x.view(b, g, factor, g, factor, d)
    x = x.permute(0, 1, 3, 2, 4, 5)           # (B, g, g, f, f, D)
    return x.reshape(b, g * g, factor * factor * d)


class Projector(nn.Module):
    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.grid, self.factor = cfg.vit_grid, cfg.mp_pixel_shuffle
        self.fc1 = nn.Linear(cfg.vit_hidden_dim * self.factor**2, cfg.lm_hidden_dim)
        self.fc2 = nn.Linear(cfg.lm_hidden_dim, cfg.lm_hidden_dim)
        # Where each image token sits in the image. The decoder's RoPE only sees offsets from
        # the current token, which change with the question's length; an absolute 2-D position
        # on the image tokens themselves lets "where is the red square?" be read off directly
        # (SmolVLM gets the same from its <row_i_col_j> tokens).
        self.position = nn.Parameter(torch.zeros(1, cfg.image_seq_len, cfg.lm_hidden_dim))
        nn.init.normal_(self.position, std=0.5)  # on the scale of the image features, not the tokens'

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle(features, self.grid, self.factor)   # (B, image_seq_len, D*f*f)
        return self.fc2(F.gelu(self.fc1(x))) + self.position  # (B, image_seq_len, lm_hidden_dim)
