"""Containment: every file the runtime opens from a bundle is inside it and pinned by a hash.

One resolver, ``BundleFiles.resolve(rel, field)``, turns a path named by the manifest into the
real path a runner or the tokenizer opens. It refuses, naming the manifest field and the path:
an absolute path, a ``..`` component, a path that leaves the bundle once symlinks are followed,
and a path not listed in ``files`` (so no sha256 covers it). ``companions`` adds the files a
backend opens on its own next to a part: ONNX external data (read from inside the graph by
edgevl.onnx_refs), an OpenVINO IR's ``.bin``, a TensorRT engine's metadata sidecar.

``load_bundle`` runs ``check_manifest_paths`` before any runner sees a path; runners receive
only paths this module returned.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from edgevl.errors import BundleError

FIX = "a bundle may only name files inside its own directory that are listed in its manifest's files; rebuild it"


class BundleFiles:
    """The resolver of one bundle directory (``root`` resolved once, so a later change of a
    symlink pointing at the bundle does not change what this load reads)."""

    def __init__(self, root: str | Path, listed, require_listed: bool = True):
        self.root = Path(root).resolve()
        self.listed = set(listed)
        self.require_listed = require_listed

    def resolve(self, rel, field: str) -> Path:
        where = f"{self.root}: manifest field {field}"
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            raise BundleError(f"{where} must be a non-empty relative path, got {rel!r}; {FIX}")
        pure = PurePosixPath(rel)
        if pure.is_absolute() or os.path.isabs(rel):
            raise BundleError(f"{where} names {rel!r}, an absolute path outside the bundle; {FIX}")
        if ".." in pure.parts:
            raise BundleError(f"{where} names {rel!r}, which climbs out of the bundle with '..'; {FIX}")
        if self.require_listed and rel not in self.listed:
            raise BundleError(f"{where} names {rel!r}, which is not listed in the manifest's files (no sha256 "
                              f"covers it); {FIX}")
        try:
            real = (self.root / rel).resolve()
        except (OSError, RuntimeError) as e:          # symlink loop, unreadable directory
            raise BundleError(f"{where} names {rel!r}, which cannot be resolved ({e}); {FIX}") from e
        if not real.is_relative_to(self.root):
            raise BundleError(f"{where} names {rel!r}, a symlink that leads out of the bundle to {real}; {FIX}")
        return real

    def relative(self, real: Path) -> str:
        return real.relative_to(self.root).as_posix()

    def companions(self, real: Path, field: str, kind: str) -> list[Path]:
        """Files a backend opens by itself next to ``real`` (a resolved part file); each checked.

        ``kind``: "onnx" (external data named inside the graph), "openvino" (IR ``.bin``, or
        ONNX read by OpenVINO), "tensorrt" (the engine's ``.json`` metadata sidecar)."""
        from edgevl.onnx_refs import external_data_locations

        if kind == "openvino" and real.suffix == ".xml":
            rels = [self.relative(real.with_suffix(".bin"))]
            field_of = f"{field} (its weights .bin)"
        elif kind == "tensorrt":
            rels = [self.relative(real.with_name(real.name + ".json"))]
            field_of = f"{field} (its engine metadata)"
        else:                       # ONNX, whatever its suffix: ORT and OpenVINO read it by content
            if not real.is_file():
                raise BundleError(f"{self.root}: manifest field {field} names {self.relative(real)!r}, which is "
                                  "missing; copy the whole bundle directory again or rebuild it")
            base = PurePosixPath(self.relative(real)).parent
            rels = []
            for location in external_data_locations(real):
                if PurePosixPath(location).is_absolute() or ".." in PurePosixPath(location).parts:
                    raise BundleError(f"{self.root}: {field} ({self.relative(real)}) stores tensors in external data "
                                      f"at {location!r}, outside the bundle; {FIX}")
                rels.append((base / location).as_posix())
            field_of = f"{field} (external data of {self.relative(real)})"
        return [self.resolve(rel, field_of) for rel in rels]


def path_fields(manifest: dict) -> list[tuple[str, str, str]]:
    """(field, path, kind) for every file the manifest makes the runtime open; kind picks the
    companions checked with it ("onnx", "openvino", "tensorrt" or "file")."""
    fields = []
    for name, part in manifest.get("parts", {}).items():
        fields.append((f"parts.{name}.onnx", part.get("onnx"), "onnx"))
        for key in ("artifacts", "prefill"):           # compiled artefacts; a separate prefill graph per backend
            for backend, rel in (part.get(key) or {}).items():
                kind = backend if backend in ("openvino", "tensorrt") else "onnx"
                fields.append((f"parts.{name}.{key}.{backend}", rel, kind))
        for backend, rel in (part.get("prefill") or {}).items():     # a graph for prompts (composite int4)
            fields.append((f"parts.{name}.prefill.{backend}", rel, "onnx"))
    fields.append(("tokenizer.file", manifest.get("tokenizer", {}).get("file"), "file"))
    for name, rel in (manifest.get("reports") or {}).items():
        fields.append((f"reports.{name}", rel, "file"))
    quantization = manifest.get("quantization") or {}
    if "calibration_cache" in quantization:          # a legacy TensorRT-10 calibration cache
        fields.append(("quantization.calibration_cache", quantization["calibration_cache"], "file"))
    return fields


def check_manifest_paths(files: BundleFiles, manifest: dict) -> None:
    """Refuse a manifest naming any file outside the bundle or outside ``files`` (see module),
    companions included."""
    for field, rel, kind in path_fields(manifest):
        real = files.resolve(rel, field)
        if kind != "file":
            files.companions(real, field, kind)
