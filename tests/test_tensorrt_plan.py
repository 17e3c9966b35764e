"""Build-flag selection for TensorRT 10 vs 11 and engine metadata (pure logic, no GPU)."""

from __future__ import annotations

import json

import pytest

from edgevl.errors import BundleError, ConfigError, EngineMismatch
from edgevl.exporters.compile.trt_plan import parse_version, part_precision, plan_build
from edgevl.runtimes.trt_metadata import (DeviceFingerprint, make_metadata, mismatches, read_metadata,
                                          require_compatible, sidecar_path, write_engine)


# -- precision per version ---------------------------------------------------------------------
def test_tensorrt_10_uses_weak_typing_and_builder_flags():
    fp16 = plan_build("10.3.0", "fp16")
    assert (fp16.strongly_typed, fp16.builder_flags, fp16.convert_fp16) == (False, ("FP16",), False)
    int8 = plan_build("10.3.0.26", "int8", has_qdq=True)
    assert (int8.strongly_typed, int8.builder_flags) == (False, ("INT8", "FP16"))
    strict = plan_build("10.3.0", "int8", has_qdq=True, int8_float="fp32")
    assert strict.builder_flags == ("INT8",) and strict.cleared_flags == ("TF32",)
    fp32 = plan_build("10.7.0", "fp32")
    assert fp32.builder_flags == () and fp32.cleared_flags == ("TF32",)   # FP32 means no TF32 matmuls


def test_tensorrt_11_is_strongly_typed_without_precision_flags():
    for precision, qdq in (("fp32", False), ("fp16", False), ("int8", True)):
        plan = plan_build("11.4.0.106", precision, has_qdq=qdq)
        assert plan.strongly_typed and plan.builder_flags == ()
        assert not {"FP16", "INT8"} & set(plan.builder_flags + plan.cleared_flags)
    assert plan_build("11.0", "fp16").convert_fp16                     # FP16 comes from an FP16 graph
    assert not plan_build("11.0", "int8", has_qdq=True).convert_fp16   # Q/DQ graph used as given


def test_int8_needs_qdq_and_old_tensorrt_is_refused():
    for version in ("10.3.0", "11.1.0"):
        with pytest.raises(ConfigError, match="Q/DQ.*no implicit calibration"):
            plan_build(version, "int8", has_qdq=False)
    with pytest.raises(ConfigError, match="too old.*TensorRT 10"):
        plan_build("8.6.1", "fp16")
    with pytest.raises(ConfigError, match="precision"):
        plan_build("10.3.0", "bf16")
    assert parse_version("10.3.0.26") == (10, 3, 0, 26)


def test_dla_is_decided_by_the_reported_core_count_not_the_major_version():
    """Finding 5: TensorRT 11.4.1 has DLA on Jetson AGX Orin (JetPack 7.2.2+); 11.0-11.3 and
    10.8+ report no DLA core. The builder's count decides, the version words the message."""
    plan = plan_build("10.3.0", "fp16", dla_core=1, dla_cores=2)
    assert plan.dla_core == 1 and plan.builder_flags == ("FP16", "GPU_FALLBACK")
    assert plan_build("10.3.0", "int8", has_qdq=True, dla_core=0, dla_cores=2).builder_flags == (
        "INT8", "FP16", "GPU_FALLBACK")
    for precision, qdq in (("fp16", False), ("int8", True)):       # 11.4.1 on Orin: strongly typed + fallback
        plan = plan_build("11.4.1", precision, has_qdq=qdq, dla_core=0, dla_cores=2)
        assert plan.strongly_typed and plan.dla_core == 0 and plan.builder_flags == ("GPU_FALLBACK",)
        assert plan.convert_fp16 == (precision == "fp16")
    for version, why in (("11.2.0", "11.0-11.3 dropped it; 11.4.1 restores it"), ("10.8.0", "10.7 was the last"),
                         ("11.5.0", "does not support JetPack")):
        with pytest.raises(ConfigError, match=rf"reports 0 DLA core\(s\) to TensorRT {version}.*{why}"):
            plan_build(version, "fp16", dla_core=0, dla_cores=0)
    with pytest.raises(ConfigError, match=r"--dla-core 2: this device reports 2 DLA core\(s\).*below 2"):
        plan_build("10.3.0", "fp16", dla_core=2, dla_cores=2)
    with pytest.raises(ConfigError, match="DLA runs only FP16 or INT8"):
        plan_build("10.3.0", "fp32", dla_core=0, dla_cores=2)


