"""edgevl-tiny: vision encoder + projector + LLaMA-style decoder, and its generate()."""

from __future__ import annotations

import torch
import torch.nn as nn

from edgevl.models.config import TinyVLMConfig
from edgevl.models.decoder import Decoder, DecoderSpec, KVCache
from edgevl.models.projector import Projector
from edgevl.models.vision import VisionEncoder


def decoder_spec(cfg: TinyVLMConfig) -> DecoderSpec:
    return DecoderSpec(
        hidden_dim=cfg.lm_hidden_dim, n_layers=cfg.lm_n_layers, n_heads=cfg.lm_n_heads,
        n_kv_heads=cfg.lm_n_kv_heads, head_dim=cfg.lm_head_dim, mlp_dim=cfg.lm_mlp_dim,
        vocab_size=cfg.lm_vocab_size, rope_theta=cfg.lm_rope_theta, rms_eps=cfg.lm_rms_eps,
        tie_embeddings=cfg.lm_tie_embeddings)


class TinyVLM(nn.Module):
    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg)
        self.projector = Projector(cfg)
        self.decoder = Decoder(decoder_spec(cfg))
        self.apply(self._init_weights)
        # GPT-2 style: residual-branch outputs start smaller, so deep stacks start near identity
        residual_std = 0.02 / (2 * max(cfg.vit_n_layers, cfg.lm_n_layers)) ** 0.5
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "fc2.weight", "o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            # the conv stem stacks GELU convolutions: a fan-in (He) init keeps its activations
            # from shrinking layer by layer (with std 0.02 shapes were learned ~3x slower)
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) normalised -> image embeddings (B, image_seq_len, lm_hidden_dim)."""
        return self.projector(self.vision(pixels))

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each image token replaced, in order, by an image embedding."""
        x = self.decoder.embed_tokens(input_ids)
        is_image = input_ids == self.cfg.image_token_id
        n_slots = int(is_image.sum())
        if n_slots:
            if image_embeds is None or image_embeds.shape[0] * image_embeds.shape[1] != n_slots:
                got = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
                raise ValueError(f"prompt has {n_slots} image tokens but {got} image embeddings were given")
            x = x.masked_scatter(is_image[..., None], image_embeds.reshape(-1, x.shape[-1]).to(x.dtype))
        return x

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Training/scoring forward: logits (B, T, V) for a batch of one image per row."""
        logits, _, _ = self.decoder(self.embed(input_ids, self.encode_images(pixels)))
        return logits

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """Greedy (temperature 0) or sampled generation; rows may have different prompt lengths
        (right-padded with pad_token_id). Returns new tokens per row, without the EOS."""
        cfg = self.cfg
        b = input_ids.shape[0]
        lengths = (input_ids != cfg.pad_token_id).sum(1)
        cache = KVCache(self.decoder.spec, b, int(lengths.max()) + max_new_tokens)
        embeds = self.embed(input_ids, self.encode_images(pixels) if pixels is not None else None)
        logits, k, v = self.decoder(embeds, cache.keys, cache.values, cache.length)
        cache.write(k, v, n_valid=lengths)
        next_logits = logits[torch.arange(b), lengths - 1]
        outputs: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        for _ in range(max_new_tokens):
            token = sample(next_logits, temperature, top_k, top_p, generator)
            for row in range(b):
                if not done[row]:
                    if int(token[row]) == cfg.eos_token_id:
                        done[row] = True
                    else:
                        outputs[row].append(int(token[row]))
            if bool(done.all()):
                break
            embeds = self.decoder.embed_tokens(token[:, None])
            logits, k, v = self.decoder(embeds, cache.keys, cache.values, cache.length)
            cache.write(k, v)
            next_logits = logits[:, -1]
        return outputs


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]
