"""Export spec for DeepSeek-VL (``DeepseekVLForConditionalGeneration``): a SigLIP vision model,
the two-layer ``aligner`` (linear, GELU, linear) and a Llama language model.

Parts: vision = SigLIP last hidden state (after its post-layernorm) + aligner; embed and
decoder as in hf_text. Preprocessing is the DeepSeek-VL image processor's: longest edge to
``size`` (short edge rounded, at least ``min_size``), then centred padding to a square filled
with the image mean as 0..255 bytes (``longest_edge_pad``).

The hybrid variant (``DeepseekVLHybridForConditionalGeneration``, SAM + SigLIP towers) is a
different architecture and is not handled here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgevl.errors import UnsupportedArchitecture
from edgevl.exporters.families.base import ExportableVLM, VisionPart, register
from edgevl.exporters.families.hf_base import HFFamilySpec, HFReference, eos_ids, interpolation, normalisation

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
        from transformers import AutoProcessor

        path = Path(path)
        where, config, arch, model = self.open(path, "DeepSeek-VL")
        processor = AutoProcessor.from_pretrained(path)
        preprocess, side = preprocess_spec(processor.image_processor, where)
        ref = HFReference(model, processor, eos_ids(model), default_template=DEFAULT_TEMPLATE)
        vision = VisionPart(torch.nn.ModuleList([model.model.vision_model, model.model.aligner]), _vision)
        return self.assemble(path, where, arch, model, config, ref, vision=vision,
                             text_model=model.model.language_model, size=(side, side), preprocess=preprocess,
                             hf_features=lambda px: model.model.get_image_features(px).pooler_output)
