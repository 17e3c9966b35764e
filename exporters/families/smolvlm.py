"""Export spec for SmolVLM (``SmolVLMForConditionalGeneration``) and its parent Idefics3
(``Idefics3ForConditionalGeneration``, which is what the SmolVLM-256M/500M checkpoints declare).

Both are a SigLIP-style vision transformer, a connector (pixel shuffle by ``scale_factor``,
then one linear layer) and a Llama language model; the modules have the same names in both.

Parts: vision = patch embedding + position embedding of a full (unpadded) image + encoder +
post-layernorm + connector; embed and decoder as in hf_text.

**Image splitting is disabled, on purpose, and the manifest says so.** With
``do_image_splitting`` the processor cuts an image into a grid of up to
``(size / max_image_size)^2`` crops plus a global view, and the prompt's image block (and the
number of image tokens) then depends on each image's aspect ratio. edgevl's bundle contract is
one fixed image block of ``image_seq_len`` tokens per image, which is what batching, KV-cache
sizing and latency budgets on a device rely on; splitting would also multiply vision cost by
up to 17x on SmolVLM-256M (4x4 crops + global). So the bundle encodes every image the way the
processor does with ``do_image_splitting=False`` (the global view alone), the reference checks
use that setting too, and ``preprocess.image_splitting`` records the decision and the
checkpoint's own default.

Preprocessing without splitting is two Lanczos resizes, reproduced exactly by
``longest_edge_even_then_stretch``: longest edge to ``size.longest_edge`` (aspect kept, the
short edge rounded up to even), then a plain resize to ``max_image_size`` square.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from edgevl.errors import UnsupportedArchitecture
from edgevl.exporters.families.base import ExportableVLM, register
from edgevl.exporters.families.hf_base import HFFamilySpec, HFReference, eos_ids, interpolation, normalisation
from edgevl.exporters.families.hf_base import image_only_processor as hf_image_only_processor

DEFAULT_TEMPLATE = "<|im_start|>User:{image}{prompt}<end_of_utterance>\nAssistant:"
NO_SPLITTING = {"do_image_splitting": False}


def full_image_position_ids(num_patches_per_side: int, grid: int) -> torch.Tensor:
    """The position ids SmolVLM/Idefics3 embeddings give a full, unpadded ``grid x grid`` image
    (their bucketize over fractional coordinates, with an all-ones patch mask)."""
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side)
    n = torch.tensor([grid])
    coords = torch.arange(grid, dtype=torch.float32)[None, :] * (1.0 / n)[:, None]
    buckets = torch.bucketize(torch.clamp(coords, max=(1.0 - 1e-6)), boundaries, right=True)
    return (buckets[:, :, None] * num_patches_per_side + buckets[:, None, :]).reshape(1, -1)


class Idefics3Vision(torch.nn.Module):
    """pixel_values (B, 3, S, S) -> connector output (B, (S/patch)^2 / scale^2, D)."""

    def __init__(self, model, image_size: int):
        super().__init__()
        vm = model.model.vision_model
        self.patch_embedding, self.position_embedding = vm.embeddings.patch_embedding, vm.embeddings.position_embedding
        self.encoder, self.post_layernorm, self.connector = vm.encoder, vm.post_layernorm, model.model.connector
        grid = image_size // vm.embeddings.patch_size
        self.register_buffer("position_ids", full_image_position_ids(vm.embeddings.num_patches_per_side, grid),
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)          # (B, N, C)
        x = x + self.position_embedding(self.position_ids)
        x = self.post_layernorm(self.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state)
        return self.connector(x)


def preprocess_spec(ip, where: str) -> tuple[dict, int]:
    side = int(ip.max_image_size["longest_edge"])
    interp = interpolation(ip.resample, where)
    if ip.do_resize:
        if not dict(ip.size).get("longest_edge"):
            raise UnsupportedArchitecture(f"{where}: image processor size={dict(ip.size)} is not supported; "
                                          "supported: size={'longest_edge': N}")
        spec = {"size": [side, side], "resize_mode": "longest_edge_even_then_stretch",
                "resize_longest": int(ip.size["longest_edge"]), "interpolation": interp}
    else:
        spec = {"size": [side, side], "resize_mode": "stretch", "interpolation": interp}
    spec["image_splitting"] = {
        "enabled": False, "checkpoint_default": bool(ip.do_image_splitting),
        "why": "edgevl bundles encode each image as one fixed block (the processor's do_image_splitting=False "
               "global view); splitting makes the image token count depend on aspect ratio"}
    return {**spec, **normalisation(ip)}, side


def image_only_processor(path: Path):
    """SmolVLMProcessor without its video processor (see hf_base.image_only_processor)."""
    import transformers as tf

    return hf_image_only_processor(tf.SmolVLMProcessor, path, "image_seq_len")


@register
class SmolVLMSpec(HFFamilySpec):
    name = "smolvlm"
    architectures = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration", "smolvlm", "idefics3")
    model_class = "SmolVLMForConditionalGeneration"

    def load(self, path: Path) -> ExportableVLM:
        from transformers import AutoProcessor

        path = Path(path)
        where, config, arch, model = self.open(path, "SmolVLM/Idefics3")
        processor = AutoProcessor.from_pretrained(path) if arch.startswith("Idefics3") else image_only_processor(path)
        ip = processor.image_processor
        preprocess, side = preprocess_spec(ip, where)
        if ip.do_image_splitting:
            logging.getLogger(__name__).warning(
                "%s: image splitting is disabled in the bundle (checkpoint default do_image_splitting=True); each "
                "image is encoded as the processor's global view, see preprocess.image_splitting", path.name)
        ref = HFReference(model, processor, eos_ids(model), image_kwargs=NO_SPLITTING,
                          default_template=DEFAULT_TEMPLATE)
        return self.assemble(path, where, arch, model, config, ref, vision=Idefics3Vision(model, side),
                             text_model=model.model.text_model, size=(side, side), preprocess=preprocess,
                             hf_features=lambda px: model.model.get_image_features(px[:, None]).pooler_output[0],
                             check_batch=1)
