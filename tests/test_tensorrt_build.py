"""`build_engine` and `edgevl compile --target tensorrt` on CPU, through the fake Builder,
BuilderConfig, OnnxParser and timing cache of tests/trt_fakes.py (which follow TensorRT's
Python bindings): TensorRT 10 (weakly typed, FP16/INT8 flags) and 11 (strongly typed, no
precision flags), with and without DLA, parser errors and the timing-cache round trip; then a
compiled bundle loaded by the runner."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest

from edgevl.bundle import BundleWriter, load_bundle
from edgevl.errors import CompileError, ConfigError, InputError
from edgevl.exporters.compile.tensorrt import build_engine, compile_parts, prepare
from edgevl.exporters.compile.trt_plan import plan_build, static_profiles
from edgevl.exporters.compile.trt_profiles import Profile, compute_profiles
from trt_fakes import DLA_OPS, FakeCuda, FakeTRT


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def qdq_onnx(tmp_path_factory):
    """A small Q/DQ graph with a dynamic batch: Conv between QuantizeLinear/DequantizeLinear pairs."""
    import onnx
    from onnx import TensorProto, helper

    w = np.ones((4, 3, 3, 3), np.float32)
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]), helper.make_tensor("z", TensorProto.INT8, [], [0]),
             helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.reshape(-1).tolist())]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_x"),
             helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], name="q_w"),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], name="dq_w"),
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])], inits)
    path = tmp_path_factory.mktemp("qdq") / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


QDQ_PROFILE = [Profile("default", {"x": ((1, 3, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8))})]


def _build(trt, onnx_path, precision, profiles, *, qdq=False, dla_core=None, **kw):
    plan = plan_build(trt.__version__, precision, has_qdq=qdq, dla_core=dla_core,
                      dla_cores=trt.dla_cores if dla_core is not None else None)
    logs: list[str] = []
    built = build_engine(trt, onnx_path, plan, profiles, log=logs.append, **kw)
    return built, trt.builds[-1], logs


def _onnx(bundle, part):
    return bundle.path / bundle.parts[part]["onnx"]


def test_tensorrt_10_builds_weakly_typed_with_precision_flags(bundle, qdq_onnx):
    trt = FakeTRT("10.3.0")
    profiles = compute_profiles(bundle.manifest)["decoder"]
    built, build, _ = _build(trt, _onnx(bundle, "decoder"), "fp16", profiles, workspace_mb=512, opt_level=4)
    assert not build["strongly_typed"] and {"FP16", "TF32"} <= set(build["flags"]) and "INT8" not in build["flags"]
    assert len(build["profiles"]) == 2 and build["profiles"][1]["inputs_embeds"][2][1] == 1     # decode: seq 1
    assert build["pools"] == {"WORKSPACE": 512 << 20} and build["opt_level"] == 4 and built.dla is None
    assert bytes(memoryview(built.serialized)).startswith(b"FAKE-TRT-PLAN")

    _, build, _ = _build(trt, qdq_onnx, "int8", QDQ_PROFILE, qdq=True)
    assert not build["strongly_typed"] and {"INT8", "FP16"} <= set(build["flags"])
    _, build, _ = _build(trt, _onnx(bundle, "vision"), "fp32", compute_profiles(bundle.manifest)["vision"])
    assert not {"FP16", "INT8", "TF32"} & set(build["flags"])                  # FP32 means no TF32 either


def test_tensorrt_11_builds_strongly_typed_without_precision_flags(bundle, qdq_onnx):
    trt = FakeTRT("11.4.1")
    assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    built, build, logs = _build(trt, _onnx(bundle, "vision"), "fp16", compute_profiles(bundle.manifest)["vision"])
    assert build["strongly_typed"] and not {"FP16", "INT8", "BF16"} & set(build["flags"])
    assert any("FP16 graph for strong typing" in line for line in logs)
    assert [d for _, d, _ in build["inputs"]] == ["FLOAT"] and [d for _, d, _ in build["outputs"]] == ["FLOAT"]
    _, build, _ = _build(trt, qdq_onnx, "int8", QDQ_PROFILE, qdq=True)
    assert build["strongly_typed"] and build["flags"] == ["TF32"]

    ten = plan_build("10.3.0", "fp16")           # a TensorRT 10 plan on TensorRT 11: refused by name, not AttributeError
    with pytest.raises(CompileError, match="TensorRT 11.4.1 has no builder flag FP16"):
        build_engine(trt, _onnx(bundle, "vision"), ten, compute_profiles(bundle.manifest)["vision"], log=print)


@pytest.mark.parametrize("version", ["10.3.0", "11.4.1"])
def test_dla_builds_one_static_shape_and_reports_the_layers_it_took(qdq_onnx, version):
    """Finding 2: DLA has no dynamic dimensions; with the dynamic profile and GPU fallback every
    layer silently runs on the GPU. With a static profile the DLA takes what it supports, and the
    build says how much."""
    trt = FakeTRT(version, dla_cores=2)
    built, build, logs = _build(trt, qdq_onnx, "int8", static_profiles(QDQ_PROFILE), qdq=True, dla_core=1)
    assert build["device"] == "DLA" and build["dla_core"] == 1 and "GPU_FALLBACK" in build["flags"]
    assert build["profiles"] == [{"x": [[1, 3, 8, 8]] * 3}]
    assert build["strongly_typed"] == (version == "11.4.1")
    layers = 6
    capable = sum(op in DLA_OPS for op in ("QuantizeLinear", "DequantizeLinear") * 2 + ("Conv", "Relu"))
    assert built.dla == {"core": 1, "layers": layers, "dla_capable": capable,
                         "gpu_layers": ["q_x", "dq_x", "q_w", "dq_w"], "placed_on_dla": 1, "placed_on_gpu": 4}
    assert any(f"DLA core 1: {capable} of {layers} network layers can run on the DLA; TensorRT placed 1 layer(s) "
               "on the DLA and 4 on the GPU" in line for line in logs)

    built, build, logs = _build(trt, qdq_onnx, "int8", QDQ_PROFILE, qdq=True, dla_core=0)    # the dynamic profile
    assert built.dla["placed_on_dla"] == 0 and any("nothing runs on the DLA" in line for line in logs)


def test_parser_errors_name_the_node_and_the_build_error_is_reported(bundle, qdq_onnx, tmp_path):
    trt = FakeTRT("10.3.0", unsupported_ops={"Conv"})
    with pytest.raises(CompileError, match=r"could not parse qdq.onnx: In node 4 with name: conv and operator: Conv "
                                           r"ERROR: No importer registered for op: Conv"):
        _build(trt, qdq_onnx, "int8", QDQ_PROFILE, qdq=True)
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(CompileError, match="could not parse broken.onnx: ERROR: Failed to parse ONNX model"):
        _build(FakeTRT("10.3.0"), tmp_path / "broken.onnx", "fp16", [])
    with pytest.raises(CompileError, match=r"failed to build qdq.onnx \(Network has dynamic or shape inputs, but no "
                                           r"optimization profile has been defined\.\)"):
        _build(FakeTRT("10.3.0"), qdq_onnx, "int8", [], qdq=True)
    bad = [Profile("default", {"x": ((1, 3, 8), (1, 3, 8, 8), (4, 3, 8, 8))})]
    with pytest.raises(CompileError, match=r"rejected profile 'default' for input 'x'.*Shape provided for opt is "
                                           "inconsistent"):
        _build(FakeTRT("10.3.0"), qdq_onnx, "int8", bad, qdq=True)
    with pytest.raises(CompileError, match="rejected optimization profile 'default'"):
        _build(FakeTRT("10.3.0"), qdq_onnx, "int8", [Profile("default", {"x": ((4, 3, 8, 8), (1, 3, 8, 8),
                                                                                 (4, 3, 8, 8))})], qdq=True)


def test_timing_cache_round_trip(qdq_onnx, tmp_path):
    cache = tmp_path / "cache" / "timing.cache"
    trt = FakeTRT("10.3.0")
    _build(trt, qdq_onnx, "int8", QDQ_PROFILE, qdq=True, timing_cache=cache)
    first = cache.read_bytes()
    assert trt.timing_hits == 0 and len(first) > 0
    _build(trt, qdq_onnx, "int8", QDQ_PROFILE, qdq=True, timing_cache=cache)
    assert trt.timing_hits == 6                                   # every layer's timing came from the file
    assert sorted(p.name for p in cache.parent.iterdir()) == ["timing.cache"]       # written atomically

    other = FakeTRT("10.3.0", gpu="Other GPU")                   # a cache timed on another device
    _, _, logs = _build(other, qdq_onnx, "int8", QDQ_PROFILE, qdq=True, timing_cache=cache)
    assert any("made on another device: starting a new one" in line for line in logs) and other.timing_hits == 0
    assert b"Other GPU" in cache.read_bytes()
    cache.write_bytes(b"\x00garbage")
    _, _, logs = _build(trt, qdq_onnx, "int8", QDQ_PROFILE, qdq=True, timing_cache=cache)
    assert any("is unreadable" in line for line in logs) and b"Fake GPU" in cache.read_bytes()


def _compile(src, out, trt, cuda, log, **options):
    """compile_bundle's steps with the fakes injected into prepare()."""
    prepared = prepare(src, options, trt_module=trt, cuda=cuda)
    writer = BundleWriter(out, force=True)
    for rel in src.manifest["files"]:
        shutil.copy2(src.path / rel, writer.file(rel))
    writer.manifest.update({k: v for k, v in copy.deepcopy(src.manifest).items() if k != "files"})
    compile_parts(src, writer, prepared, log)
    return writer.commit(), prepared


