"""Export spec for InternVL (``InternVLForConditionalGeneration``, the transformers port of
InternVL 2.5/3): InternViT, the layer picked by ``vision_feature_layer`` (CLS dropped with the
"default" strategy), pixel shuffle by ``downsample_ratio``, the MLP projector, and a Qwen2
language model (q/k/v bias: a decoder variant, see hf_text).

Parts: vision = HF's own ``get_image_features`` (tower, selection, pixel shuffle, projector);
embed and decoder as in hf_text.

**Tiling is disabled, on purpose, and the manifest says so** (as SmolVLM's image splitting):
with ``crop_to_patches`` the processor cuts an image into up to ``max_patches`` tiles plus a
thumbnail, so the image block's length depends on the aspect ratio; edgevl bundles encode one
fixed block per image, the processor's ``crop_to_patches=False`` view (one resize to ``size``).
"""

from __future__ import annotations

import logging
from pathlib import Path


from edgevl.exporters.families.base import ExportableVLM, VisionPart, register
from edgevl.exporters.families.hf_base import (HFFamilySpec, HFReference, check_feature_strategy, eos_ids,
                                               image_only_processor, stretch_spec)

NO_TILING = {"crop_to_patches": False}


def preprocess_spec(ip, where: str) -> tuple[dict, tuple[int, int]]:
    spec, out = stretch_spec(ip, where)
    spec["image_splitting"] = {
        "enabled": False, "checkpoint_default": bool(ip.crop_to_patches),
        "why": "edgevl bundles encode each image as one fixed block (the processor's crop_to_patches=False view); "
               "tiling makes the image token count depend on aspect ratio"}
    return spec, out


@register
class InternVLSpec(HFFamilySpec):
    name = "internvl"
    architectures = ("InternVLForConditionalGeneration", "internvl")
    model_class = "InternVLForConditionalGeneration"

    def check_config(self, config, where: str) -> None:
        check_feature_strategy(config, where)

    def load(self, path: Path) -> ExportableVLM:
        import transformers as tf

        path = Path(path)
        where, config, arch, model = self.open(path, "InternVL")
        processor = image_only_processor(tf.InternVLProcessor, path, "image_seq_length")
        ip = processor.image_processor
        preprocess, size = preprocess_spec(ip, where)
        if ip.crop_to_patches:
            logging.getLogger(__name__).warning(
                "%s: tiling is disabled in the bundle (checkpoint default crop_to_patches=True); each image is "
                "encoded as the processor's single resized view, see preprocess.image_splitting", path.name)
        ref = HFReference(model, processor, eos_ids(model), image_kwargs=NO_TILING)
        layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy

        def features(inner, px):
            return inner.get_image_features(px, vision_feature_layer=layer,
                                            vision_feature_select_strategy=strategy).pooler_output
        return self.assemble(path, where, arch, model, config, ref, vision=VisionPart(model.model, features),
                             text_model=model.model.language_model, size=size, preprocess=preprocess,
                             hf_features=lambda px: features(model.model, px))
