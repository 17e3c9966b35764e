"""The real benchmark subjects on edgevl-tiny (small and quick), the ORT quantize_dynamic peer,
and the peers venv's checkpoint shim; the harness itself is tested with fakes elsewhere."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import BACKENDS, needs_torch
from edgevl.benchmarks.report import short_error
from edgevl.benchmarks.subject import scene_images


def _check_subject(subject, batch: int = 2):
    subject.load()
    images = scene_images(batch)
    pixels = subject.pixels(images)
    subject.encode(pixels)
    g = subject.generate(images, "describe the image.", 5)
    assert g.batch == batch and g.new_tokens == 5 and g.prompt_tokens > 16
    assert 0 < g.ttft_ms < g.e2e_ms and g.decode_ms > 0
    assert g.decode_tok_s == pytest.approx(4 * batch / (g.decode_ms / 1e3))
    steps = subject.decode_at(64, 3, batch=1)
    assert len(steps) == 3 and all(ms > 0 for ms in steps)
    limit = subject.max_position()
    assert len(subject.decode_at(limit - 4, 3)) == 3            # the far end of the context works too
    facts = subject.describe()
    assert facts["size_bytes"] > facts["decoder_weight_bytes"] > 0 and facts["image_tokens"] == 16
    return facts


@needs_torch
def test_pytorch_tiny_subject():
    from edgevl.benchmarks.subject_torch import TinyTorchSubject

    facts = _check_subject(TinyTorchSubject("edgevl-tiny", "fp32", 1))
    assert facts["size_bytes"] == sum(p.stat().st_size for p in
                                      (Path(__file__).parents[1] / "edgevl/models/weights/edgevl-tiny").glob("*.safetensors"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_edgevl_subject_on_each_backend(tiny_bundle, backend):
    from edgevl.benchmarks.subject_edgevl import EdgeVLSubject

    subject = EdgeVLSubject(tiny_bundle, backend, "fp32", 1)
    facts = _check_subject(subject)
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert facts["decoder_weight_bytes"] == manifest["files"]["decoder.onnx"]["bytes"]
    overhead = subject.vision_overhead(subject.pixels(scene_images(1)), pairs=4)
    assert len(overhead["edgevl_ms"]) == len(overhead["bare_ms"]) == 4
    subject.close()


def test_ort_quantize_dynamic_peer_bundle(tiny_bundle, tmp_path):
    from edgevl.benchmarks.peers import quantize_bundle_dynamic
    from edgevl.bundle import load_bundle

    out = load_bundle(quantize_bundle_dynamic(tiny_bundle, tmp_path / "q"))
    src = load_bundle(tiny_bundle)
    assert out.precision == "int8-dynamic" and out.manifest["quantization"]["method"].endswith("quantize_dynamic")
    assert out.manifest["files"]["decoder.onnx"]["bytes"] < src.manifest["files"]["decoder.onnx"]["bytes"] / 2
    assert out.manifest["files"]["embed.onnx"] == src.manifest["files"]["embed.onnx"]       # left as it was
    import edgevl

    with edgevl.load(out.path, backend="onnxruntime", verbose=False) as vlm:
        assert len(vlm.generate(scene_images(1)[0], "describe the image.", channels="rgb",
                                max_new_tokens=4).tokens) <= 4


def test_peer_checkpoint_shim_reads_in_older_transformers(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "peer_worker", Path(__file__).parents[1] / "benchmarks/peers_venv/peer_worker.py")
    peer_worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer_worker)
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "extra_special_tokens": ["<image>"]}))
    (src / "processor_config.json").write_text(json.dumps({"image_processor": {"do_image_splitting": True}}))
    out = peer_worker.compat_checkpoint(str(src), str(tmp_path / "work"))
    assert (out / "model.safetensors").is_symlink()
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok == {"tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["<image>"]}
    assert json.loads((out / "processor_config.json").read_text())["image_processor"]["do_image_splitting"] is False
    assert json.loads((src / "processor_config.json").read_text())["image_processor"]["do_image_splitting"]  # untouched
    peer_worker.compat_checkpoint(str(src), str(tmp_path / "work"))          # idempotent


def test_short_error_folds_backend_noise():
    text = ("load failed: RuntimeError: Exception from /home/ci/openvino.genai/src/vlm_config.cpp:45:\n"
            "Unsupported 'idefics3' VLM model type\n")
    assert short_error(text) == "load failed: RuntimeError: Unsupported 'idefics3' VLM model type"
    assert len(short_error("x" * 500)) == 180 and "|" not in short_error("a | b")
