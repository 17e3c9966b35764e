"""Export spec for DeepSeek-VL (``DeepseekVLForConditionalGeneration``): a SigLIP vision model,
the two-layer ``aligner`` (linear, GELU, linear) and a Llama language model.

Parts: vision = SigLIP last hidden state (after its post-layernorm) + aligner; embed and
decoder as in hf_llama. Preprocessing is the DeepSeek-VL image processor's: longest edge to
``size`` (short edge rounded, at least ``min_size``), then centred padding to a square filled
with the image mean as 0..255 bytes (``longest_edge_pad``).

The hybrid variant (``DeepseekVLHybridForConditionalGeneration``, SAM + SigLIP towers) is a
different architecture and is not handled here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgevl.errors import UnsupportedArchitecture
from edgevl.exporters.families.base import EmbedPart, ExportableVLM, VisionPart, read_config, register
from edgevl.exporters.families.hf_base import (SAMPLE_PROMPTS, HFFamilySpec, HFReference, check_vision,
                                               derive_prompt, eos_ids, interpolation, normalisation, shipped_files)
from edgevl.exporters.families.hf_llama import check_text_config, llama_to_decoder

DEFAULT_TEMPLATE = "User: {image}{prompt}\n\nAssistant:"


def _vision(modules, pixel_values: torch.Tensor) -> torch.Tensor:
    vision_model, aligner = modules
    return aligner(vision_model(pixel_values).last_hidden_state)


def preprocess_spec(ip, where: str) -> tuple[dict, int]:
    size = dict(ip.size)
    if not ip.do_resize or size.get("height") is None or size.get("height") != size.get("width"):
        raise UnsupportedArchitecture(f"{where}: image processor do_resize={ip.do_resize} size={size} is not "
                                      "supported; supported: do_resize with a square size {'height': N, 'width': N}")
    side = int(size["height"])
    spec = {"size": [side, side], "interpolation": interpolation(ip.resample, where)}
    if getattr(ip, "do_pad", True):
        spec.update(resize_mode="longest_edge_pad", min_size=int(ip.min_size),
                    pad_value=[int(c) for c in ip.background_color])
    else:   # without padding HF keeps the aspect ratio and the output is not square: the encoder needs a square
        raise UnsupportedArchitecture(f"{where}: image processor do_pad=False is not supported (the vision model "
                                      "takes square images); supported: do_pad=True")
    return {**spec, **normalisation(ip)}, side


@register
class DeepseekVLSpec(HFFamilySpec):
    name = "deepseek_vl"
    architectures = ("DeepseekVLForConditionalGeneration", "deepseek_vl")
    model_class = "DeepseekVLForConditionalGeneration"

    def load(self, path: Path) -> ExportableVLM:
        from transformers import AutoConfig, AutoProcessor

        path = Path(path)
        where = f"{path} (DeepSeek-VL)"
        config = AutoConfig.from_pretrained(path)
        check_text_config(config.text_config, where)
        arch, model = self.load_model(path, read_config(path))
        processor = AutoProcessor.from_pretrained(path)
        preprocess, side = preprocess_spec(processor.image_processor, where)
        eos = eos_ids(model)
        ref = HFReference(model, processor, eos, default_template=DEFAULT_TEMPLATE)
        lm = model.model.language_model
        decoder = llama_to_decoder(lm, model.lm_head, config.text_config, where)
        prompt, add_special, tokenizer_file = derive_prompt(ref, path, config.image_token_id, (side, side),
                                                            config.text_config.bos_token_id)
        vision = VisionPart(torch.nn.ModuleList([model.model.vision_model, model.model.aligner]), _vision).eval()
        check_vision(where, vision, lambda px: model.model.get_image_features(px).pooler_output,
                     torch.randn(2, 3, side, side), prompt["image_seq_len"])
        return ExportableVLM(
            name=path.name, family=self.name, architecture=arch, source=str(path),
            vision=vision, embed=EmbedPart(lm.embed_tokens), decoder=decoder,
            pixel_shape=(3, side, side), image_seq_len=prompt["image_seq_len"], preprocess=preprocess,
            prompt=prompt, tokenizer_file=tokenizer_file,
            tokenizer={"bos_token_id": config.text_config.bos_token_id, "eos_token_ids": eos,
                       "pad_token_id": config.text_config.pad_token_id, "add_special_tokens": add_special},
            max_position=int(config.text_config.max_position_embeddings), reference=ref,
            sample_prompts=SAMPLE_PROMPTS, extra_files=shipped_files(path),
        ).eval()
