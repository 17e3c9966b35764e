"""Saving and loading edgevl-tiny checkpoints: config.json, model.safetensors, tokenizer.json.

The embedded default ships inside the package (``edgevl/models/weights/edgevl-tiny``), so a
fresh install has a working model with no download.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from edgevl.errors import CheckpointError
from edgevl.models.config import TinyVLMConfig
from edgevl.models.vlm import TinyVLM

EMBEDDED_DIR = Path(__file__).parent / "weights" / "edgevl-tiny"
EMBEDDED_NAME = "edgevl-tiny"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def save_checkpoint(model: TinyVLM, tokenizer: Tokenizer, out_dir: str | Path, extra_files: dict | None = None) -> Path:
    """Write a checkpoint directory atomically (a temp dir renamed into place)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.cfg.save(tmp / "config.json")
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "decoder.lm_head.weight" or not model.cfg.lm_tie_embeddings}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "model": EMBEDDED_NAME})
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_checkpoint(path: str | Path | None = None) -> tuple[TinyVLM, Tokenizer]:
    """Load an edgevl-tiny checkpoint; ``None`` or ``"edgevl-tiny"`` is the embedded default."""
    directory = EMBEDDED_DIR if path in (None, EMBEDDED_NAME) else Path(path)
    missing = [f for f in CHECKPOINT_FILES if not (directory / f).is_file()]
    if missing:
        hint = ("the embedded default was not trained into this install; run `edgevl train`"
                if directory == EMBEDDED_DIR else "expected an edgevl-tiny checkpoint directory")
        raise CheckpointError(f"{directory}: missing {', '.join(missing)} ({hint})")
    cfg = TinyVLMConfig.load(directory / "config.json")
    model = TinyVLM(cfg)
    state = load_file(str(directory / "model.safetensors"))
    result = model.load_state_dict(state, strict=False)
    allowed_missing = {"decoder.lm_head.weight"} if cfg.lm_tie_embeddings else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise CheckpointError(f"{directory}: weights do not match config "
                              f"(missing {result.missing_keys}, unexpected {result.unexpected_keys})")
    model.eval()
    return model, Tokenizer.from_file(str(directory / "tokenizer.json"))
