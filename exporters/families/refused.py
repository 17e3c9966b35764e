"""Families edgevl recognises but does not export yet, each refused with what is missing.

A checkpoint of these architectures is refused in ``resolve_family`` (before any weight is
read) with the reason, instead of the generic "architecture not supported": the user learns
what would be needed and what to use meanwhile. A family that is half done is refused here,
not shipped with answers that differ from transformers.
"""

from __future__ import annotations

from pathlib import Path

from edgevl.errors import UnsupportedArchitecture
from edgevl.exporters.families.base import FamilySpec, register

PREFIX_LM = ("the image block and the whole text prompt attend bidirectionally during prefill (a prefix-LM mask "
             "over everything before the answer), while edgevl's image_span decoder input marks only the image block "
             "(Gemma 3); its Gemma 2 decoder (PaliGemma 2) also uses logit soft-capping, which edgevl's decoder does "
             "not compute")

REFUSED = {
    "paligemma": (("PaliGemmaForConditionalGeneration", "paligemma"), "PaliGemma", PREFIX_LM),
}
ALTERNATIVE = ("exportable today: Qwen2-VL/Qwen2.5-VL, Gemma 3, InternVL (Qwen2 decoder), SmolVLM/Idefics3, LLaVA, "
               "DeepSeek-VL, BLIP-2 (OPT)")


def _refused_spec(key: str, architectures: tuple[str, ...], label: str, reason: str) -> type[FamilySpec]:
    class Refused(FamilySpec):
        name = f"refused:{key}"
        refused = True

        @classmethod
        def matches(cls, config: dict) -> bool:
            archs = config.get("architectures")
            return bool(set(archs) & set(architectures)) if archs else config.get("model_type") in architectures

        @classmethod
        def check_files(cls, path: Path) -> None:
            raise UnsupportedArchitecture(f"{path}: {label} ({architectures[0]}) is not supported yet: {reason}. "
                                          f"{ALTERNATIVE}")

        def load(self, path: Path):
            self.check_files(Path(path))

    Refused.architectures = architectures
    Refused.__name__ = Refused.__qualname__ = f"Refused_{key}"
    return Refused


for _key, (_archs, _label, _reason) in REFUSED.items():
    register(_refused_spec(_key, _archs, _label, _reason))
