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

BIDIRECTIONAL = ("the image block attends bidirectionally during prefill (a token_type_ids mask); edgevl's decoder "
                 "is causal everywhere, so greedy answers would differ from transformers. The Gemma 3 text decoder "
                 "itself (q/k norm, (1 + w) norms, sliding-window layers) is supported as a decoder variant; "
                 "pan-and-scan crops are not supported either")

REFUSED = {
    "gemma3": (("Gemma3ForConditionalGeneration", "gemma3"), "Gemma 3", BIDIRECTIONAL),
    "paligemma": (("PaliGemmaForConditionalGeneration", "paligemma"), "PaliGemma",
                  "the image block and the prompt prefix attend bidirectionally during prefill; edgevl's decoder "
                  "is causal everywhere"),
}
ALTERNATIVE = ("exportable today: Qwen2-VL/Qwen2.5-VL, InternVL (Qwen2 decoder), SmolVLM/Idefics3, LLaVA, DeepSeek-VL, "
               "BLIP-2 (OPT)")


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
