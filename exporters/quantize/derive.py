"""Writing a quantized bundle derived from an FP32 one, with the same manifest conventions.

Everything of the FP32 bundle is carried over (tokenizer, processor files, the embed part, the
export parity report) except the parts being replaced and whatever compiled artefacts belonged
to them (an engine built from FP32 weights is not the quantized model). The writer is the
ordinary atomic BundleWriter: nothing appears at ``out`` unless the whole bundle commits.
"""

from __future__ import annotations

import copy
import datetime as _dt
from pathlib import Path
from typing import Iterable

from edgevl.bundle import MANIFEST, Bundle, BundleWriter
from edgevl.errors import QuantizationError


def part_files(bundle: Bundle, part: str) -> set[str]:
    """The files of one part: its ONNX, its external data, its compiled artefacts (and their .bin)."""
    spec = bundle.parts[part]
    rels = {spec["onnx"]}
    for rel in [*spec.get("artifacts", {}).values(), *spec.get("prefill", {}).values()]:
        rels.add(rel)
        if rel.endswith(".xml"):
            rels.add(rel[:-4] + ".bin")
    listed = set(bundle.manifest["files"])
    return {r for r in listed if r in rels or any(r.startswith(x + ".") for x in rels)}


def as_bundle(bundle) -> Bundle:
    """A Bundle as it is, or a path loaded (and verified)."""
    from edgevl.bundle import load_bundle

    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle)


def require_fp32(bundle: Bundle, what: str) -> None:
    if bundle.precision != "fp32" or bundle.manifest.get("quantization"):
        raise QuantizationError(f"{bundle.path} is already {bundle.precision}; {what} starts from an FP32 bundle "
                                "(build one with `edgevl export`)")


def derived_writer(src: Bundle, out: str | Path, replace: Iterable[str], force: bool = False) -> BundleWriter:
    """A writer holding a copy of ``src`` minus the files of the ``replace`` parts."""
    replace = list(replace)
    skip = {MANIFEST}
    for part in replace:
        skip |= part_files(src, part)
    if Path(out).resolve() == src.path.resolve():
        raise QuantizationError(f"--out {out} is the source bundle itself; write the quantized bundle elsewhere")
    writer = BundleWriter(out, force=force)
    try:
        for rel in src.manifest["files"]:
            if rel not in skip:
                writer.copy_in(src.path / rel, rel)
        manifest = copy.deepcopy(src.manifest)
        manifest.pop("files", None)
        for part in replace:
            manifest["parts"][part].pop("artifacts", None)
            manifest["parts"][part].pop("lowered", None)          # described the artefacts just dropped
            manifest["parts"][part].pop("prefill", None)
            manifest["parts"][part].pop("prefill_method", None)
        manifest["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        manifest.setdefault("provenance", {})["derived_from"] = {
            "bundle": str(src.path), "precision": src.precision, "created": src.manifest.get("created")}
        writer.manifest.update(manifest)
    except BaseException:
        writer.abort()
        raise
    return writer


def staged_bundle(writer: BundleWriter) -> Bundle:
    """The bundle being written, readable by runners before commit (no sha256 check: files are
    still changing)."""
    return Bundle(writer.tmp, writer.manifest)


def tool_versions() -> dict:
    import importlib.metadata as md

    from edgevl import __version__

    out = {"edgevl": __version__}
    for dist in ("onnxruntime", "onnx", "nncf", "openvino", "torch"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out