def test_dla_parts_get_one_static_profile():
    from edgevl.exporters.compile.trt_plan import static_profiles
    from edgevl.exporters.compile.trt_profiles import Profile

    dynamic = Profile("default", {"pixel_values": ((1, 3, 64, 64), (2, 3, 64, 64), (8, 3, 64, 64))})
    (static,) = static_profiles([dynamic, Profile("other", {})])
    assert static.shapes == {"pixel_values": ((2, 3, 64, 64),) * 3}        # min = opt = max = the opt shape
    assert static_profiles([]) == []


def test_part_precision():
    assert part_precision("auto", True, "vision") == "int8"
    assert part_precision("auto", False, "embed") == "fp16"
    assert part_precision("int8", False, "embed") == "fp16"        # float parts of an INT8 bundle
    assert part_precision("fp32", False, "vision") == "fp32"
    with pytest.raises(ConfigError, match="INT8 by construction"):
        part_precision("fp16", True, "decoder")


# -- metadata ------------------------------------------------------------------------------------
HERE = DeviceFingerprint("10.3.0", "Orin", "8.7")


def _meta(fp=HERE, sha="ab" * 32):
    return make_metadata(part="vision", fingerprint=fp, onnx_file="vision.onnx", onnx_sha256=sha,
                         engine_sha256="", build={"precision": "fp16", "profiles": []})


def test_metadata_round_trip_is_atomic(tmp_path):
    engine = tmp_path / "tensorrt" / "vision.engine"
    meta = write_engine(engine, b"\x00plan-bytes", _meta())
    assert engine.read_bytes() == b"\x00plan-bytes"
    assert read_metadata(engine) == meta
    import hashlib

    assert meta["engine_sha256"] == hashlib.sha256(b"\x00plan-bytes").hexdigest()
    assert meta["tensorrt_version"] == "10.3.0" and meta["gpu"] == {"name": "Orin", "compute_capability": "8.7"}
    assert sorted(p.name for p in engine.parent.iterdir()) == ["vision.engine", "vision.engine.json"]   # no temp files


def test_mismatches_name_version_gpu_and_onnx():
    meta = _meta()
    assert mismatches(meta, HERE, "ab" * 32) == []
    assert "TensorRT 10.3.0, this machine has TensorRT 10.4.0" in mismatches(meta, DeviceFingerprint("10.4.0", "Orin", "8.7"))[0]
    other_name = DeviceFingerprint("10.3.0", "Orin Nano", "8.7")
    assert "built on 'Orin'" in mismatches(meta, other_name)[0]
    assert mismatches(meta, other_name, allow_other_gpu=True) == []
    other_cc = DeviceFingerprint("10.3.0", "RTX 4090", "8.9")
    assert "compute capability 8.7" in mismatches(meta, other_cc, allow_other_gpu=True)[0]
    assert "stale" in mismatches(meta, HERE, "cd" * 32)[0]
    with pytest.raises(EngineMismatch, match=r"not portable.*edgevl compile BUNDLE --target tensorrt"):
        require_compatible(meta, other_cc, "b/tensorrt/vision.engine")


def test_bad_sidecars_are_bundle_errors(tmp_path):
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(BundleError, match="metadata file x.engine.json is missing"):
        read_metadata(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_metadata(engine)
    sidecar_path(engine).write_text(json.dumps({**_meta(), "version": 99}))
    with pytest.raises(BundleError, match="newer than this edgevl reads"):
        read_metadata(engine)
