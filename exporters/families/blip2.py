"""Export spec for BLIP-2 (``Blip2ForConditionalGeneration`` with an OPT language model): a ViT,
the Q-Former whose ``num_query_tokens`` learned queries cross-attend to the image, the
``language_projection``, and OPT (LayerNorm, ReLU MLP, learned positions: a decoder variant,
see hf_text).

Parts: vision = HF's own ``get_image_features`` (ViT + Q-Former + projection), one block of
``num_query_tokens`` embeddings per image; embed and decoder as in hf_text.

The prompt is BLIP-2's: the processor puts the image block *before* the BOS token and the text
(there is no chat template), so the template is ``{image}</s>{prompt}`` with the tokenizer's BOS
written out, proved against the processor's ids like every family. BLIP-2 takes one image per
prompt; the manifest says so (``prompt.max_images``). The Flan-T5 variants (an encoder-decoder
language model) are refused: edgevl's decoder contract is decoder-only.
"""

from __future__ import annotations

from pathlib import Path

from edgevl.errors import ExportError, UnsupportedArchitecture
from edgevl.exporters.families.base import ExportableVLM, VisionPart, register
from edgevl.exporters.families.hf_base import HFFamilySpec, HFReference, eos_ids, stretch_spec


class Blip2Reference(HFReference):
    """BLIP-2's processor: the text as given (no chat template), image tokens put in front."""

    def __init__(self, model, processor, eos):
        super().__init__(model, processor, eos)
        self.image_token = str(getattr(processor.image_token, "content", processor.image_token))
        self.n_queries = int(processor.num_query_tokens)

    def text(self, prompt: str, n_images: int = 1) -> str:
        if n_images > 1:
            raise ExportError(f"BLIP-2 takes one image per prompt, not {n_images}")
        return prompt

    def image_block(self, size) -> str:
        return self.image_token * self.n_queries

    def prompt_layout(self) -> tuple[str, str]:
        bos = self.processor.tokenizer.bos_token or ""
        return "{image}" + bos + "{prompt}", ""

    def input_ids(self, prompt: str, n_images: int = 1) -> list[int]:
        out = self.processor(text=self.text(prompt, n_images), images=self.blank_images(n_images, (32, 32)) or None)
        return [int(i) for i in out["input_ids"][0]]


@register
class Blip2Spec(HFFamilySpec):
    name = "blip2"
    architectures = ("Blip2ForConditionalGeneration", "blip-2")
    model_class = "Blip2ForConditionalGeneration"

    def check_config(self, config, where: str) -> None:
        if config.text_config.model_type != "opt":
            raise UnsupportedArchitecture(f"{where}: BLIP-2 with a {config.text_config.model_type!r} language model "
                                          "is not supported (Flan-T5 is encoder-decoder); supported: OPT")

    def load(self, path: Path) -> ExportableVLM:
        from transformers import AutoProcessor

        path = Path(path)
        where, config, arch, model = self.open(path, "BLIP-2")
        processor = AutoProcessor.from_pretrained(path)
        preprocess, size = stretch_spec(processor.image_processor, where)
        ref = Blip2Reference(model, processor, eos_ids(model))
        lm = model.language_model

        def features(inner, px):
            return inner.get_image_features(px).pooler_output
        # the Q-Former and projection are Blip2's own modules: the vision part runs the HF model's code
        vlm = self.assemble(path, where, arch, model, config, ref, vision=VisionPart(model, features),
                            text_model=lm.model.decoder, lm_head=lm.lm_head, size=size, preprocess=preprocess,
                            hf_features=lambda px: features(model, px))
        vlm.prompt["max_images"] = 1
        return vlm
