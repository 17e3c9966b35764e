"""PyTorch eager FP32 reference for a transformers VLM checkpoint (e.g. SmolVLM-256M-shaped).

This is the model as a transformers user runs it: ``AutoProcessor`` makes the inputs (chat
template, image tokens, pixels), ``AutoModelForImageTextToText`` runs them with its
``DynamicCache``; prefill keeps only the last position's logits (``logits_to_keep=1``, what
``generate()`` does). The greedy loop is written out so exactly ``new_tokens`` are decoded.

Image splitting (SmolVLM/Idefics3) is turned off, as edgevl's bundles do (one fixed image block
per image, see exporters/families/smolvlm.py): with it, this row would encode up to 17 crops
where the bundles encode one, and the ratio would measure different work.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

from edgevl.benchmarks.subject import GenerationTiming, Subject
from edgevl.benchmarks.subject_torch import set_threads

IMAGE_INPUTS = ("pixel_values", "pixel_attention_mask", "image_sizes", "images_seq_mask", "images_emb_mask")


class HFTorchSubject(Subject):
    tool = "pytorch"
    backend = "pytorch"

    def _load(self) -> None:
        set_threads(self.threads)
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.net = AutoModelForImageTextToText.from_pretrained(self.model, dtype=torch.float32).eval()
        try:
            self.processor = AutoProcessor.from_pretrained(self.model)
        except (ImportError, ValueError, AttributeError, TypeError):
            # SmolVLMProcessor insists on a video processor, which needs torchvision (MEASURED.md 11)
            from edgevl.exporters.families.smolvlm import image_only_processor

            self.processor = image_only_processor(Path(self.model))
        ip = getattr(self.processor, "image_processor", None)
        self.image_kwargs = {"do_image_splitting": False} if hasattr(ip, "do_image_splitting") else {}
        self.text_config = self.net.config.get_text_config()
        accepted = inspect.signature(self.net.get_image_features).parameters
        self.image_keys = [k for k in IMAGE_INPUTS if k in accepted]

    def _prompt_text(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def _inputs(self, images, prompt: str):
        text = self._prompt_text(prompt)
        return self.processor(text=[text] * len(images), images=[[im] for im in images], return_tensors="pt",
                              **self.image_kwargs)

    def pixels(self, images):
        inputs = self._inputs(images, "describe the image.")
        self.image_tokens = int((inputs["input_ids"][0] == _image_token_id(self.net)).sum())
        return {k: inputs[k] for k in self.image_keys if k in inputs}

    def encode(self, pixels):
        import torch

        with torch.inference_mode():
            return self.net.get_image_features(**pixels)

    def generate(self, images, prompt, new_tokens):
        import torch

        net, batch = self.net, len(images)
        with torch.inference_mode():
            t0 = time.perf_counter()
            inputs = self._inputs(images, prompt)
            out = net(**inputs, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1)
            past = out.past_key_values
            t1 = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = net(input_ids=token[:, None], past_key_values=past, use_cache=True, logits_to_keep=1)
                past = out.past_key_values
                token = out.logits[:, -1].argmax(-1)
            t2 = time.perf_counter()
        return GenerationTiming((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3, new_tokens, batch,
                                int(inputs["input_ids"].shape[1]))

    def decode_at(self, position, steps, batch=1):
        import torch
        from transformers import DynamicCache

        c = self.text_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        shape = (batch, c.num_key_value_heads, position, head_dim)
        past = DynamicCache(ddp_cache_data=[(torch.zeros(shape), torch.zeros(shape))
                                            for _ in range(c.num_hidden_layers)], config=c)
        token = torch.zeros(batch, 1, dtype=torch.int64)
        times = []
        with torch.inference_mode():
            for _ in range(steps):
                t = time.perf_counter()
                out = self.net(input_ids=token, past_key_values=past, use_cache=True, logits_to_keep=1)
                past = out.past_key_values
                out.logits[:, -1].argmax(-1)
                times.append((time.perf_counter() - t) * 1e3)
        return times

    def max_position(self) -> int:
        return int(self.text_config.max_position_embeddings)

    def describe(self) -> dict:
        # one decode step reads the language model's weights and the output head, not the input
        # embedding table (one row per token) nor the vision tower
        decoder = self.net.get_decoder()
        skip = {id(p) for p in self.net.get_input_embeddings().parameters()}
        weights = {id(p): p for p in decoder.parameters() if id(p) not in skip}
        weights.update({id(p): p for p in self.net.get_output_embeddings().parameters()})
        if not hasattr(self, "image_tokens"):
            from edgevl.benchmarks.subject import scene_images

            self.pixels(scene_images(1))
        return {"size_bytes": sum(f.stat().st_size for f in Path(self.model).glob("*.safetensors")),
                "decoder_weight_bytes": sum(p.numel() * p.element_size() for p in weights.values()),
                "image_tokens": self.image_tokens, "processor_overrides": self.image_kwargs}


def _image_token_id(net) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(net.config, name, None)
        if value is not None:
            return int(value)
    return -1
