"""LLaMA-style language decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) with a
fixed-capacity KV cache.

The cache contract is the one every edgevl backend uses, so the PyTorch reference, the ONNX
graph and the runtimes share one definition:

- each layer's cache is a preallocated pair of tensors ``(B, n_kv_heads, C, head_dim)``;
  row ``b`` holds ``past_len[b]`` valid positions, the rest is ignored (masked);
- a forward step takes ``T`` new tokens per row and returns *only their* keys and values,
  ``(B, n_kv_heads, T, head_dim)``; the caller writes them into its cache at
  ``past_len[b]`` in place. Nothing copies the whole cache, and rows may sit at different
  positions, which is what in-flight batching needs;
- attention is computed in two pieces, over the cache and over the new tokens, and the two
  are joined after the scores: so K/V are never concatenated (a concat would copy the cache)
  and query heads are grouped per KV head instead of repeating K/V (another copy).

The same module serves prefill (T = prompt length) and decode (T = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class DecoderSpec:
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """HF LLaMA convention: frequencies concatenated (not interleaved), rotate_half."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq       # (B, T, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)                   # (B, T, Dh)
        return emb.cos()[:, None], emb.sin()[:, None]             # (B, 1, T, Dh)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.rep = spec.n_heads // spec.n_kv_heads
        self.q_proj = nn.Linear(spec.hidden_dim, spec.n_heads * spec.head_dim, bias=spec.attention_bias)
        self.k_proj = nn.Linear(spec.hidden_dim, spec.n_kv_heads * spec.head_dim, bias=spec.attention_bias)
        self.v_proj = nn.Linear(spec.hidden_dim, spec.n_kv_heads * spec.head_dim, bias=spec.attention_bias)
        self.o_proj = nn.Linear(spec.n_heads * spec.head_dim, spec.hidden_dim, bias=spec.attention_bias)

    def forward(self, x, cos, sin, past_k, past_v, past_valid):
        """x (B, T, D); past_k/v (B, KV, C, Dh) or None; past_valid (B, 1, 1, C) bool or None."""
        b, t, _ = x.shape
        kv, rep, dh = self.n_kv, self.rep, self.head_dim
        q = self.q_proj(x).view(b, t, self.n_heads, dh).transpose(1, 2)     # (B, H, T, Dh)
        k = self.k_proj(x).view(b, t, kv, dh).transpose(1, 2)               # (B, KV, T, Dh)
        v = self.v_proj(x).view(b, t, kv, dh).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # group the query heads that share a KV head: (B, KV, rep*T, Dh)
        qg = q.reshape(b, kv, rep * t, dh) * dh**-0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        causal = causal.repeat(rep, 1)                                      # (rep*T, T)
        neg = torch.finfo(qg.dtype).min
        scores_new = (qg @ k.transpose(-1, -2)).masked_fill(~causal, neg)  # (B, KV, rep*T, T)
        if past_k is None:
            out = scores_new.softmax(-1) @ v
        else:
            scores_past = (qg @ past_k.transpose(-1, -2)).masked_fill(~past_valid, neg)
            probs = torch.cat((scores_past, scores_new), dim=-1).softmax(-1)
            c = past_k.shape[2]
            out = probs[..., :c] @ past_v + probs[..., c:] @ v             # (B, KV, rep*T, Dh)
        out = out.reshape(b, self.n_heads, t, dh).transpose(1, 2).reshape(b, t, self.n_heads * dh)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_dim, spec.mlp_dim, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(spec.hidden_dim, spec.mlp_dim, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.mlp_dim, spec.hidden_dim, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_dim, spec.rms_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_dim, spec.rms_eps)
        self.mlp = MLP(spec)

    def forward(self, x, cos, sin, past_k, past_v, past_valid):
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v, past_valid)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Decoder(nn.Module):
    """inputs_embeds (B, T, D) + cache -> logits (B, T, V) and the new tokens' keys/values."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_dim)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_dim, spec.rms_eps)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.rope_theta)
        self.lm_head = nn.Linear(spec.hidden_dim, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, inputs_embeds, past_keys=None, past_values=None, past_len=None, last_only=False):
        b, t, _ = inputs_embeds.shape
        if past_len is None:
            past_len = torch.zeros(b, dtype=torch.int64, device=inputs_embeds.device)
        positions = past_len[:, None] + torch.arange(t, device=inputs_embeds.device)[None, :]
        cos, sin = self.rotary(positions)
        past_valid = None
        if past_keys is not None:
            capacity = past_keys[0].shape[2]
            past_valid = (torch.arange(capacity, device=inputs_embeds.device)[None, :] < past_len[:, None])
            past_valid = past_valid[:, None, None, :]                      # (B, 1, 1, C)
        x, new_keys, new_values = inputs_embeds, [], []
        for i, layer in enumerate(self.layers):
            pk = past_keys[i] if past_keys is not None else None
            pv = past_values[i] if past_values is not None else None
            x, k, v = layer(x, cos, sin, pk, pv, past_valid)
            new_keys.append(k)
            new_values.append(v)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(self.norm(x)), new_keys, new_values


class KVCache:
    """PyTorch twin of the runtime's cache: preallocated, written in place at each row's length."""

    def __init__(self, spec: DecoderSpec, batch: int, capacity: int, dtype=torch.float32):
        shape = (batch, spec.n_kv_heads, capacity, spec.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(spec.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(spec.n_layers)]
        self.length = torch.zeros(batch, dtype=torch.int64)
        self.capacity = capacity

    def write(self, new_keys, new_values, n_valid: torch.Tensor | None = None) -> None:
        """Store the step's keys/values at each row's length; advance by n_valid (default T)."""
        t = new_keys[0].shape[2]
        n_valid = torch.full_like(self.length, t) if n_valid is None else n_valid
        if int((self.length + t).max()) > self.capacity:
            raise ValueError(f"KV cache overflow: capacity {self.capacity}, need {int((self.length + t).max())}")
        for layer, (k, v) in enumerate(zip(new_keys, new_values)):
            for row in range(k.shape[0]):
                start = int(self.length[row])
                self.keys[layer][row, :, start:start + t] = k[row]
                self.values[layer][row, :, start:start + t] = v[row]
        self.length += n_valid
