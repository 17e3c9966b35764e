"""`edgevl compile`: a bundle's ONNX parts -> artefacts for one target, added to the bundle.

A target is one module listed in TARGETS with four functions:

    add_arguments(group)          its CLI flags (argparse group; the module imports nothing heavy)
    options_from_args(args)       -> dict of options for prepare()
    prepare(bundle, options)      validate everything and check the target's libraries and
                                  device; raise before anything is written (fail fast)
    compile_parts(bundle, writer, prepared, log)
                                  write artefacts into the BundleWriter and record each one in
                                  writer.manifest["parts"][part]["artifacts"][target]

compile_bundle() copies the source bundle into a BundleWriter (hard links when replacing the
bundle in place), lets the target add its artefacts, and commits atomically: a failure at any
point leaves the source bundle (and --out) as they were. No torch here: compiling runs on the
device (TensorRT engines are not portable), where only the runtime extras are installed.
"""

from __future__ import annotations

import copy
import importlib
import os
import shutil
from pathlib import Path

from edgevl.bundle import MANIFEST, Bundle, BundleWriter, load_bundle
from edgevl.errors import BundleError, ConfigError

TARGETS = {
    "tensorrt": "edgevl.exporters.compile.tensorrt",
}


def target_module(target: str):
    if target not in TARGETS:
        raise ConfigError(f"unknown compile target {target!r}; available: {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[target])


def _copy_in(writer: BundleWriter, src: Path, rel: str, link: bool) -> None:
    dst = writer.file(rel)
    if link:
        try:
            os.link(src / rel, dst)
            return
        except OSError:      # another filesystem, or links not allowed: copy
            pass
    shutil.copy2(src / rel, dst)


def compile_bundle(bundle: str | Path, target: str, out: str | Path | None = None, force: bool = False,
                   log=print, **options) -> Bundle:
    """Compile ``bundle`` for ``target``; writes to ``out`` (default: the bundle itself, replaced
    atomically). Options are the target's (see its ``options_from_args``)."""
    src = load_bundle(bundle)
    module = target_module(target)
    prepared = module.prepare(src, options)           # every check that can fail happens here
    out = Path(out) if out is not None else src.path
    in_place = out.resolve() == src.path.resolve()
    if not in_place and out.exists() and not force:
        raise BundleError(f"{out} already exists; choose another --out or pass --force to replace it")
    skip = f"{module.ARTIFACT_DIR}/"
    writer = BundleWriter(out, force=True)
    try:
        for rel in src.manifest["files"]:
            if not rel.startswith(skip) and rel != MANIFEST:
                _copy_in(writer, src.path, rel, link=in_place)
        manifest = copy.deepcopy(src.manifest)
        manifest.pop("files", None)
        for part in manifest["parts"].values():
            part.setdefault("artifacts", {}).pop(target, None)
        writer.manifest.update(manifest)
        module.compile_parts(src, writer, prepared, log)
        result = writer.commit()
    except BaseException:
        writer.abort()
        raise
    log(f"compile: wrote {result.path} ({target})")
    return result
