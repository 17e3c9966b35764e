"""The models a benchmark can name, resolved to a checkpoint directory the exporters take.

- ``edgevl-tiny``: the embedded default (accuracy is measured on held-out scenes);
- ``smolvlm-256m-shaped``: SmolVLM-256M's architecture with random weights, built locally
  (no hub) once and cached; speed only, random weights have no accuracy;
- any local checkpoint directory (``save_pretrained`` layout, or an edgevl-tiny checkpoint).

A checkpoint's content hash (every file's sha256) keys the bundle cache, so a retrained
checkpoint never reuses a stale bundle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edgevl.errors import CheckpointError

TINY = "edgevl-tiny"
SMOLVLM_SHAPED = "smolvlm-256m-shaped"
BUILT_IN = (TINY, SMOLVLM_SHAPED)


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
    """sha256 over every file's relative path and sha256 (sorted): the checkpoint's identity."""
    from edgevl.bundle import sha256_file

    h = hashlib.sha256()
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CheckpointError(f"{directory}: checkpoint directory is empty")
    for p in files:
        h.update(p.relative_to(directory).as_posix().encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


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
    if name == SMOLVLM_SHAPED:
        from edgevl.benchmarks.smolvlm_shaped import smolvlm_256m_shaped_checkpoint

        return BenchModel(SMOLVLM_SHAPED, smolvlm_256m_shaped_checkpoint(Path(cache_dir) / "checkpoints"), "hf", False)
    directory = Path(name)
    if not directory.is_dir():
        raise CheckpointError(f"--model {name}: not a built-in model ({', '.join(BUILT_IN)}) and not a directory")
    kind = _kind_of(directory)
    return BenchModel(directory.name, directory, kind, kind == "edgevl-tiny")
