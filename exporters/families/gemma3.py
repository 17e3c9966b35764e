"""Export spec for Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP vision tower, the
pooling projector (average pool of the patch grid down to ``mm_tokens_per_image`` tokens, a
(1 + w) RMSNorm, one projection matrix) and a Gemma 3 language model.

Parts: vision = HF's own ``get_image_features`` (tower + projector); embed = Gemma's scaled
embedding module (the sqrt(hidden) scale lives there, image embeddings are merged after it,
unscaled, as HF does); decoder = the Gemma 3 text decoder variants of hf_text plus
``image_bidirectional``: during prefill the image block's tokens attend to each other in both
directions (transformers builds that mask from ``token_type_ids``), on the global and the
sliding-window layers alike. The decoder then takes an ``image_span`` input, which the runtime
computes from the prompt ids (runtimes/image_span.py); a decode step's span is empty.

One image per prompt (``prompt.max_images``): the span input holds one block per row.

**Pan-and-scan is refused.** With ``do_pan_and_scan`` the processor adds up to
``pan_and_scan_max_num_crops`` crops of a wide or tall image, each another full image block,
so the prompt's length depends on the aspect ratio; edgevl bundles encode one fixed block per
image. It is off in Gemma 3's own processor defaults, so a checkpoint that turns it on is
refused before any weight is read, naming the setting, instead of exporting different answers.
Preprocessing without it is one bilinear resize to ``size``, rescale and normalise.
"""

from __future__ import annotations

from pathlib import Path

from edgevl.errors import UnsupportedArchitecture
from edgevl.exporters.families.base import ExportableVLM, VisionPart, register
from edgevl.exporters.families.hf_base import HFFamilySpec, HFReference, eos_ids, stretch_spec

NO_PAN_AND_SCAN = {"do_pan_and_scan": False}
VISION_TOWERS = ("siglip_vision_model",)


def check_pan_and_scan(ip, where: str) -> None:
    if getattr(ip, "do_pan_and_scan", False):
        raise UnsupportedArchitecture(
            f"{where}: Gemma 3 pan-and-scan (do_pan_and_scan=True in the image processor config) is not supported: it "
            "adds crops of wide or tall images, each another image block, so the prompt's length depends on the "
            "aspect ratio, and edgevl bundles encode one fixed block per image. Set \"do_pan_and_scan\": false in "
            "the checkpoint's processor config (Gemma 3's default) to export the single resized view")


@register
class Gemma3Spec(HFFamilySpec):
    name = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration", "gemma3")
    model_class = "Gemma3ForConditionalGeneration"

    def check_config(self, config, where: str) -> None:
        tower = getattr(config.vision_config, "model_type", None)
        if tower not in VISION_TOWERS:
            raise UnsupportedArchitecture(f"{where}: vision tower {tower!r} is not supported; supported: "
                                          f"{', '.join(VISION_TOWERS)}")

    def load(self, path: Path) -> ExportableVLM:
        from transformers import AutoProcessor

        path = Path(path)
        label = f"{path} (Gemma 3)"
        processor = AutoProcessor.from_pretrained(path)
        check_pan_and_scan(processor.image_processor, label)        # before any weight is read
        where, config, arch, model = self.open(path, "Gemma 3")
        preprocess, size = stretch_spec(processor.image_processor, where)
        preprocess["pan_and_scan"] = {"enabled": False, "why": "refused at export: crops make the image block's "
                                      "length depend on aspect ratio"}
        ref = HFReference(model, processor, eos_ids(model), image_kwargs=NO_PAN_AND_SCAN)

        def features(inner, px):
            return inner.get_image_features(px).pooler_output
        vlm = self.assemble(path, where, arch, model, config, ref, vision=VisionPart(model.model, features),
                            text_model=model.model.language_model, size=size, preprocess=preprocess,
                            hf_features=lambda px: features(model.model, px),
                            decoder_variants={"image_bidirectional": True})
        vlm.prompt["max_images"] = 1        # image_span holds one block per prompt
        return vlm
