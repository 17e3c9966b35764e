"""The models a benchmark can name, resolved to a checkpoint directory the exporters take.

- ``edgevl-tiny``: the embedded default (accuracy is measured on held-out scenes);
- ``smolvlm-256m-shaped``: SmolVLM-256M's architecture with random weights, built locally
  (no hub) once and cached; speed only, random weights have no accuracy;
- ``llava-shaped``: LLaVA (CLIP ViT-B/16 at 224 px, 196 image tokens) with the same decoder,
  random weights, built and cached the same way (llava_shaped.py);
- any local checkpoint directory (``save_pretrained`` layout, or an edgevl-tiny checkpoint).

A checkpoint's content hash (every file's sha256) keys the bundle cache, so a retrained
checkpoint never reuses a stale bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgevl.errors import CheckpointError

TINY = "edgevl-tiny"
SMOLVLM_SHAPED = "smolvlm-256m-shaped"
LLAVA_SHAPED = "llava-shaped"
# random-weight models built locally on first use: name -> "module:function(checkpoints root)"
SHAPED = {SMOLVLM_SHAPED: "edgevl.benchmarks.smolvlm_shaped:smolvlm_256m_shaped_checkpoint",
          LLAVA_SHAPED: "edgevl.benchmarks.llava_shaped:llava_shaped_checkpoint"}
BUILT_IN = (TINY, *SHAPED)


@dataclass(frozen=True)
class BenchModel:
    name: str
    checkpoint: Path
    kind: str                # "edgevl-tiny" (edgevl.models) or "hf" (a transformers architecture)
    measures_accuracy: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "checkpoint": str(self.checkpoint), "kind": self.kind,
                "measures_accuracy": self.measures_accuracy}


def checkpoint_hash(directory: Path) -> str:
    """The checkpoint's identity (the same hash that keys the FP32 export cache)."""
    from edgevl.exporters.export_cache import checkpoint_hash as content_hash

    return content_hash(directory)


def _kind_of(directory: Path) -> str:
    config = directory / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{directory}: no config.json; pass {' or '.join(BUILT_IN)} or a checkpoint "
                              "directory saved with save_pretrained")
    data = json.loads(config.read_text())
    return "edgevl-tiny" if "vit_image_size" in data and "lm_hidden_dim" in data else "hf"


def resolve_model(name: str, cache_dir: Path) -> BenchModel:
    if name == TINY:
        from edgevl.models.checkpoint import EMBEDDED_DIR

        return BenchModel(TINY, EMBEDDED_DIR, "edgevl-tiny", True)
    if name in SHAPED:
        import importlib

        module, function = SHAPED[name].split(":")
        build = getattr(importlib.import_module(module), function)
        return BenchModel(name, build(Path(cache_dir) / "checkpoints"), "hf", False)
    directory = Path(name)
    if not directory.is_dir():
        raise CheckpointError(f"--model {name}: not a built-in model ({', '.join(BUILT_IN)}) and not a directory")
    kind = _kind_of(directory)
    return BenchModel(directory.name, directory, kind, kind == "edgevl-tiny")
