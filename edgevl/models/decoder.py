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


@dataclass(frozen=True)
class Step:
    """What every layer of one forward call shares, computed once in ``Decoder.forward``.

    Built once so the exported graph holds it once: per-layer shape reads, masks and rotary
    tables would each be a handful of ONNX nodes per layer, and on a small decoder the runtime's
    per-node cost is a large part of a decode step. ``sin`` carries the sign of rotate_half
    (``[-sin, +sin]`` over the two halves), so RoPE is ``x * cos + swap_halves(x) * sin``:
    HF's ``x * cos + rotate_half(x) * sin`` with the negation moved from x onto the table
    (the same products, one node fewer per use)."""
    b: int
    t: int
    cos: torch.Tensor                  # (B, 1, T, Dh)
    sin: torch.Tensor                  # (B, 1, T, Dh), signed
    causal_masked: torch.Tensor        # (rep*T, T) bool, True where a new token must not look
    past_masked: torch.Tensor | None   # (B, 1, 1, C) bool, True for cache slots not yet written
    capacity: int = 0


def swap_halves(x: torch.Tensor, half: int) -> torch.Tensor:
    """(x1, x2) -> (x2, x1) over the last axis; ``half`` is a Python int so no shape is read."""
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """``fused=True`` holds one ``qkv_proj`` (the q, k and v weights stacked) instead of three:
    the export layout (see ``fuse_projections``)."""

    def __init__(self, spec: DecoderSpec, fused: bool = False):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.rep = spec.n_heads // spec.n_kv_heads
        if fused:
            self.qkv_proj = nn.Linear(spec.hidden_dim, (spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim,
                                      bias=spec.attention_bias)
        else:
            self.q_proj = nn.Linear(spec.hidden_dim, spec.n_heads * spec.head_dim, bias=spec.attention_bias)
            self.k_proj = nn.Linear(spec.hidden_dim, spec.n_kv_heads * spec.head_dim, bias=spec.attention_bias)
            self.v_proj = nn.Linear(spec.hidden_dim, spec.n_kv_heads * spec.head_dim, bias=spec.attention_bias)
        self.o_proj = nn.Linear(spec.n_heads * spec.head_dim, spec.hidden_dim, bias=spec.attention_bias)

    def forward(self, x, step: Step, past_k, past_v):
        """x (B, T, D); past_k/v (B, KV, C, Dh) or None."""
        b, t = step.b, step.t
        h, kv, rep, dh = self.n_heads, self.n_kv, self.rep, self.head_dim
        if hasattr(self, "qkv_proj"):
            qkv = self.qkv_proj(x).view(b, t, h + 2 * kv, dh).transpose(1, 2)     # (B, H+2KV, T, Dh)
            qk = qkv[:, :h + kv]
            qk = qk * step.cos + swap_halves(qk, dh // 2) * step.sin           # RoPE on q and k at once
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kv:]
        else:
            q = self.q_proj(x).view(b, t, h, dh).transpose(1, 2)               # (B, H, T, Dh)
            k = self.k_proj(x).view(b, t, kv, dh).transpose(1, 2)              # (B, KV, T, Dh)
            v = self.v_proj(x).view(b, t, kv, dh).transpose(1, 2)
            q = q * step.cos + swap_halves(q, dh // 2) * step.sin
            k = k * step.cos + swap_halves(k, dh // 2) * step.sin
        # group the query heads that share a KV head: (B, KV, rep*T, Dh)
        qg = q.reshape(b, kv, rep * t, dh) * dh**-0.5
        neg = torch.finfo(qg.dtype).min
        scores_new = (qg @ k.transpose(-1, -2)).masked_fill(step.causal_masked, neg)  # (B, KV, rep*T, T)
        if past_k is None:
            out = scores_new.softmax(-1) @ v
        else:
            scores_past = (qg @ past_k.transpose(-1, -2)).masked_fill(step.past_masked, neg)
            probs = torch.cat((scores_past, scores_new), dim=-1).softmax(-1)
            c = step.capacity
            out = probs[..., :c] @ past_v + probs[..., c:] @ v             # (B, KV, rep*T, Dh)
        out = out.reshape(b, self.n_heads, t, dh).transpose(1, 2).reshape(b, t, self.n_heads * dh)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    """``fused=True`` holds one ``gate_up_proj`` (gate and up weights stacked)."""

    def __init__(self, spec: DecoderSpec, fused: bool = False):
        super().__init__()
        self.mlp_dim = spec.mlp_dim
        if fused:
            self.gate_up_proj = nn.Linear(spec.hidden_dim, 2 * spec.mlp_dim, bias=spec.mlp_bias)
        else:
            self.gate_proj = nn.Linear(spec.hidden_dim, spec.mlp_dim, bias=spec.mlp_bias)
            self.up_proj = nn.Linear(spec.hidden_dim, spec.mlp_dim, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.mlp_dim, spec.hidden_dim, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate_up = self.gate_up_proj(x)
            return self.down_proj(F.silu(gate_up[..., :self.mlp_dim]) * gate_up[..., self.mlp_dim:])
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, fused: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_dim, spec.rms_eps)
        self.self_attn = Attention(spec, fused)
        self.post_attention_layernorm = RMSNorm(spec.hidden_dim, spec.rms_eps)
        self.mlp = MLP(spec, fused)

    def forward(self, x, step: Step, past_k, past_v):
        h, k, v = self.self_attn(self.input_layernorm(x), step, past_k, past_v)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Decoder(nn.Module):
    """inputs_embeds (B, T, D) + cache -> logits (B, T, V) and the new tokens' keys/values."""

    def __init__(self, spec: DecoderSpec, fused: bool = False):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_dim)
        self.layers = nn.ModuleList(DecoderLayer(spec, fused) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_dim, spec.rms_eps)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.rope_theta)
        self.lm_head = nn.Linear(spec.hidden_dim, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, inputs_embeds, past_keys=None, past_values=None, past_len=None, last_only=False):
        b, t, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if past_len is None:
            past_len = torch.zeros(b, dtype=torch.int64, device=device)
        positions = past_len[:, None] + torch.arange(t, device=device)[None, :]
        cos, sin = self.rotary(positions)
        half = self.spec.head_dim // 2
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        rep = self.spec.n_heads // self.spec.n_kv_heads
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril().repeat(rep, 1)   # (rep*T, T)
        capacity, past_masked = 0, None
        if past_keys is not None:
            capacity = past_keys[0].shape[2]
            past_valid = torch.arange(capacity, device=device)[None, :] < past_len[:, None]
            past_masked = ~past_valid[:, None, None, :]                      # (B, 1, 1, C)
        step = Step(b, t, cos, signed_sin, ~causal, past_masked, capacity)
        x, new_keys, new_values = inputs_embeds, [], []
        for i, layer in enumerate(self.layers):
            pk = past_keys[i] if past_keys is not None else None
            pv = past_values[i] if past_values is not None else None
            x, k, v = layer(x, step, pk, pv)
            new_keys.append(k)
            new_values.append(v)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(self.norm(x)), new_keys, new_values


def _stacked(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the given Linears' outputs side by side."""
    weight = torch.cat([m.weight.detach() for m in linears], dim=0)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if out.bias is not None:
        out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return out


def fuse_projections(decoder: Decoder) -> Decoder:
    """The same decoder with q/k/v and gate/up stacked into one matrix each (the export layout).

    One (D -> (H+2KV)*Dh) product instead of three and one (D -> 2*M) instead of two: fewer,
    larger matrix products and a single RoPE over q and k, which is what makes a decode step
    cheap on a runtime that pays per node (ONNX Runtime on a CPU: benchmarks/results/
    decoder_graph.md; OpenVINO folds such graphs itself and runs both layouts alike). Each output
    column is the same dot product as before, so results match the unfused module to float
    rounding. Norms, embeddings and the LM head are shared with ``decoder``, not copied; the
    stacked matrices are new tensors (the model's own stay untouched)."""
    with torch.device("meta"):
        fused = Decoder(decoder.spec, fused=True)
    fused.embed_tokens, fused.norm, fused.rotary = decoder.embed_tokens, decoder.norm, decoder.rotary
    fused.lm_head = decoder.lm_head
    for src, dst in zip(decoder.layers, fused.layers):
        dst.input_layernorm, dst.post_attention_layernorm = src.input_layernorm, src.post_attention_layernorm
        a = src.self_attn
        dst.self_attn.qkv_proj = _stacked([a.q_proj, a.k_proj, a.v_proj])
        dst.self_attn.o_proj = a.o_proj
        dst.mlp.gate_up_proj = _stacked([src.mlp.gate_proj, src.mlp.up_proj])
        dst.mlp.down_proj = src.mlp.down_proj
    return fused.eval()


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
