"""Peers: other tools run on the same model and machine, in the same interleaved run.

- ``ort-quantize-dynamic``: plain ONNX Runtime ``quantize_dynamic`` (INT8 weights, dynamic
  activation quantization) applied to our FP32 vision and decoder ONNX; run on edgevl's loop so
  only the quantizer differs from edgevl's own INT8 rows.
- ``optimum-intel`` / ``optimum-intel-int8``: Optimum Intel's ``OVModelForVisualCausalLM``
  (OpenVINO; FP32 with an f32 precision hint, or INT8 weights), exported from the checkpoint.
- ``openvino-genai``: OpenVINO GenAI's ``VLMPipeline`` on Optimum Intel's export.
- ``optimum-onnxruntime``: Optimum's ONNX Runtime VLM classes (``optimum-onnx``).

- ``llama-cpp-q8_0`` / ``llama-cpp-q4_0``: llama.cpp (GGUF Q8_0 / Q4_0 decoder + F16 mmproj,
  converted with its own convert_hf_to_gguf.py and llama-quantize): llama-mtmd-cli end to end,
  llama-bench decode at positions (peers_venv/llama_cpp_peer.py).
- ``ort-genai-int4`` / ``ort-genai-int8``: ONNX Runtime GenAI's model builder (INT4 / INT8
  weight-only CPU) on the checkpoint's language model: decoder-only rows, no vision
  (peers_venv/ort_genai_peer.py).

The optimum and OpenVINO GenAI peers need transformers <= 4.57 and torchvision, which cannot live
in edgevl's venv (MEASURED.md items 10, 11, 14): they run in ``benchmarks/.peers-venv`` (made by
``benchmarks/peers_venv/make_venv.sh``) through ``peers_venv/peer_worker.py``, which speaks the
worker protocol. The llama.cpp and ORT GenAI peers run the same worker with edgevl's own python
(their converters need transformers 5, which the peers venv cannot have) and a tool folder in the
bench cache: a llama.cpp build (``make_llama_cpp.sh``) or the onnxruntime-genai package
(``make_ort_genai.sh``, on PYTHONPATH). A peer that cannot run a model fails its row with the
reason, plainly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgevl.benchmarks.variants import Setup
from edgevl.errors import ConfigError

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / ".peers-venv"
PEER_WORKER = HERE / "peers_venv" / "peer_worker.py"
LLAMA_CPP_VERSION = "0.3.36"        # the llama-cpp-python sdist make_llama_cpp.sh builds (MEASURED.md 15)
ORT_GENAI_VERSION = "0.18.0"        # the onnxruntime-genai make_ort_genai.sh installs


@dataclass(frozen=True)
class Peer:
    name: str
    backend: str
    precision: str
    in_venv: bool                   # runs through peer_worker.py (else: an edgevl bundle on edgevl's worker)
    what: str
    # for peer_worker peers: "peers-venv", or a tool folder in the bench cache used with edgevl's own
    # python ("llama.cpp": make_llama_cpp.sh's build; "ort-genai": make_ort_genai.sh's package)
    needs: str = "peers-venv"


PEERS = {p.name: p for p in (
    Peer("ort-quantize-dynamic", "onnxruntime", "int8-dynamic", False,
         "onnxruntime.quantization.quantize_dynamic (QInt8 weights) on edgevl's FP32 ONNX"),
    Peer("optimum-intel", "openvino", "fp32", True, "optimum-intel OVModelForVisualCausalLM, f32 hint"),
    Peer("optimum-intel-int8", "openvino", "int8-wo", True, "optimum-intel OVModelForVisualCausalLM, INT8 weights"),
    Peer("openvino-genai", "openvino", "fp32", True, "openvino_genai.VLMPipeline on optimum-intel's export"),
    Peer("optimum-onnxruntime", "onnxruntime", "fp32", True, "optimum-onnx ORTModelForImageTextToText"),
    Peer("llama-cpp-q8_0", "llama.cpp", "q8_0", True, "llama.cpp GGUF Q8_0 decoder + F16 mmproj (convert_hf_to_gguf.py "
         "+ llama-quantize): llama-mtmd-cli end to end, llama-bench tg at depth for decode at positions", "llama.cpp"),
    Peer("llama-cpp-q4_0", "llama.cpp", "q4_0", True, "llama.cpp GGUF Q4_0 decoder + F16 mmproj (convert_hf_to_gguf.py "
         "+ llama-quantize): llama-mtmd-cli end to end, llama-bench tg at depth for decode at positions", "llama.cpp"),
    Peer("ort-genai-int4", "onnxruntime", "int4", True, "onnxruntime-genai model builder INT4 CPU (MatMulNBits): "
         "decoder only, no vision (the builder has no Idefics3/LLaVA class)", "ort-genai"),
    Peer("ort-genai-int8", "onnxruntime", "int8", True, "onnxruntime-genai model builder INT8 CPU (MatMulNBits): "
         "decoder only, no vision (the builder has no Idefics3/LLaVA class)", "ort-genai"),
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
    extra: dict = {}
    if peer.needs in TOOL_DIRS:
        import sys

        root = tool_dir(peer.needs, preparer.cache_dir)
        check_tool(peer.needs, root, peer.name, preparer.cache_dir)
        python = Path(sys.executable)        # transformers 5 for the converters (MEASURED.md 15)
        if peer.needs == "llama.cpp":
            extra["llama_cpp"] = {"root": str(root), "src": str(root / "sdist" / "vendor" / "llama.cpp"),
                                  "convert_python": sys.executable}
        else:
            extra["env"] = {"PYTHONPATH": str(root / "pylib")}
    else:
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
            "command": [str(python), str(PEER_WORKER)], "prepared": {"peer": peer.what}, **extra}


# tool -> (folder under the bench cache, files that must exist, the script that makes them)
TOOL_DIRS = {
    "llama.cpp": (f"peers/llama.cpp/{LLAMA_CPP_VERSION}", ("READY", "build/bin/llama-bench", "build/bin/llama-mtmd-cli",
                                                          "build/bin/llama-quantize"), "make_llama_cpp.sh"),
    "ort-genai": (f"peers/ort-genai/{ORT_GENAI_VERSION}", ("READY", "pylib/onnxruntime_genai"), "make_ort_genai.sh"),
}


def tool_dir(tool: str, cache_dir: Path) -> Path:
    """Where benchmarks/peers_venv/make_*.sh put a peer tool: the bench cache (``cache_dir``)."""
    return Path(cache_dir) / TOOL_DIRS[tool][0]


def check_tool(tool: str, root: Path, peer: str, cache_dir: Path) -> None:
    _, needed, script = TOOL_DIRS[tool]
    missing = [name for name in needed if not (root / name).exists()]
    if missing:
        from edgevl.benchmarks.bench import default_cache_dir

        where = "" if Path(cache_dir) == default_cache_dir() else f" --cache-dir {cache_dir}"
        raise PeerCannotRun(f"{peer} needs {tool} in {root} ({', '.join(missing)} missing); make it once with "
                            f"`bash benchmarks/peers_venv/{script}{where}`")


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
