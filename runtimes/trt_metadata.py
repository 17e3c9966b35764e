"""TensorRT engine metadata: the sidecar JSON written next to every engine, and the load check.

A TensorRT engine is a plan for one TensorRT version on one GPU model: it is not portable. So
every engine ``x.engine`` has a sidecar ``x.engine.json`` saying what it was built with and
for, and the runner compares it with the machine before deserialising anything::

    {"format": "edgevl-tensorrt-engine", "version": 1, "part": "decoder",
     "tensorrt_version": "10.3.0", "gpu": {"name": "Orin", "compute_capability": "8.7"},
     "onnx": {"file": "decoder.onnx", "sha256": "..."}, "engine_sha256": "...",
     "build": {...flags, profiles, precision...}, "io": {...}, "created": "...", "edgevl_version": "..."}

Pure Python (no tensorrt import), so the compile side, the runtime and the tests share it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgevl.errors import BundleError, EngineMismatch

FORMAT = "edgevl-tensorrt-engine"
META_VERSION = 1
REBUILD_HINT = "rebuild the engines on this device with `edgevl compile BUNDLE --target tensorrt`"


@dataclass(frozen=True)
class DeviceFingerprint:
    """What an engine is tied to: the TensorRT version and the GPU model."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str          # "8.7"

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name!r} (compute capability {self.compute_capability})"

    def to_dict(self) -> dict:
        return {"tensorrt_version": self.tensorrt_version,
                "gpu": {"name": self.gpu_name, "compute_capability": self.compute_capability}}

    @classmethod
    def from_metadata(cls, meta: dict) -> "DeviceFingerprint":
        gpu = meta.get("gpu", {})
        return cls(str(meta.get("tensorrt_version")), str(gpu.get("name")), str(gpu.get("compute_capability")))


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def make_metadata(*, part: str, fingerprint: DeviceFingerprint, onnx_file: str, onnx_sha256: str,
                  engine_sha256: str, build: dict, io: dict | None = None, created: str | None = None) -> dict:
    from edgevl import __version__

    return {"format": FORMAT, "version": META_VERSION, "part": part, **fingerprint.to_dict(),
            "onnx": {"file": onnx_file, "sha256": onnx_sha256}, "engine_sha256": engine_sha256,
            "build": build, "io": io or {}, "created": created, "edgevl_version": __version__}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_engine(engine_path: str | Path, serialized, meta: dict) -> dict:
    """Write an engine and its sidecar, each atomically (temp file + rename). The engine goes
    first, so a reader never sees a sidecar describing an engine that is not there yet."""
    engine_path = Path(engine_path)
    data = bytes(memoryview(serialized))
    meta = dict(meta, engine_sha256=hashlib.sha256(data).hexdigest())
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(engine_path, data)
    _atomic_write(sidecar_path(engine_path), (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def read_metadata(engine_path: str | Path) -> dict:
    side = sidecar_path(engine_path)
    if not side.is_file():
        raise BundleError(f"{engine_path}: its metadata file {side.name} is missing, so edgevl cannot tell which "
                          f"TensorRT version and GPU it was built for; {REBUILD_HINT}")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{side}: not valid JSON ({e}); {REBUILD_HINT}") from e
    if meta.get("format") != FORMAT:
        raise BundleError(f"{side}: format is {meta.get('format')!r}, expected {FORMAT!r}; {REBUILD_HINT}")
    if not isinstance(meta.get("version"), int) or meta["version"] > META_VERSION:
        raise BundleError(f"{side}: engine metadata version {meta.get('version')} is newer than this edgevl reads "
                          f"({META_VERSION}); upgrade edgevl or {REBUILD_HINT}")
    return meta


def mismatches(meta: dict, here: DeviceFingerprint, onnx_sha256: str | None = None,
               allow_other_gpu: bool = False) -> list[str]:
    """Reasons the engine described by ``meta`` cannot run here (empty: it can).

    TensorRT versions must match exactly (a plan is tied to the build). A different compute
    capability never works; a different GPU name with the same compute capability usually
    runs but with tactics tuned for another chip, so it is refused unless ``allow_other_gpu``.
    """
    built = DeviceFingerprint.from_metadata(meta)
    reasons = []
    if built.tensorrt_version != here.tensorrt_version:
        reasons.append(f"it was built with TensorRT {built.tensorrt_version}, this machine has "
                       f"TensorRT {here.tensorrt_version}")
    if built.compute_capability != here.compute_capability:
        reasons.append(f"it was built for compute capability {built.compute_capability} ({built.gpu_name!r}), "
                       f"this GPU is {here.compute_capability} ({here.gpu_name!r})")
    elif built.gpu_name != here.gpu_name and not allow_other_gpu:
        reasons.append(f"it was built on {built.gpu_name!r}, this GPU is {here.gpu_name!r} (same compute "
                       f"capability {here.compute_capability}: pass options={{'allow_other_gpu': True}} to "
                       "run it anyway with tactics tuned for the other GPU)")
    onnx = meta.get("onnx", {})
    if onnx_sha256 is not None and onnx.get("sha256") != onnx_sha256:
        reasons.append(f"it was built from a different {onnx.get('file', 'ONNX file')} "
                       f"(sha256 {str(onnx.get('sha256'))[:12]}..., the bundle's is {onnx_sha256[:12]}...): "
                       "the engine is stale")
    return reasons


def require_compatible(meta: dict, here: DeviceFingerprint, engine_path: str | Path,
                       onnx_sha256: str | None = None, allow_other_gpu: bool = False) -> None:
    reasons = mismatches(meta, here, onnx_sha256, allow_other_gpu)
    if reasons:
        raise EngineMismatch(f"{engine_path}: TensorRT engine refused: {'; '.join(reasons)}. TensorRT engines are "
                             f"not portable across TensorRT versions or GPUs: {REBUILD_HINT}")


def bundle_onnx_sha256(engine_path: str | Path, meta: dict) -> str | None:
    """The sha256 the bundle's manifest records for the ONNX file this engine was built from,
    found by walking up from the engine to the bundle's manifest.json (None: no manifest)."""
    rel = meta.get("onnx", {}).get("file")
    if not rel:
        return None
    for parent in list(Path(engine_path).resolve().parents)[:3]:
        manifest = parent / "manifest.json"
        if manifest.is_file():
            try:
                files = json.loads(manifest.read_text()).get("files", {})
            except json.JSONDecodeError:
                return None
            entry = files.get(rel)
            return entry.get("sha256") if entry else None
    return None
