"""Peers: other tools run on the same model and machine, in the same interleaved run.

- ``ort-quantize-dynamic``: plain ONNX Runtime ``quantize_dynamic`` (INT8 weights, dynamic
  activation quantization) applied to our FP32 vision and decoder ONNX; run on edgevl's loop so
  only the quantizer differs from edgevl's own INT8 rows.
- ``optimum-intel`` / ``optimum-intel-int8``: Optimum Intel's ``OVModelForVisualCausalLM``
  (OpenVINO; FP32 with an f32 precision hint, or INT8 weights), exported from the checkpoint.
- ``openvino-genai``: OpenVINO GenAI's ``VLMPipeline`` on Optimum Intel's export.
- ``optimum-onnxruntime``: Optimum's ONNX Runtime VLM classes (``optimum-onnx``).

The last four need transformers <= 4.57 and torchvision, which cannot live in edgevl's venv
(MEASURED.md items 10, 11, 14): they run in ``benchmarks/.peers-venv`` (made by
``benchmarks/peers_venv/make_venv.sh``) through ``peers_venv/peer_worker.py``, which speaks the
worker protocol. A peer that cannot run a model fails its row with the reason, plainly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgevl.benchmarks.variants import Setup
from edgevl.errors import ConfigError

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / ".peers-venv"
PEER_WORKER = HERE / "peers_venv" / "peer_worker.py"


@dataclass(frozen=True)
class Peer:
    name: str
    backend: str
    precision: str
    in_venv: bool
    what: str


PEERS = {p.name: p for p in (
    Peer("ort-quantize-dynamic", "onnxruntime", "int8-dynamic", False,
         "onnxruntime.quantization.quantize_dynamic (QInt8 weights) on edgevl's FP32 ONNX"),
    Peer("optimum-intel", "openvino", "fp32", True, "optimum-intel OVModelForVisualCausalLM, f32 hint"),
    Peer("optimum-intel-int8", "openvino", "int8-wo", True, "optimum-intel OVModelForVisualCausalLM, INT8 weights"),
    Peer("openvino-genai", "openvino", "fp32", True, "openvino_genai.VLMPipeline on optimum-intel's export"),
    Peer("optimum-onnxruntime", "onnxruntime", "fp32", True, "optimum-onnx ORTModelForImageTextToText"),
)}


class PeerCannotRun(ConfigError):
    """A peer tool that does not run this model here; the message says why."""


def peer_setup(name: str, model: str) -> Setup:
    if name not in PEERS:
        raise ConfigError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    p = PEERS[name]
    return Setup(model, p.name, p.backend, p.precision)


def prepare_peer(setup: Setup, bm, preparer) -> dict:
    peer = PEERS[setup.tool]
    if not peer.in_venv:
        path, reused, key = ort_dynamic_bundle(setup.model, preparer)
        return {"kind": "edgevl", "bundle": str(path), "backend": "onnxruntime", "precision": peer.precision,
                "threads": preparer.threads, "prepared": {"bundle": str(path), "reused": reused, "cache_key": key,
                                                          "peer": peer.what}}
    if bm.kind != "hf":
        raise PeerCannotRun(f"{peer.name} cannot run {bm.name}: it loads transformers architectures only, and "
                            f"{bm.name} is edgevl's own model (no transformers class)")
    python = PEERS_VENV / "bin" / "python"
    if not python.is_file():
        raise PeerCannotRun(f"{peer.name} needs the peers venv {PEERS_VENV}, which does not exist; create it with "
                            "`bash benchmarks/peers_venv/make_venv.sh` (its own venv: these tools downgrade "
                            "transformers, MEASURED.md items 10 and 14)")
    import numpy as np

    from edgevl.benchmarks.subject import scene_images

    # shared by the venv peers of one checkpoint: OpenVINO GenAI runs optimum-intel's FP32 export
    work_dir = preparer.cache_dir / "peers" / f"{bm.name}-{preparer.checkpoint_hash(setup.model)[:12]}"
    work_dir.mkdir(parents=True, exist_ok=True)
    np.save(work_dir / "images.npy", np.stack(scene_images(8)))
    return {"kind": "venv-peer", "peer": peer.name, "checkpoint": str(bm.checkpoint), "threads": preparer.threads,
            "precision": peer.precision, "work_dir": str(work_dir), "images": str(work_dir / "images.npy"),
            "command": [str(python), str(PEER_WORKER)], "prepared": {"peer": peer.what}}


def ort_dynamic_bundle(model: str, preparer) -> tuple[Path, bool, str]:
    """Our FP32 bundle with its vision and decoder graphs through ``quantize_dynamic``."""
    from edgevl.benchmarks.bundles import cache_key, cached_bundle

    fp32, _, _ = preparer.bundle(model, "onnxruntime", "fp32")
    key = cache_key(preparer.checkpoint_hash(model), "onnxruntime", "int8-dynamic", tool="ort-quantize-dynamic")
    path, reused = cached_bundle(preparer.cache_dir, preparer.model(model).name + "-ortq", key,
                                 lambda out: quantize_bundle_dynamic(fp32, out), preparer.rebuild)
    return path, reused, key


def quantize_bundle_dynamic(src: Path, out: Path, parts=("vision", "decoder")) -> Path:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ORT logs a "consider pre-processing" hint per graph on the root logger; the peer is plain
    # quantize_dynamic on purpose, so the hint is noise here
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)

    from edgevl.bundle import BundleWriter, load_bundle

    bundle = load_bundle(src)
    writer = BundleWriter(out, force=True)
    try:
        for rel in bundle.manifest["files"]:
            part = next((p for p in parts if bundle.parts[p]["onnx"] == rel), None)
            if part is None:
                writer.copy_in(bundle.path / rel, rel)
            else:
                quantize_dynamic(str(bundle.path / rel), str(writer.file(rel)), weight_type=QuantType.QInt8,
                                 per_channel=True)
        manifest = {k: v for k, v in bundle.manifest.items() if k not in ("files", "format", "schema_version")}
        manifest["precision"] = "int8-dynamic"
        manifest["quantization"] = {"method": "onnxruntime.quantization.quantize_dynamic", "scheme": "QInt8 per-channel weights",
                                    "parts": list(parts), "tool": "peer (benchmark)"}
        writer.manifest.update(manifest)
        return writer.commit().path
    except BaseException:
        writer.abort()
        raise
    finally:
        root.setLevel(level)
