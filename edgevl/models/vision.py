"""ViT vision encoder: patch embedding, learned positions, pre-norm transformer blocks."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgevl.models.config import TinyVLMConfig


class ConvStem(nn.Sequential):
    """A stack of 3x3 stride-2 convolutions that patchifies like one patch-sized convolution
    (Xiao et al. 2021, "Early convolutions help transformers see better"): it trains far
    faster from scratch than a linear patch projection and costs little (about 10 MMAC)."""

    def __init__(self, cfg: TinyVLMConfig):
        n = int(math.log2(cfg.vit_patch_size))
        if 2**n != cfg.vit_patch_size:
            raise ValueError(f"conv stem needs a power-of-two patch size, got {cfg.vit_patch_size}")
        widths = [3] + [cfg.vit_hidden_dim // 2 ** (n - i) for i in range(1, n)] + [cfg.vit_hidden_dim]
        layers: list[nn.Module] = []
        for i in range(n):
            layers.append(nn.Conv2d(widths[i], widths[i + 1], kernel_size=3, stride=2, padding=1))
            if i < n - 1:
                layers.append(nn.GELU())
        super().__init__(*layers)


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        if cfg.vit_patch_stem == "conv":
            self.proj = ConvStem(cfg)
        else:
            self.proj = nn.Conv2d(3, cfg.vit_hidden_dim, kernel_size=cfg.vit_patch_size, stride=cfg.vit_patch_size)
        self.position = nn.Parameter(torch.zeros(1, cfg.vit_grid**2, cfg.vit_hidden_dim))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixels)                 # (B, D, G, G)
        x = x.flatten(2).transpose(1, 2)      # (B, G*G, D)
        return x + self.position


class VisionAttention(nn.Module):
    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.n_heads = cfg.vit_n_heads
        self.qkv = nn.Linear(cfg.vit_hidden_dim, 3 * cfg.vit_hidden_dim)
        self.out = nn.Linear(cfg.vit_hidden_dim, cfg.vit_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]      # (B, H, N, Dh)
        scores = (q @ k.transpose(-1, -2)) * (d // self.n_heads) ** -0.5
        y = scores.softmax(dim=-1) @ v        # (B, H, N, Dh)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class VisionBlock(nn.Module):
    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.fc1 = nn.Linear(cfg.vit_hidden_dim, cfg.vit_mlp_dim)
        self.fc2 = nn.Linear(cfg.vit_mlp_dim, cfg.vit_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionEncoder(nn.Module):
    """pixels (B, 3, S, S), normalised -> patch features (B, G*G, vit_hidden_dim)."""

    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.patch = PatchEmbedding(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vit_n_layers))
        self.norm = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
