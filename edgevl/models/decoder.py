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

**Variants.** The language models of the VLM families differ from Llama in a handful of
ways; each is a field of ``DecoderSpec`` whose default reproduces the Llama graph exactly,
so every family keeps this one module, this I/O and this cache contract:
q/k/v bias (Qwen2), q/k RMSNorm over each head (Qwen3, Gemma 3), norms after the attention
and MLP too (Gemma 2/3 "sandwich"), a custom softmax scale (Gemma 3's query_pre_attn_scalar),
GELU-tanh gated MLP (Gemma), sliding-window layers beside global ones with their own RoPE base
(Gemma 3), bidirectional attention inside the image block (Gemma 3: ``image_bidirectional``, with
an extra graph input, ``image_span``), multimodal RoPE over 3-D (temporal, height, width)
positions (Qwen2-VL/2.5-VL: ``mrope_section``, with the extra input ``position_ids``), and the
OPT shape (LayerNorm with bias, a plain fc1 -> ReLU -> fc2 MLP, learned absolute positions
instead of RoPE). Gemma's (1 + w) RMSNorm weight is folded into the weight
by the family mapping (the same product), and its embedding scale lives in the embed part.
``DecoderSpec.variants()`` lists the non-default fields; export records them in the manifest.

**Multimodal RoPE** (``mrope_section``): each of the ``head_dim / 2`` rotary frequencies turns
with one of three position axes: the first ``mrope_section[0]`` with the temporal position, the
next ``mrope_section[1]`` with the height, the rest with the width (HF's order, axis ``i % 3``
of section ``i``). The positions cannot be derived from ``past_len``: text after an image
continues from the image block's largest position, not from its length. So this variant adds
one graph input, ``position_ids`` int64 (3, B, T), the new tokens' positions, which the runtime
computes (runtimes/mrope.py); the cache contract and every mask stay slot-based as before.
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
    # -- variants; defaults are the Llama graph (see the module docstring) --
    qkv_bias: bool = False                  # bias on q/k/v only (Qwen2); attention_bias = q/k/v and o
    qk_norm: bool = False                   # RMSNorm over head_dim on q and k before RoPE
    sandwich_norms: bool = False            # also a norm on the attention output and the MLP output
    attn_scale: float | None = None         # softmax scale; None = head_dim ** -0.5
    norm: str = "rms"                       # "rms" | "layer" (LayerNorm with bias, OPT)
    mlp: str = "gated"                      # "gated": down(act(gate) * up) | "plain": fc2(act(fc1)), OPT
    activation: str = "silu"                # "silu" | "gelu_tanh" | "relu"
    sliding_window: int | None = None       # key window of the "sliding" layers
    layer_types: tuple[str, ...] = ()       # per layer "full" | "sliding"; () = all full
    rope_local_theta: float | None = None   # RoPE base of the sliding layers (Gemma 3); None = rope_theta
    learned_positions: int = 0              # > 0: OPT's learned position table of this size, no RoPE
    position_offset: int = 0                # OPT looks positions up at index + 2
    mrope_section: tuple[int, ...] = ()     # multimodal RoPE: frequencies per (t, h, w) axis; () = 1-D RoPE
    image_bidirectional: bool = False       # tokens of the image block see each other (Gemma 3); input image_span

    def variants(self) -> dict:
        """The variant fields that differ from the Llama defaults (what the manifest records)."""
        base = DecoderSpec(**{f: getattr(self, f) for f in _CORE_FIELDS})
        return {f: (list(v) if isinstance(v, tuple) else v) for f in _VARIANT_FIELDS
                if (v := getattr(self, f)) != getattr(base, f)}

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding"

    def validate(self) -> "DecoderSpec":
        """Refuse combinations the module does not compute, before any weight is read."""
        bad = []
        if self.norm not in ("rms", "layer"):
            bad.append(f"norm={self.norm!r} (supported: rms, layer)")
        if self.mlp not in ("gated", "plain"):
            bad.append(f"mlp={self.mlp!r} (supported: gated, plain)")
        if self.activation not in ACTIVATIONS:
            bad.append(f"activation={self.activation!r} (supported: {', '.join(ACTIVATIONS)})")
        if self.layer_types and (len(self.layer_types) != self.n_layers
                                 or set(self.layer_types) - {"full", "sliding"}):
            bad.append(f"layer_types={self.layer_types} (one of full/sliding per layer, {self.n_layers} layers)")
        if "sliding" in self.layer_types and not self.sliding_window:
            bad.append("sliding layers without a sliding_window")
        if self.learned_positions and (self.rope_local_theta or "sliding" in self.layer_types):
            bad.append("learned positions with sliding-window RoPE layers")
        if self.mrope_section and (sum(self.mrope_section) != self.head_dim // 2 or self.learned_positions
                                   or self.rope_local_theta is not None):
            bad.append(f"mrope_section={self.mrope_section} (its sizes must add up to head_dim / 2 = "
                       f"{self.head_dim // 2}, with one RoPE table and no learned positions)")
        if self.n_heads % self.n_kv_heads:
            bad.append(f"n_heads={self.n_heads} not a multiple of n_kv_heads={self.n_kv_heads}")
        if bad:
            from edgevl.errors import UnsupportedArchitecture
            raise UnsupportedArchitecture("decoder settings not supported: " + "; ".join(bad))
        return self


_CORE_FIELDS = ("hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim", "vocab_size")
_VARIANT_FIELDS = ("qkv_bias", "qk_norm", "sandwich_norms", "attn_scale", "norm", "mlp", "activation",
                   "sliding_window", "layer_types", "rope_local_theta", "learned_positions", "position_offset",
                   "mrope_section", "image_bidirectional")
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


# variants the Llama-graph readers (exporters/lower/) handle: a bias on the q/k/v products (Qwen2)
# is an Add in the product's scope, which the lowering carries over
LLAMA_GRAPH_VARIANTS = ("qkv_bias",)


def llama_graph_blockers(decoder_section: dict) -> dict:
    """The manifest's ``decoder.variants`` a Llama-graph reader cannot handle ({} when it can)."""
    variants = decoder_section.get("variants") or {}
    return {k: v for k, v in variants.items() if k not in LLAMA_GRAPH_VARIANTS}


def require_llama_graph(decoder_section: dict, what: str) -> None:
    """Refuse a tool that reads the decoder graph as the Llama graph (exporters/lower/ matches
    its nodes by name and shape) when the bundle's decoder has variant fields it does not handle
    (manifest ``decoder.variants``); the portable decoder ONNX runs everywhere and stays the answer."""
    blockers = llama_graph_blockers(decoder_section)
    if blockers:
        from edgevl.errors import UnsupportedArchitecture
        raise UnsupportedArchitecture(
            f"{what} reads Llama-shaped decoders only (with {', '.join(LLAMA_GRAPH_VARIANTS)}); this bundle's "
            f"decoder has the variants {', '.join(f'{k}={v}' for k, v in blockers.items())}. Use the portable "
            "decoder (parts.decoder.onnx), which every backend runs")


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


def make_norm(spec: DecoderSpec, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=spec.rms_eps) if spec.norm == "layer" else RMSNorm(dim, spec.rms_eps)


class RotaryEmbedding(nn.Module):
    """HF LLaMA convention: frequencies concatenated (not interleaved), rotate_half."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, per_frequency: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T), or (B, T, Dh/2) with ``per_frequency`` (multimodal RoPE: each
        frequency's own position)."""
        freqs = (positions.float() if per_frequency else positions.float()[..., None]) * self.inv_freq  # (B, T, Dh/2)
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
    (the same products, one node fewer per use). The ``*_local`` fields exist only for a
    decoder with sliding-window layers: their own rotary tables and window masks."""
    b: int
    t: int
    cos: torch.Tensor | None           # (B, 1, T, Dh); None with learned positions
    sin: torch.Tensor | None           # (B, 1, T, Dh), signed
    causal_masked: torch.Tensor        # (rep*T, T) bool, True where a new token must not look;
                                       # (B, 1, rep*T, T) with an image block (image_bidirectional)
    past_masked: torch.Tensor | None   # (B, 1, 1, C) bool, True for cache slots not yet written
    capacity: int = 0
    cos_local: torch.Tensor | None = None
    sin_local: torch.Tensor | None = None
    causal_masked_local: torch.Tensor | None = None   # (B, 1, rep*T, T): causal and outside the window
    past_masked_local: torch.Tensor | None = None     # (B, 1, rep*T, C)


def swap_halves(x: torch.Tensor, half: int) -> torch.Tensor:
    """(x1, x2) -> (x2, x1) over the last axis; ``half`` is a Python int so no shape is read."""
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """``fused=True`` holds one ``qkv_proj`` (the q, k and v weights stacked) instead of three:
    the export layout (see ``fuse_projections``)."""

    def __init__(self, spec: DecoderSpec, fused: bool = False, sliding: bool = False):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.rep = spec.n_heads // spec.n_kv_heads
        self.scale = spec.attn_scale if spec.attn_scale is not None else spec.head_dim**-0.5
        self.sliding = sliding
        in_bias = spec.attention_bias or spec.qkv_bias
        if fused:
            self.qkv_proj = nn.Linear(spec.hidden_dim, (spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim,
                                      bias=in_bias)
        else:
            self.q_proj = nn.Linear(spec.hidden_dim, spec.n_heads * spec.head_dim, bias=in_bias)
            self.k_proj = nn.Linear(spec.hidden_dim, spec.n_kv_heads * spec.head_dim, bias=in_bias)
            self.v_proj = nn.Linear(spec.hidden_dim, spec.n_kv_heads * spec.head_dim, bias=in_bias)
        self.o_proj = nn.Linear(spec.n_heads * spec.head_dim, spec.hidden_dim, bias=spec.attention_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_eps)

    def forward(self, x, step: Step, past_k, past_v):
        """x (B, T, D); past_k/v (B, KV, C, Dh) or None."""
        b, t = step.b, step.t
        h, kv, rep, dh = self.n_heads, self.n_kv, self.rep, self.head_dim
        cos, sin = (step.cos_local, step.sin_local) if self.sliding and step.cos_local is not None else (step.cos,
                                                                                                         step.sin)
        if hasattr(self, "qkv_proj"):
            qkv = self.qkv_proj(x).view(b, t, h + 2 * kv, dh)
            if hasattr(self, "q_norm"):
                qkv = torch.cat((self.q_norm(qkv[:, :, :h]), self.k_norm(qkv[:, :, h:h + kv]), qkv[:, :, h + kv:]),
                                dim=2)
            qkv = qkv.transpose(1, 2)                                          # (B, H+2KV, T, Dh)
            qk = qkv[:, :h + kv]
            if cos is not None:
                qk = qk * cos + swap_halves(qk, dh // 2) * sin                 # RoPE on q and k at once
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kv:]
        else:
            q = self.q_proj(x).view(b, t, h, dh)
            k = self.k_proj(x).view(b, t, kv, dh)
            if hasattr(self, "q_norm"):
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)                        # (B, H, T, Dh), (B, KV, T, Dh)
            v = self.v_proj(x).view(b, t, kv, dh).transpose(1, 2)
            if cos is not None:
                q = q * cos + swap_halves(q, dh // 2) * sin
                k = k * cos + swap_halves(k, dh // 2) * sin
        causal_masked, past_masked = step.causal_masked, step.past_masked
        if self.sliding:
            causal_masked, past_masked = step.causal_masked_local, step.past_masked_local
        # group the query heads that share a KV head: (B, KV, rep*T, Dh)
        qg = q.reshape(b, kv, rep * t, dh) * self.scale
        neg = torch.finfo(qg.dtype).min
        scores_new = (qg @ k.transpose(-1, -2)).masked_fill(causal_masked, neg)  # (B, KV, rep*T, T)
        if past_k is None:
            out = scores_new.softmax(-1) @ v
        else:
            scores_past = (qg @ past_k.transpose(-1, -2)).masked_fill(past_masked, neg)
            probs = torch.cat((scores_past, scores_new), dim=-1).softmax(-1)
            c = step.capacity
            out = probs[..., :c] @ past_v + probs[..., c:] @ v             # (B, KV, rep*T, Dh)
        out = out.reshape(b, self.n_heads, t, dh).transpose(1, 2).reshape(b, t, self.n_heads * dh)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    """``fused=True`` holds one ``gate_up_proj`` (gate and up weights stacked). A "plain" MLP
    (OPT's fc1 -> act -> fc2) has only ``up_proj`` and ``down_proj``."""

    def __init__(self, spec: DecoderSpec, fused: bool = False):
        super().__init__()
        self.mlp_dim = spec.mlp_dim
        self.act = ACTIVATIONS[spec.activation]
        if spec.mlp == "plain":
            self.up_proj = nn.Linear(spec.hidden_dim, spec.mlp_dim, bias=spec.mlp_bias)
        elif fused:
            self.gate_up_proj = nn.Linear(spec.hidden_dim, 2 * spec.mlp_dim, bias=spec.mlp_bias)
        else:
            self.gate_proj = nn.Linear(spec.hidden_dim, spec.mlp_dim, bias=spec.mlp_bias)
            self.up_proj = nn.Linear(spec.hidden_dim, spec.mlp_dim, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.mlp_dim, spec.hidden_dim, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate_up = self.gate_up_proj(x)
            return self.down_proj(self.act(gate_up[..., :self.mlp_dim]) * gate_up[..., self.mlp_dim:])
        if not hasattr(self, "gate_proj"):
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block. With ``sandwich_norms`` (Gemma 2/3) the attention output and the MLP
    output are normed too before their residual adds (``post_attn_norm``, ``post_mlp_norm``);
    ``post_attention_layernorm`` is always the norm in front of the MLP."""

    def __init__(self, spec: DecoderSpec, fused: bool = False, sliding: bool = False):
        super().__init__()
        self.input_layernorm = make_norm(spec, spec.hidden_dim)
        self.self_attn = Attention(spec, fused, sliding)
        self.post_attention_layernorm = make_norm(spec, spec.hidden_dim)
        self.mlp = MLP(spec, fused)
        if spec.sandwich_norms:
            self.post_attn_norm = make_norm(spec, spec.hidden_dim)
            self.post_mlp_norm = make_norm(spec, spec.hidden_dim)

    def forward(self, x, step: Step, past_k, past_v):
        h, k, v = self.self_attn(self.input_layernorm(x), step, past_k, past_v)
        if hasattr(self, "post_attn_norm"):
            x = x + self.post_attn_norm(h)
            return x + self.post_mlp_norm(self.mlp(self.post_attention_layernorm(x))), k, v
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


def mrope_axis(section: tuple[int, ...]) -> torch.Tensor:
    """Which position axis (0 t, 1 h, 2 w) each rotary frequency reads: section i uses axis i % 3."""
    return torch.tensor([i % 3 for i, n in enumerate(section) for _ in range(n)], dtype=torch.int64)


class Decoder(nn.Module):
    """inputs_embeds (B, T, D) + cache -> logits (B, T, V) and the new tokens' keys/values."""

    def __init__(self, spec: DecoderSpec, fused: bool = False):
        super().__init__()
        spec.validate()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_dim)
        self.layers = nn.ModuleList(DecoderLayer(spec, fused, spec.is_sliding(i)) for i in range(spec.n_layers))
        self.norm = make_norm(spec, spec.hidden_dim)
        if not spec.learned_positions:
            self.rotary = RotaryEmbedding(spec.head_dim, spec.rope_theta)
        if spec.rope_local_theta is not None:
            self.rotary_local = RotaryEmbedding(spec.head_dim, spec.rope_local_theta)
        if spec.learned_positions:
            self.embed_positions = nn.Embedding(spec.learned_positions, spec.hidden_dim)
        if spec.mrope_section:
            self.register_buffer("mrope_axis", mrope_axis(spec.mrope_section), persistent=False)
        self.lm_head = nn.Linear(spec.hidden_dim, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _signed(self, rotary, positions, per_frequency: bool = False):
        cos, sin = rotary(positions, per_frequency)
        half = self.spec.head_dim // 2
        return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def forward(self, inputs_embeds, past_keys=None, past_values=None, past_len=None, last_only=False,
                position_ids=None, image_span=None):
        """``position_ids`` (3, B, T): the new tokens' (t, h, w) positions, used with ``mrope_section``
        only; None there means text positions (past_len + i on all three axes). ``image_span``
        (B, 2) int64, only with ``spec.image_bidirectional``: the [start, end) absolute positions
        of the image block among this call's tokens (start == end: none)."""
        b, t, _ = inputs_embeds.shape
        device = inputs_embeds.device
        spec = self.spec
        if past_len is None:
            past_len = torch.zeros(b, dtype=torch.int64, device=device)
        positions = past_len[:, None] + torch.arange(t, device=device)[None, :]
        cos = signed_sin = None
        if spec.learned_positions:
            inputs_embeds = inputs_embeds + self.embed_positions(positions + spec.position_offset)
        elif spec.mrope_section:
            mrope = positions[None].expand(3, b, t) if position_ids is None else position_ids
            cos, signed_sin = self._signed(self.rotary, mrope.permute(1, 2, 0)[..., self.mrope_axis], True)
        else:
            cos, signed_sin = self._signed(self.rotary, positions)
        rep = spec.n_heads // spec.n_kv_heads
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril().repeat(rep, 1)   # (rep*T, T)
        new_masked = ~causal
        if spec.image_bidirectional:
            if image_span is None:
                raise ValueError("this decoder attends bidirectionally inside the image block: pass image_span "
                                 "(B, 2), [start, end) positions of the block, start == end for none")
            new_masked = new_masked & ~self._image_block(positions, image_span, rep)
        capacity, past_masked = 0, None
        if past_keys is not None:
            capacity = past_keys[0].shape[2]
            past_valid = torch.arange(capacity, device=device)[None, :] < past_len[:, None]
            past_masked = ~past_valid[:, None, None, :]                      # (B, 1, 1, C)
        local = {}
        if "sliding" in spec.layer_types:
            local = self._window_masks(positions, new_masked, past_masked, capacity, rep, device)
            if hasattr(self, "rotary_local"):
                local["cos_local"], local["sin_local"] = self._signed(self.rotary_local, positions)
            else:
                local["cos_local"], local["sin_local"] = cos, signed_sin
        step = Step(b, t, cos, signed_sin, new_masked, past_masked, capacity, **local)
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

    @staticmethod
    def _image_block(positions, image_span, rep):
        """(B, 1, rep*T, T) bool: query and key both inside the row's image block. HF's Gemma 3
        ORs this into the causal mask (blockwise_overlay over token_type_ids), so a query of the
        block also sees the block's later keys. Keys in the cache come before every new token,
        so the causal mask already shows them: only the new tokens' mask changes."""
        inside = (positions >= image_span[:, :1]) & (positions < image_span[:, 1:])   # (B, T)
        return inside.repeat(1, rep)[:, None, :, None] & inside[:, None, None, :]

    def _window_masks(self, positions, new_masked, past_masked, capacity, rep, device) -> dict:
        """Masks of the sliding layers: a key at position j is seen from position i only if
        j > i - sliding_window (HF's sliding_window_overlay), on top of the causal (or image block)
        mask ``new_masked``, as HF's AND(window, OR(causal, block)). Cache slot s holds position s."""
        window = self.spec.sliding_window
        q_pos = positions.repeat(1, rep)[:, None, :, None]                        # (B, 1, rep*T, 1)
        new_pos = positions[:, None, None, :]                                     # (B, 1, 1, T)
        out = {"causal_masked_local": new_masked | (new_pos <= q_pos - window)}   # (B, 1, rep*T, T)
        if past_masked is not None:
            slots = torch.arange(capacity, device=device)[None, None, None, :]
            out["past_masked_local"] = past_masked | (slots <= q_pos - window)   # (B, 1, rep*T, C)
        return out


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
    for name in ("embed_tokens", "norm", "rotary", "rotary_local", "embed_positions", "lm_head", "mrope_axis"):
        if hasattr(decoder, name):
            setattr(fused, name, getattr(decoder, name))
    for src, dst in zip(decoder.layers, fused.layers):
        for name in ("input_layernorm", "post_attention_layernorm", "post_attn_norm", "post_mlp_norm"):
            if hasattr(src, name):
                setattr(dst, name, getattr(src, name))
        a = src.self_attn
        dst.self_attn.qkv_proj = _stacked([a.q_proj, a.k_proj, a.v_proj])
        dst.self_attn.o_proj = a.o_proj
        if hasattr(a, "q_norm"):
            dst.self_attn.q_norm, dst.self_attn.k_norm = a.q_norm, a.k_norm
        if hasattr(src.mlp, "gate_proj"):
            dst.mlp.gate_up_proj = _stacked([src.mlp.gate_proj, src.mlp.up_proj])
        else:
            dst.mlp.up_proj = src.mlp.up_proj
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
