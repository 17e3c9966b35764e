"""`edgevl build`: refusals before any work, and a whole export -> quantize -> compile run."""

from __future__ import annotations

import importlib.util

import pytest

from edgevl.errors import BackendUnavailable, BundleError, ConfigError
from conftest import needs_openvino, needs_torch


@pytest.mark.parametrize("target, precision, error, match", [
    ("onnxruntime", "fp16", ConfigError, "fp16 is not offered"),
    ("tensorrt", "int4-wo", ConfigError, "MatMulNBits"),
    ("cuda", "fp32", ConfigError, "unknown --target"),
    ("onnxruntime", "int3", ConfigError, "unknown --precision"),
])
def test_meaningless_requests_are_refused_before_any_work(tmp_path, target, precision, error, match):
    from edgevl.exporters.build import build_bundle

    with pytest.raises(error, match=match):
        build_bundle("edgevl-tiny", target, precision, tmp_path / "out", log=lambda *a: None, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_without_tensorrt_fails_fast_with_no_output(tmp_path):
    from edgevl.exporters.build import build_bundle

    with pytest.raises(BackendUnavailable, match="TensorRT"):
        build_bundle("edgevl-tiny", "tensorrt", "int8", tmp_path / "out", log=lambda *a: None, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_build_cli_passes_tensorrt_engine_options(monkeypatch, tmp_path):
    """`edgevl build --target tensorrt` takes the same engine flags as `edgevl compile`."""
    import edgevl.exporters.build as build
    from edgevl.cli.main import main

    seen = {}
    monkeypatch.setattr(build, "build_bundle", lambda *a, **k: seen.update(k))
    main(["build", "--model", "edgevl-tiny", "--target", "tensorrt", "--precision", "int8", "--via", "torch2trt",
          "--max-batch", "4", "--dla-core", "0", "--out", str(tmp_path / "o")])
    opts = seen["compile_options"]
    assert (opts["via"], opts["max_batch"], opts["dla_core"]) == ("torch2trt", 4, 0)
    main(["build", "--model", "edgevl-tiny", "--target", "onnxruntime", "--out", str(tmp_path / "o")])
    assert seen["compile_options"] is None


def test_existing_output_is_not_replaced_without_force(tmp_path):
    from edgevl.exporters.build import build_bundle

    (tmp_path / "out").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        build_bundle("edgevl-tiny", "onnxruntime", "fp32", tmp_path / "out", log=lambda *a: None, progress=False)


@needs_torch
def test_build_onnxruntime_fp32_sets_target_and_precision(tmp_path):
    from edgevl.exporters.build import build_bundle

    bundle = build_bundle("edgevl-tiny", "onnxruntime", "fp32", tmp_path / "out", log=lambda *a: None, progress=False)
    assert bundle.manifest["target"] == "onnxruntime" and bundle.precision == "fp32"
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]            # the staging directory is gone


@needs_torch
@needs_openvino
@pytest.mark.slow
def test_build_openvino_int8_qdq_writes_nncf_ir_that_runs_int8(tmp_path):
    import openvino as ov

    import edgevl
    from edgevl.exporters.build import build_bundle
    from edgevl.exporters.quantize.openvino_int8 import int8_executed_ops

    bundle = build_bundle("edgevl-tiny", "openvino", "int8-qdq", tmp_path / "out", calib="world", samples=8,
                          eval_scenes=2, accept_loss=True, log=lambda *a: None, progress=False)
    assert bundle.manifest["target"] == "openvino" and bundle.precision == "int8"
    for part in ("vision", "decoder", "embed"):
        assert bundle.part_file(part, "openvino").suffix == ".xml"
    compiled = ov.Core().compile_model(str(bundle.part_file("vision", "openvino")), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    assert int8_executed_ops(compiled)
    assert "openvino_ir" in bundle.manifest["quantization"]
    with edgevl.load(bundle.path, verbose=False) as vlm:
        assert vlm.backend == "openvino"
        from edgevl.data.world import make_scene

        assert isinstance(vlm.answer([make_scene("test", 1).image()], ["what is in the picture?"])[0], str)
