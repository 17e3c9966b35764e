"""Bundles for the benchmark: built once, reused from a cache keyed by content.

The key is sha256(checkpoint content hash, precision, target, tool, edgevl version): a changed
checkpoint, a new edgevl or another precision builds a new bundle; anything else is reused.
Entries are written by the bundle writer's atomic rename, so a build that died leaves no entry.

``build_bundle(model, target, precision, out)`` is the one seam to the compile side: FP32 is
``edgevl.exporters.export.export_model``; every other precision goes to
``edgevl.exporters.build.build_bundle`` (the quantization issue) and fails with a clear error
where that is not installed. A failed build fails its variant only (orchestrate.py).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from pathlib import Path
from typing import Callable

from edgevl.errors import ConfigError


class BuildUnavailable(ConfigError):
    """A precision whose builder is not in this install."""

BUILD_MODULE = "edgevl.exporters.build"


def _real_builder() -> Callable | None:
    try:
        module = importlib.import_module(BUILD_MODULE)
    except ModuleNotFoundError as e:
        if e.name != BUILD_MODULE:      # the module exists but one of its imports is missing: say so
            raise
        return None
    return getattr(module, "build_bundle", None)


def build_bundle(model: str | Path, target: str, precision: str, out: str | Path, log=print) -> Path:
    """Build a bundle of ``model`` for ``target`` at ``precision`` into ``out`` (replaced)."""
    real = _real_builder()
    if real is not None:
        import inspect

        accepted = inspect.signature(real).parameters
        extra = {k: v for k, v in (("force", True), ("log", log), ("progress", False)) if k in accepted}
        bundle = real(str(model), target=target, precision=precision, out=str(out), **extra)
        return Path(getattr(bundle, "path", out))
    if precision != "fp32":
        raise BuildUnavailable(f"precision {precision!r} needs the quantizing builder {BUILD_MODULE}.build_bundle, "
                          "which this install does not have; benchmark fp32, or install an edgevl with the "
                          "quantization issue landed")
    from edgevl.exporters.export import export_model

    # An FP32 ONNX bundle is the same for every target: each backend loads the ONNX itself.
    return export_model(str(model), out, force=True, log=log).path


def bundle_target(target: str, precision: str) -> str:
    """What a bundle is built for: without the quantizing builder an FP32 bundle is plain ONNX,
    the same file for every backend, so one build (and one cache entry) serves them all."""
    if precision == "fp32" and _real_builder() is None:
        return "onnx"
    return target


def build_defaults(target: str, precision: str) -> dict:
    """Build settings that change the bundle without changing its name (so they key the cache)."""
    if precision.endswith("-wo") or precision in ("int8", "int4"):
        from edgevl.exporters.quantize.recipes import default_block_size, weight_only_backends

        return {"block_size": default_block_size(weight_only_backends(target))}
    return {}


def cache_key(checkpoint_hash: str, target: str, precision: str, tool: str = "edgevl") -> str:
    from edgevl import __version__

    payload = json.dumps({"checkpoint": checkpoint_hash, "target": target, "precision": precision, "tool": tool,
                          "edgevl": __version__, **build_defaults(target, precision.partition("/")[0])},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cached_bundle(cache_dir: Path, name: str, key: str, build: Callable[[Path], Path], rebuild: bool = False) -> tuple[Path, bool]:
    """(bundle path, reused?) for ``key``; ``build(out)`` writes it when it is not cached."""
    from edgevl.bundle import load_bundle
    from edgevl.errors import BundleError

    out = Path(cache_dir) / "bundles" / f"{name}-{key}"
    if out.is_dir() and not rebuild:
        try:
            load_bundle(out)            # a tampered or half-deleted entry is rebuilt, not trusted
            return out, True
        except BundleError:
            shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(build(out)), False
