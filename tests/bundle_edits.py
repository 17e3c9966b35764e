"""Editing bundles the way an attacker or a careless user would: change the manifest, then
recompute the hashes so that only the check under test can refuse the result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgevl.bundle import MANIFEST, sha256_file

# the smallest valid ONNX ModelProto on the wire: ir_version = 8 (enough for containment checks)
FAKE_ONNX = b"\x08\x08"


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def write_manifest(bundle: Path, data: dict) -> None:
    (bundle / MANIFEST).write_text(json.dumps(data, indent=2))


def reseal(bundle: Path, edit=None, add=()) -> dict:
    """Apply ``edit(manifest)``, list the files in ``add`` too, and recompute every listed hash
    that can be computed (entries whose file is missing or outside stay as they are)."""
    data = manifest(bundle)
    if edit is not None:
        edit(data)
    for rel in add:
        data["files"][rel] = {}
    for rel in list(data["files"]):
        f = bundle / rel
        if f.is_file():
            data["files"][rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    write_manifest(bundle, data)
    return data


def minimal_manifest(onnx: str = "part.onnx") -> dict:
    """A schema-valid manifest for bundles whose parts are never run."""
    return {"parts": {"vision": {"onnx": onnx}},
            "preprocess": {"size": [8, 8], "mean": [0.5] * 3, "std": [0.5] * 3},
            "tokenizer": {"file": onnx}, "prompt": {"template": "{image}{prompt}", "image_block": "<i>",
                                                     "image_token_id": 1, "image_seq_len": 1},
            "decoder": {"n_layers": 1, "n_kv_heads": 1, "head_dim": 8, "vocab_size": 8, "max_position": 16}}
