"""`edgevl compile --target tensorrt` without a GPU: fail-fast with no partial output, the
torch2trt not-installed path, Q/DQ detection, and the FP16 graph conversion TensorRT 11 needs
(checked in ONNX Runtime, which runs FP16 graphs on the CPU)."""

from __future__ import annotations

import importlib.util
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from edgevl.bundle import Bundle, load_bundle
from edgevl.errors import BackendUnavailable, CompileError, ConfigError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here; this checks the machine without it")
def test_compile_without_tensorrt_fails_fast_and_writes_nothing(tiny_bundle, tmp_path, capsys):
    from edgevl.cli.main import main

    work = tmp_path / "work"
    work.mkdir()
    bundle = work / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    before = _snapshot(bundle)
    for argv in (["compile", str(bundle), "--target", "tensorrt"],
                 ["compile", str(bundle), "--target", "tensorrt", "--fp16", "--out", str(work / "out")],
                 ["compile", str(bundle), "--target", "tensorrt", "--via", "torch2trt", "--out", str(work / "out")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "needs TensorRT, which is not installed" in err and "pip install edgevl[tensorrt]" in err
        assert "Traceback" not in err
    assert _snapshot(bundle) == before                       # the bundle is untouched
    assert sorted(p.name for p in work.iterdir()) == ["tiny"]  # no --out, no temp directories


def test_compile_rejects_unknown_targets_and_options(tiny_bundle):
    from edgevl.exporters.compile import compile_bundle

    with pytest.raises(ConfigError, match="unknown compile target 'tflite'; available: tensorrt"):
        compile_bundle(tiny_bundle, "tflite")
    with pytest.raises(ConfigError, match=r"unknown tensorrt option\(s\) \['max_batchsize'\]"):
        compile_bundle(tiny_bundle, "tensorrt", max_batchsize=4)


@pytest.mark.skipif(importlib.util.find_spec("torch2trt") is not None, reason="torch2trt is installed here")
def test_via_torch2trt_says_it_is_not_installed(tiny_bundle):
    from edgevl.exporters.compile.torch2trt_vision import check_via_torch2trt
    from edgevl.exporters.compile.trt_plan import plan_build

    bundle = load_bundle(tiny_bundle)
    job = SimpleNamespace(plan=plan_build("10.3.0", "fp16"))
    with pytest.raises(BackendUnavailable, match=r"torch2trt is not installed \(it is not on PyPI\).*from source"):
        check_via_torch2trt(bundle, job, "10.3.0")
    with pytest.raises(ConfigError, match="not among the parts"):
        check_via_torch2trt(bundle, None, "10.3.0")


def test_qdq_detection(tmp_path, tiny_bundle):
    import onnx
    from onnx import TensorProto, helper

    from edgevl.exporters.compile.tensorrt import graph_has_qdq

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                               helper.make_tensor("z", TensorProto.INT8, [], [0])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "q.onnx")
    assert graph_has_qdq(tmp_path / "q.onnx")
    assert not graph_has_qdq(tiny_bundle / "vision.onnx")


# -- FP16 conversion for strongly typed TensorRT -------------------------------------------------
@pytest.fixture(scope="module")
def fp16_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with every ONNX part converted as a TensorRT 11 FP16 build converts it."""
    from edgevl.exporters.compile.fp16 import convert_file

    src = load_bundle(tiny_bundle)
    out = tmp_path_factory.mktemp("fp16") / "tiny-fp16"
    shutil.copytree(src.path, out)
    reports = {part: convert_file(src.path / spec["onnx"], out / spec["onnx"]) for part, spec in src.parts.items()}
    return Bundle(out, src.manifest), reports


def _input_types(model):
    import onnx

    typed = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)}
    types.update({t.name: t.data_type for t in typed.graph.initializer})
    return typed, types


def test_fp16_graph_keeps_sensitive_ops_and_io_in_fp32(tiny_bundle, fp16_bundle):
    import onnx
    from onnx import TensorProto

    bundle, reports = fp16_bundle
    for part in ("vision", "decoder"):
        before = onnx.load(str(tiny_bundle / f"{part}.onnx"))
        model, types = _input_types(onnx.load(str(bundle.path / f"{part}.onnx")))
        assert reports[part]["fp16_nodes"] > 0 and reports[part]["casts"] > 0
        for old, new in zip(list(before.graph.input) + list(before.graph.output),
                            list(model.graph.input) + list(model.graph.output)):
            assert (old.name, old.type.tensor_type.elem_type) == (new.name, new.type.tensor_type.elem_type)
        seen = set()
        for node in model.graph.node:
            float_in = [types.get(n) for n in node.input if types.get(n) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
            if node.op_type == "MatMul":
                assert float_in == [TensorProto.FLOAT16] * 2, node.name
            if node.op_type in ("Softmax", "ReduceMean", "Pow", "Sqrt", "LayerNormalization", "Sin", "Cos"):
                assert float_in and set(float_in) == {TensorProto.FLOAT}, (node.op_type, node.name)
                seen.add(node.op_type)
        assert "Softmax" in seen
    assert reports["decoder"]["clipped_constants"] > 0       # float32.min attention masks, clipped to -65504


def test_fp16_graph_matches_fp32_in_onnxruntime(tiny_bundle, fp16_bundle):
    from edgevl.runtimes.compare import Comparator
    from edgevl.runtimes.crosscheck import part_feeds
    from edgevl.runtimes.engine import Engine

    bundle, _ = fp16_bundle
    fp32, fp16 = Engine(load_bundle(tiny_bundle), "onnxruntime").activate(), Engine(bundle, "onnxruntime").activate()
    try:
        feeds = part_feeds(fp32)
        for part, feed_list in feeds.items():
            report = Comparator(atol=2e-2, min_cosine=0.9999).compare(part, fp32.runners[part], fp16.runners[part],
                                                                      feed_list, "fp32", "fp16")
            Comparator.require(report)
    finally:
        fp32.close()
        fp16.close()


def test_fp16_graph_keeps_greedy_tokens(tiny_bundle, fp16_bundle):
    from edgevl.data.world import make_scene
    from edgevl.preprocess import preprocess
    from edgevl.runtimes.engine import Engine
    from edgevl.runtimes.generation import stream_tokens
    from edgevl.runtimes.sampling import SamplingParams

    bundle, _ = fp16_bundle
    engines = [Engine(load_bundle(tiny_bundle), "onnxruntime").activate(), Engine(bundle, "onnxruntime").activate()]
    try:
        params = SamplingParams(max_new_tokens=12)
        for i, prompt in enumerate(("what color is the circle?", "describe the image.", "how many shapes are there?")):
            pixels = preprocess([make_scene("test", i, seed=99).image()], engines[0].preprocess_spec, channels="rgb")
            ids = engines[0].encode_prompt(prompt)
            tokens = [list(stream_tokens(e, ids, e.encode_images(pixels), params)) for e in engines]
            assert tokens[0] == tokens[1], prompt
    finally:
        for e in engines:
            e.close()


def test_fp16_conversion_refuses_control_flow():
    from onnx import TensorProto, helper

    from edgevl.exporters.compile.fp16 import convert_model

    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y1"])], "b", [],
                               [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], "g",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(CompileError, match="control flow.*ModelOpt AutoCast"):
        convert_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_fp16_constants_are_clipped_not_infinite():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgevl.exporters.compile.fp16 import convert_model

    # masked_fill as exported: Where(mask, scores, float32.min) then Softmax
    neg = helper.make_tensor("neg", TensorProto.FLOAT, [1], [float(np.finfo(np.float32).min)])
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    keep = helper.make_tensor("keep", TensorProto.BOOL, [1, 2], [True, False])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"]), helper.make_node("Where", ["keep", "s", "neg"], ["m"]),
             helper.make_node("Softmax", ["m"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [neg, w, keep])
    model, report = convert_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    assert report == {"fp16_nodes": 2, "fp32_nodes": 1, "casts": 2, "clipped_constants": 1}   # x in, scores out
    clipped = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["neg__fp16"]
    assert clipped.dtype == np.float16 and clipped.tolist() == [-65504.0]
    out = ort.InferenceSession(model.SerializeToString()).run(None, {"x": np.array([[1.0, 3.0]], np.float32)})[0]
    assert out.dtype == np.float32 and out.tolist() == [[1.0, 0.0]]
    assert onnx.checker.check_model(model) is None


# -- torch2trt, as its source (torch2trt/torch2trt.py) behaves -----------------------------------
def test_via_torch2trt_is_refused_on_tensorrt_11(tiny_bundle):
    """Finding 4: torch2trt always calls create_network(1 << EXPLICIT_BATCH), which TensorRT 11's
    NetworkDefinitionCreationFlag no longer has: every precision fails there, FP32 included."""
    from edgevl.exporters.compile.torch2trt_vision import check_via_torch2trt
    from edgevl.exporters.compile.trt_plan import plan_build
    from trt_fakes import FakeTRT

    assert not hasattr(FakeTRT("11.4.1").NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    bundle = load_bundle(tiny_bundle)
    for precision in ("fp32", "fp16"):
        job = SimpleNamespace(plan=plan_build("11.4.1", precision))
        with pytest.raises(ConfigError, match=r"--via torch2trt does not work with TensorRT 11.4.1.*EXPLICIT_BATCH.*"
                                              r"drop --via torch2trt"):
            check_via_torch2trt(bundle, job, "11.4.1")


def test_torch2trt_gets_a_static_shape_for_dla():
    """Finding 3: torch2trt raises ValueError('Dataset cannot have multiple shapes when using DLA')
    when min != max; a DLA vision engine is converted at one static shape, a GPU one keeps the
    dynamic batch range of the ONNX build."""
    from edgevl.exporters.compile.torch2trt_vision import torch2trt_arguments
    from edgevl.exporters.compile.trt_plan import plan_build, static_profiles
    from edgevl.exporters.compile.trt_profiles import Profile
    from trt_fakes import FakeTRT
    from trt_fakes_build import torch2trt_dla_shape_check

    trt = FakeTRT("10.3.0", dla_cores=2)
    dynamic = [Profile("default", {"pixel_values": ((1, 3, 64, 64), (2, 3, 64, 64), (8, 3, 64, 64))})]
    gpu = SimpleNamespace(plan=plan_build("10.3.0", "fp16"), profiles=dynamic)
    shape, kwargs = torch2trt_arguments(gpu, (3, 64, 64), trt)
    assert shape == (2, 3, 64, 64) and torch2trt_dla_shape_check(shape, **kwargs) == [0]      # dynamic batch
    with pytest.raises(ValueError, match="multiple shapes when using DLA"):     # what the dynamic range did on DLA
        torch2trt_dla_shape_check(shape, **kwargs, default_device_type=trt.DeviceType.DLA)

    dla_plan = plan_build("10.3.0", "fp16", dla_core=1, dla_cores=2)
    for profiles in (static_profiles(dynamic), dynamic):       # as prepare() builds the job, and a dynamic one
        shape, kwargs = torch2trt_arguments(SimpleNamespace(plan=dla_plan, profiles=profiles), (3, 64, 64), trt)
        assert shape == (2, 3, 64, 64) and kwargs["dla_core"] == 1 and kwargs["gpu_fallback"] is True
        assert kwargs["default_device_type"] is trt.DeviceType.DLA
        assert torch2trt_dla_shape_check(shape, **kwargs) == []                 # no ValueError: one shape
