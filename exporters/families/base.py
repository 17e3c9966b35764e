"""What an export spec for one model family provides (after optimum's export configs).

A family spec turns a checkpoint into an ``ExportableVLM``: three PyTorch modules with the
edgevl part contract (vision, embed, decoder), the metadata a bundle's manifest needs, and a
PyTorch reference (the family's own model, e.g. the Hugging Face class) that parity and greedy
checks compare against. Adding a family is one file with one ``FamilySpec`` subclass,
registered with ``@register``, and its test.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from edgevl.errors import CheckpointError, UnsupportedArchitecture
from edgevl.models.decoder import Decoder

FAMILIES: dict[str, type["FamilySpec"]] = {}


def register(cls: type["FamilySpec"]) -> type["FamilySpec"]:
    FAMILIES[cls.name] = cls
    return cls


class Reference(ABC):
    """The PyTorch model a family is checked against (not the export wrappers)."""

    @abstractmethod
    def pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images -> the pixel tensor the vision part takes, as the family's processor makes it."""

    @abstractmethod
    def input_ids(self, prompt: str, n_images: int = 1) -> list[int]:
        """The token ids the family's own processor makes for a prompt with n images."""

    @abstractmethod
    def generate(self, images: list[np.ndarray], prompt: str, max_new_tokens: int) -> list[int]:
        """Greedy new tokens from the family's own PyTorch model (stop token excluded)."""


class VisionPart(torch.nn.Module):
    """pixel_values (B, 3, H, W) -> image_embeds (B, N, D) from a callable over modules."""

    def __init__(self, modules: torch.nn.Module, fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.inner, self.fn = modules, fn

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fn(self.inner, pixel_values)


class EmbedPart(torch.nn.Module):
    """input_ids (B, T) -> inputs_embeds (B, T, D)."""

    def __init__(self, embedding: torch.nn.Embedding, scale: float = 1.0):
        super().__init__()
        self.embedding, self.scale = embedding, scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(input_ids)
        return x * self.scale if self.scale != 1.0 else x


@dataclass
class ExportableVLM:
    name: str
    family: str
    architecture: str
    source: str
    vision: torch.nn.Module
    embed: torch.nn.Module
    decoder: Decoder
    pixel_shape: tuple[int, int, int]             # (3, H, W)
    image_seq_len: int
    preprocess: dict
    prompt: dict                                  # template, image_block, image_token_id, image_seq_len
    tokenizer_file: Path
    tokenizer: dict                               # bos/eos/pad ids, add_special_tokens
    max_position: int
    reference: Reference
    generation: dict = field(default_factory=lambda: {"max_new_tokens": 32, "temperature": 0.0})
    sample_prompts: tuple[str, ...] = ("describe the image.",)
    extra_files: dict[str, Path] = field(default_factory=dict)   # processor configs etc. to ship along
    manifest_extra: dict = field(default_factory=dict)           # family sections added to the manifest

    def eval(self) -> "ExportableVLM":
        for m in (self.vision, self.embed, self.decoder):
            m.eval()
        return self


class FamilySpec(ABC):
    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]      # HF `architectures` / model_type values handled
    required_files: ClassVar[tuple[str, ...]] = ("config.json",)

    @classmethod
    def matches(cls, config: dict) -> bool:
        archs = set(config.get("architectures") or [])
        return bool(archs & set(cls.architectures)) or config.get("model_type") in cls.architectures

    @classmethod
    def check_files(cls, path: Path) -> None:
        missing = [f for f in cls.required_files if not any(path.glob(f))]
        if missing:
            raise CheckpointError(f"{path}: checkpoint directory is missing {', '.join(missing)} "
                                  f"(a {cls.name} checkpoint saved with save_pretrained has them)")

    @abstractmethod
    def load(self, path: Path) -> ExportableVLM:
        ...


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json; expected a checkpoint directory saved with "
                              "save_pretrained (config, weights, tokenizer and processor files) or 'edgevl-tiny'")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from e


def resolve_family(model: str | Path) -> tuple[type[FamilySpec], Path]:
    """Which family spec handles ``model``: the embedded model's name, a checkpoint directory,
    or a Hugging Face Hub id (resolved through huggingface_hub's cache, see hub.py)."""
    from edgevl.exporters import families  # noqa: F401  (registers every family)
    from edgevl.models.checkpoint import EMBEDDED_DIR, EMBEDDED_NAME

    from edgevl.exporters.families.hub import looks_like_hub_id, resolve_hub_id

    if str(model) == EMBEDDED_NAME:
        return FAMILIES["edgevl-tiny"], EMBEDDED_DIR
    path = resolve_hub_id(str(model)) if looks_like_hub_id(str(model)) else Path(model)
    if not path.is_dir():
        raise CheckpointError(f"{model}: not a directory and not a built-in model name or Hugging Face Hub id "
                              f"(org/name); pass '{EMBEDDED_NAME}', a local checkpoint directory or a Hub id")
    config = read_config(path)
    for cls in FAMILIES.values():
        if cls.matches(config):
            cls.check_files(path)
            return cls, path
    found = config.get("architectures") or config.get("model_type") or "unknown"
    supported = sorted({a for cls in FAMILIES.values() if not getattr(cls, "refused", False)
                        for a in cls.architectures if a[0].isupper()})
    raise UnsupportedArchitecture(f"{path}: architecture {found} is not supported; supported: "
                                  + ", ".join(supported) + " (adding one is one file in exporters/families/)")
