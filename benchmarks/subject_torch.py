"""PyTorch eager FP32: the reference every other row is divided by.

- edgevl-tiny: ``edgevl.models`` (TinyVLM, its preallocated KV cache, its preprocessing);
- a transformers VLM (e.g. the SmolVLM-256M-shaped config): the transformers model itself with
  its DynamicCache, as a user of transformers runs it (see subject_hf.py).

Both run under ``torch.inference_mode`` with ``torch.set_num_threads(threads)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgevl.benchmarks.subject import GenerationTiming, Subject


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:            # already set once in this process
            pass


class TinyTorchSubject(Subject):
    tool = "pytorch"
    backend = "pytorch"

    def _load(self) -> None:
        set_threads(self.threads)
        from edgevl.exporters.families.edgevl_tiny import TinyReference
        from edgevl.models.checkpoint import load_checkpoint

        self.net, self.tokenizer = load_checkpoint(self.model)
        self.reference = TinyReference(self.net, self.tokenizer)

    def pixels(self, images):
        return self.reference.pixels(images)

    def encode(self, pixels):
        import torch

        with torch.inference_mode():
            return self.net.encode_images(pixels)

    def generate(self, images, prompt, new_tokens):
        import torch

        from edgevl.models.decoder import KVCache

        net, batch = self.net, len(images)
        with torch.inference_mode():
            t0 = time.perf_counter()
            pixels = self.reference.pixels(images)
            ids = torch.tensor([self.reference.input_ids(prompt, 1)] * batch)
            embeds = net.embed(ids, net.encode_images(pixels))
            cache = KVCache(net.decoder.spec, batch, ids.shape[1] + new_tokens)
            logits, k, v = net.decoder(embeds, cache.keys, cache.values, cache.length, last_only=True)
            cache.write(k, v)
            token = logits[:, -1].argmax(-1)
            t1 = time.perf_counter()
            for _ in range(new_tokens - 1):
                logits, k, v = net.decoder(net.decoder.embed_tokens(token[:, None]), cache.keys, cache.values,
                                           cache.length)
                cache.write(k, v)
                token = logits[:, -1].argmax(-1)
            t2 = time.perf_counter()
        return GenerationTiming((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3, new_tokens, batch, ids.shape[1])

    def decode_at(self, position, steps, batch=1):
        import torch

        from edgevl.models.decoder import KVCache

        dec = self.net.decoder
        cache = KVCache(dec.spec, batch, position + steps)
        cache.length[:] = position
        token = torch.zeros(batch, 1, dtype=torch.int64)
        times = []
        with torch.inference_mode():
            for _ in range(steps):
                t = time.perf_counter()
                logits, k, v = dec(dec.embed_tokens(token), cache.keys, cache.values, cache.length)
                cache.write(k, v)
                logits[:, -1].argmax(-1)
                times.append((time.perf_counter() - t) * 1e3)
        return times

    def max_position(self) -> int:
        return int(self.net.cfg.lm_max_position)

    def describe(self) -> dict:
        dec = self.net.decoder
        # one step reads every decoder weight once; tied embeddings are read once (as lm_head)
        weights = {id(p): p for p in dec.parameters()}
        return {"size_bytes": sum(f.stat().st_size for f in Path(_checkpoint_dir(self.model)).glob("*.safetensors")),
                "decoder_weight_bytes": sum(p.numel() * p.element_size() for p in weights.values()),
                "image_tokens": int(self.net.cfg.image_seq_len)}

    def answerer(self):
        from edgevl.models.reference import TorchAnswerer

        return TorchAnswerer(self.net, self.tokenizer)


def _checkpoint_dir(model) -> Path:
    from edgevl.models.checkpoint import EMBEDDED_DIR, EMBEDDED_NAME

    return EMBEDDED_DIR if str(model) == EMBEDDED_NAME else Path(model)
