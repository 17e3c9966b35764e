"""Export spec for edgevl-tiny, the embedded default (edgevl.models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgevl.exporters.families.base import (EmbedPart, ExportableVLM, FamilySpec, Reference, VisionPart,
                                            register)
from edgevl.models.checkpoint import EMBEDDED_DIR, load_checkpoint
from edgevl.models.reference import encode_prompt, preprocess
from edgevl.models.tokenizer import IMAGE, PROMPT_TEMPLATE
from edgevl.models.vlm import TinyVLM


class TinyReference(Reference):
    def __init__(self, model: TinyVLM, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        from PIL import Image

        size = self.model.cfg.vit_image_size
        resized = [im if im.shape[:2] == (size, size)
                   else np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
                   for im in images]
        return preprocess(resized, self.model.cfg)

    def input_ids(self, prompt: str, n_images: int = 1) -> list[int]:
        if n_images != 1:
            raise ValueError("edgevl-tiny takes exactly one image per prompt")
        return encode_prompt(self.tokenizer, self.model.cfg, prompt)

    @torch.no_grad()
    def generate(self, images, prompt, max_new_tokens):
        ids = torch.tensor([self.input_ids(prompt, len(images))])
        return self.model.generate(self.pixels(images), ids, max_new_tokens=max_new_tokens)[0]


@register
class EdgeVLTinySpec(FamilySpec):
    name = "edgevl-tiny"
    architectures = ("EdgeVLTiny", "edgevl-tiny")
    required_files = ("config.json", "model.safetensors", "tokenizer.json")

    @classmethod
    def matches(cls, config: dict) -> bool:
        return "vit_image_size" in config and "lm_hidden_dim" in config

    def load(self, path: Path) -> ExportableVLM:
        model, tokenizer = load_checkpoint(path)
        cfg = model.cfg
        return ExportableVLM(
            name="edgevl-tiny" if Path(path) == EMBEDDED_DIR else Path(path).name,
            family=self.name, architecture="TinyVLM", source=str(path),
            vision=VisionPart(model, lambda m, px: m.encode_images(px)),
            embed=EmbedPart(model.decoder.embed_tokens),
            decoder=model.decoder,
            pixel_shape=(3, cfg.vit_image_size, cfg.vit_image_size),
            image_seq_len=cfg.image_seq_len,
            preprocess={"size": [cfg.vit_image_size, cfg.vit_image_size], "resize_mode": "stretch",
                        "interpolation": "bilinear", "rescale": 1 / 255, "mean": list(cfg.image_mean),
                        "std": list(cfg.image_std), "channel_order": "RGB"},
            prompt={"template": PROMPT_TEMPLATE, "image_block": IMAGE * cfg.image_seq_len,
                    "image_token_id": cfg.image_token_id, "image_seq_len": cfg.image_seq_len},
            tokenizer_file=Path(path) / "tokenizer.json",
            tokenizer={"bos_token_id": cfg.bos_token_id, "eos_token_ids": [cfg.eos_token_id],
                       "pad_token_id": cfg.pad_token_id, "add_special_tokens": False},
            max_position=cfg.lm_max_position,
            reference=TinyReference(model, tokenizer),
            generation={"max_new_tokens": 32, "temperature": 0.0},
            sample_prompts=("how many shapes are there?", "what color is the circle?", "describe the image."),
        ).eval()