def test_compiled_dla_bundle_runs_in_the_runner(bundle, tmp_path):
    """prepare -> build (fake TensorRT 10 with 2 DLA cores) -> sidecars -> TensorRTRunner: the DLA
    vision engine has one static shape, so batch 1 runs and batch 2 names the fix."""
    from edgevl.runtimes.engine import Engine
    from edgevl.runtimes.tensorrt import TensorRTRunner
    from edgevl.runtimes.trt_metadata import read_metadata

    cuda = FakeCuda()
    trt = FakeTRT("10.3.0", dla_cores=2, cuda=cuda)
    logs: list[str] = []
    out, prepared = _compile(bundle, tmp_path / "dla", trt, cuda, logs.append, precision="fp16", dla_core=0,
                             parts=["vision", "embed"], timing_cache=str(tmp_path / "timing.cache"))
    jobs = {j.part: j for j in prepared.jobs}
    assert jobs["vision"].plan.dla_core == 0 and jobs["embed"].plan.dla_core is None
    (vision,) = jobs["vision"].profiles
    assert all(lo == opt == hi for lo, opt, hi in vision.shapes.values())
    meta = read_metadata(out.path / "tensorrt" / "vision.engine")
    assert meta["dla"]["core"] == 0 and meta["dla"]["layers"] > 0 and meta["build"]["dla_core"] == 0
    assert "dla" not in read_metadata(out.path / "tensorrt" / "embed.engine")
    assert any("DLA core 0:" in line for line in logs)

    pixels = np.random.default_rng(0).random((1, 3, *bundle.manifest["preprocess"]["size"]), dtype=np.float32)
    ort = Engine(bundle, "onnxruntime").activate()
    try:
        want = ort.runners["vision"].infer({"pixel_values": pixels})["image_embeds"]
    finally:
        ort.close()
    with TensorRTRunner(out.part_file("vision", "tensorrt"), trt_module=trt, cuda=cuda) as r:
        np.testing.assert_array_equal(r.infer({"pixel_values": pixels})["image_embeds"], want)
        with pytest.raises(InputError, match=r"static shapes \(a DLA engine is built for one shape\).*--opt-batch"):
            r.infer({"pixel_values": np.concatenate([pixels, pixels])})


def test_prepare_refuses_dla_where_the_builder_reports_none(bundle):
    for version, why in (("11.1.0", "11.0-11.3 dropped it"), ("10.8.0", "10.7 was the last")):
        with pytest.raises(ConfigError, match=rf"reports 0 DLA core\(s\) to TensorRT {version}.*{why}"):
            prepare(bundle, {"dla_core": 0}, trt_module=FakeTRT(version, dla_cores=0), cuda=FakeCuda())
    prepared = prepare(bundle, {"dla_core": 0, "parts": ["vision"]}, trt_module=FakeTRT("11.4.1", dla_cores=2),
                       cuda=FakeCuda())
    assert prepared.jobs[0].plan.strongly_typed and prepared.jobs[0].plan.dla_core == 0
