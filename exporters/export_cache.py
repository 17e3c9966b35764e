"""One FP32 export per checkpoint, shared by every precision and target (content-addressed).

Every build starts from the same FP32 bundle: exporting it from PyTorch is the slowest step of
a build that quantizes (65-107 s for the SmolVLM-256M shape on a 2-core CPU), and a user (or
`edgevl bench`) who builds fp32, int8 and int4 for two backends would pay it six times. The
export is a pure function of the checkpoint's content and edgevl's version, so it is cached
under that key:

    $EDGEVL_CACHE/exports/<name>-<sha256(checkpoint content, edgevl version)[:20]>/

(``EDGEVL_CACHE`` defaults to ``~/.cache/edgevl``; ``EDGEVL_EXPORT_CACHE=0`` turns the cache
off.) Entries are ordinary bundles written by the atomic BundleWriter, so a killed export leaves
no entry; an entry that fails verification (a changed or missing file) is exported again.
Derived bundles copy files out of the entry and never write into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from edgevl.errors import BundleError, CheckpointError


def cache_root() -> Path:
    return Path(os.environ.get("EDGEVL_CACHE") or Path.home() / ".cache" / "edgevl")


def cache_enabled() -> bool:
    return os.environ.get("EDGEVL_EXPORT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def checkpoint_dir(model: str | Path) -> Path:
    """The directory a model name stands for ('edgevl-tiny' is the embedded checkpoint)."""
    from edgevl.models.checkpoint import EMBEDDED_DIR, EMBEDDED_NAME

    if str(model) == EMBEDDED_NAME:
        return EMBEDDED_DIR
    directory = Path(model)
    if not directory.is_dir():
        raise CheckpointError(f"{model}: not 'edgevl-tiny' and not a checkpoint directory")
    return directory


def checkpoint_hash(directory: str | Path) -> str:
    """sha256 over every file's relative path and sha256 (sorted): the checkpoint's identity."""
    from edgevl.bundle import sha256_file

    directory = Path(directory)
    h = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CheckpointError(f"{directory}: checkpoint directory is empty")
    for p in files:
        h.update(p.relative_to(directory).as_posix().encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def export_key(directory: Path, image_size: tuple[int, int] | None = None) -> str:
    from edgevl import __version__

    options = {"image_size": list(image_size)} if image_size else {}    # an option changes the export
    payload = json.dumps({"checkpoint": checkpoint_hash(directory), "edgevl": __version__, **options}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cached_export(model: str | Path, fallback_out: Path, log=print, image_size: tuple[int, int] | None = None):
    """The FP32 bundle of ``model``: from the cache when it holds a verified entry, else exported
    (into the cache, or into ``fallback_out`` when the cache is off) -> Bundle."""
    from edgevl.bundle import load_bundle
    from edgevl.exporters.export import export_model

    if not cache_enabled():
        return export_model(model, fallback_out, log=log, image_size=image_size)
    directory = checkpoint_dir(model)
    entry = cache_root() / "exports" / f"{directory.name}-{export_key(directory, image_size)}"
    if entry.is_dir():
        try:
            bundle = load_bundle(entry)
            log(f"export: reusing the FP32 export of {directory.name} ({entry})")
            return bundle
        except BundleError as e:
            log(f"export: cached export {entry} failed verification ({e}); exporting again")
            shutil.rmtree(entry, ignore_errors=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    return export_model(model, entry, force=True, log=log, image_size=image_size)
