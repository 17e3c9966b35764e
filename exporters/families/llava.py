"""Export spec for LLaVA (``LlavaForConditionalGeneration``): a CLIP-style vision tower, a
hidden layer picked by ``vision_feature_layer`` (CLS dropped with the "default" strategy),
the two-layer ``multi_modal_projector``, and a Llama language model.

Parts: vision = tower + layer selection + projector; embed = the LM's token embedding;
decoder = the LM as edgevl's Decoder (see hf_text). Preprocessing is the CLIP image
processor's: shortest edge to ``size``, centre crop to ``crop_size`` (or a plain resize to
``height x width`` when the checkpoint does not crop). ``do_pad`` (pad to square first) is not
reproduced and is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgevl.errors import UnsupportedArchitecture
from edgevl.exporters.families.base import ExportableVLM, register
from edgevl.exporters.families.hf_base import (HFFamilySpec, HFReference, check_feature_strategy, eos_ids,
                                               interpolation, normalisation)

DEFAULT_TEMPLATE = "USER: {image}\n{prompt} ASSISTANT:"   # llava-1.5's, for checkpoints with no chat template


class LlavaVision(torch.nn.Module):
    """pixel_values (B, 3, H, W) -> projected features of the chosen hidden layer(s) (B, N, D)."""

    def __init__(self, model, feature_layer, strategy: str):
        super().__init__()
        self.tower, self.projector = model.model.vision_tower, model.model.multi_modal_projector
        self.layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        self.drop_cls = strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
        picked = [hidden[i][:, 1:] if self.drop_cls else hidden[i] for i in self.layers]
        return self.projector(picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1))


def preprocess_spec(ip, where: str) -> tuple[dict, tuple[int, int]]:
    if getattr(ip, "do_pad", False):
        raise UnsupportedArchitecture(f"{where}: image processor do_pad=True (pad to square before resizing) is not "
                                      "supported; supported: shortest-edge resize + centre crop, or a plain resize")
    size, crop = dict(ip.size), dict(getattr(ip, "crop_size", None) or {})
    interp = interpolation(ip.resample, where)
    if ip.do_resize and size.get("shortest_edge") and getattr(ip, "do_center_crop", False):
        out = (crop["height"], crop["width"])
        spec = {"size": list(out), "resize_mode": "shortest_edge_center_crop",
                "resize_shortest": int(size["shortest_edge"]), "interpolation": interp}
    elif ip.do_resize and size.get("height") and not getattr(ip, "do_center_crop", False):
        out = (size["height"], size["width"])
        spec = {"size": list(out), "resize_mode": "stretch", "interpolation": interp}
    else:
        raise UnsupportedArchitecture(f"{where}: image processor with size={size}, do_center_crop="
                                      f"{getattr(ip, 'do_center_crop', None)} is not supported; supported: "
                                      "shortest_edge + centre crop, or height/width without crop")
    return {**spec, **normalisation(ip)}, out


@register
class LlavaSpec(HFFamilySpec):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration", "llava")
    model_class = "LlavaForConditionalGeneration"

    def check_config(self, config, where: str) -> None:
        check_feature_strategy(config, where)

    def load(self, path: Path) -> ExportableVLM:
        from transformers import AutoProcessor

        path = Path(path)
        where, config, arch, model = self.open(path, "LLaVA")
        strategy = config.vision_feature_select_strategy
        processor = AutoProcessor.from_pretrained(path)
        preprocess, out_size = preprocess_spec(processor.image_processor, where)
        ref = HFReference(model, processor, eos_ids(model), default_template=DEFAULT_TEMPLATE)

        def hf_features(px):
            out = model.model.get_image_features(px, vision_feature_layer=config.vision_feature_layer,
                                                 vision_feature_select_strategy=strategy)
            return torch.stack(list(out.pooler_output))
        return self.assemble(path, where, arch, model, config, ref,
                             vision=LlavaVision(model, config.vision_feature_layer, strategy),
                             text_model=model.model.language_model, size=out_size, preprocess=preprocess,
                             hf_features=hf_features)
