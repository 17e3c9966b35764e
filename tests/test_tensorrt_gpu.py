"""TensorRT on a real GPU (Jetson or x86 + NVIDIA): build engines for edgevl-tiny in FP16 and
INT8, check parity against ONNX Runtime and greedy-token identity, the KV cache kept on the
device, engine reuse and refusal. Deselected by default; run on a GPU box with

    pytest -m tensorrt tests/test_tensorrt_gpu.py

Everything here skips, with the reason, where TensorRT, pycuda/cuda-python or a GPU is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from edgevl.bundle import load_bundle
from edgevl.errors import BackendUnavailable, EngineMismatch


def _why_no_gpu() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "needs TensorRT (pip install edgevl[tensorrt]; on Jetson it comes with JetPack)"
    if importlib.util.find_spec("pycuda") is None and importlib.util.find_spec("cuda") is None:
        return "needs pycuda or cuda-python (pip install edgevl[tensorrt])"
    try:
        from edgevl.runtimes.cuda_memory import open_cuda

        open_cuda(0)
    except BackendUnavailable as e:
        return f"needs an NVIDIA GPU: {e}"
    return None


WHY = _why_no_gpu()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(WHY is not None, reason=str(WHY))]

PROMPTS = ("what color is the circle?", "describe the image.", "how many shapes are there?")
FP16_TOL = dict(atol=5e-2, min_cosine=0.999)
INT8_TOL = dict(atol=0.25, min_cosine=0.99)      # TensorRT and ONNX Runtime round INT8 GEMMs differently


def _compile(src, out, tmp, **options):
    from edgevl.exporters.compile import compile_bundle

    logs: list[str] = []
    bundle = compile_bundle(src, "tensorrt", out=out, log=logs.append, timing_cache=str(tmp / "timing.cache"),
                            **options)
    return bundle, logs


@pytest.fixture(scope="module")
def fp16_bundle(tiny_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trt-fp16")
    bundle, logs = _compile(tiny_bundle, tmp / "tiny-trt-fp16", tmp, precision="fp16")
    return bundle, logs, tmp


def _int8_source(tiny_bundle, tmp):
    """A Q/DQ INT8 bundle from the quantization side (edgevl.exporters.quantize)."""
    try:
        from edgevl.exporters.quantize.ptq import quantize_bundle
        from edgevl.exporters.quantize.recipes import PTQRecipe
    except ImportError as e:
        pytest.skip(f"INT8 bundles come from edgevl.exporters.quantize.ptq.quantize_bundle, not available ({e})")
    recipe = PTQRecipe(samples=16, decoder_prompts=8, eval_scenes=20, sensitivity=False, accept_loss=True,
                       reduce_range=False)      # 8-bit weights: the bundle is for a GPU
    return quantize_bundle(tiny_bundle, "world", tmp / "tiny-int8", recipe=recipe, progress=False).path


@pytest.fixture(scope="module")
def int8_bundles(tiny_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trt-int8")
    source = _int8_source(tiny_bundle, tmp)
    bundle, logs = _compile(source, tmp / "tiny-trt-int8", tmp, precision="int8")
    return load_bundle(source), bundle, logs


def _compare(reference_bundle, trt_bundle, tol):
    from edgevl.runtimes.compare import Comparator
    from edgevl.runtimes.crosscheck import part_feeds
    from edgevl.runtimes.engine import Engine

    ort, trt = Engine(reference_bundle, "onnxruntime").activate(), Engine(trt_bundle, "tensorrt").activate()
    try:
        feeds = part_feeds(ort)
        for part, feed_list in feeds.items():
            Comparator.require(Comparator(**tol).compare(part, ort.runners[part], trt.runners[part], feed_list,
                                                         "onnxruntime", "tensorrt"))
    finally:
        ort.close()
        trt.close()


def _greedy(bundle, backend, n_tokens=16, **options):
    from edgevl.data.world import make_scene
    from edgevl.preprocess import preprocess
    from edgevl.runtimes.engine import Engine
    from edgevl.runtimes.generation import stream_tokens
    from edgevl.runtimes.sampling import SamplingParams

    engine = Engine(bundle, backend, options=options or None).activate()
    try:
        out = []
        for i, prompt in enumerate(PROMPTS):
            pixels = preprocess([make_scene("test", i, seed=4242).image()], engine.preprocess_spec, channels="rgb")
            ids = engine.encode_prompt(prompt)
            out.append(list(stream_tokens(engine, ids, engine.encode_images(pixels),
                                          SamplingParams(max_new_tokens=n_tokens))))
        return out
    finally:
        engine.close()


def test_fp16_engines_are_built_with_metadata(fp16_bundle, tiny_bundle):
    bundle, logs, tmp = fp16_bundle
    import tensorrt as trt

    from edgevl.runtimes.trt_metadata import read_metadata

    assert bundle.manifest["target"] == "tensorrt"
    for part, spec in bundle.parts.items():
        meta = read_metadata(bundle.path / spec["artifacts"]["tensorrt"])
        assert meta["tensorrt_version"] == trt.__version__ and meta["build"]["precision"] == "fp16"
        assert meta["onnx"]["sha256"] == load_bundle(tiny_bundle).manifest["files"][spec["onnx"]]["sha256"]
    assert (tmp / "timing.cache").stat().st_size > 0
    again, logs2 = _compile(bundle.path, None, tmp, precision="fp16")      # in place: nothing to rebuild
    assert sum("reused" in line for line in logs2) == len(bundle.parts)


def test_fp16_parity_with_onnxruntime(fp16_bundle, tiny_bundle):
    _compare(load_bundle(tiny_bundle), fp16_bundle[0], FP16_TOL)


def test_fp16_greedy_tokens_match_onnxruntime(fp16_bundle, tiny_bundle):
    assert _greedy(fp16_bundle[0], "tensorrt") == _greedy(load_bundle(tiny_bundle), "onnxruntime")


def test_device_kv_cache_matches_host_cache(fp16_bundle):
    bundle = fp16_bundle[0]
    assert _greedy(bundle, "tensorrt", device_kv_cache=True) == _greedy(bundle, "tensorrt", device_kv_cache=False)


def test_int8_parity_and_tokens(int8_bundles):
    source, bundle, _ = int8_bundles
    _compare(source, bundle, INT8_TOL)
    assert _greedy(bundle, "tensorrt") == _greedy(source, "onnxruntime")


def test_engine_from_another_tensorrt_is_refused(fp16_bundle, tmp_path):
    from edgevl.runtimes.tensorrt import TensorRTRunner
    from edgevl.runtimes.trt_metadata import sidecar_path

    root = tmp_path / "copy"
    shutil.copytree(fp16_bundle[0].path, root)
    side = sidecar_path(root / "tensorrt" / "vision.engine")
    meta = json.loads(side.read_text())
    meta["tensorrt_version"] = "9.9.9"
    side.write_text(json.dumps(meta))
    with pytest.raises(EngineMismatch, match="TensorRT 9.9.9.*edgevl compile BUNDLE --target tensorrt"):
        TensorRTRunner(root / "tensorrt" / "vision.engine").activate()


@pytest.mark.skipif(importlib.util.find_spec("torch2trt") is None, reason="torch2trt is not installed")
def test_torch2trt_vision_engine_matches_onnx(tiny_bundle, tmp_path):
    bundle, logs = _compile(tiny_bundle, tmp_path / "t2t", tmp_path, precision="fp16", via="torch2trt",
                            parts=["vision"])
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner
    from edgevl.runtimes.tensorrt import TensorRTRunner

    x = np.random.default_rng(0).random((2, 3, *bundle.manifest["preprocess"]["size"]), dtype=np.float32)
    with OnnxRuntimeRunner(bundle.path / "vision.onnx") as ort, \
            TensorRTRunner(bundle.part_file("vision", "tensorrt")) as trt:
        a, b = ort.infer({"pixel_values": x})["image_embeds"], trt.infer({"pixel_values": x})["image_embeds"]
    assert np.abs(a - b).max() < FP16_TOL["atol"]


# -- the fakes' contracts, checked against the real bindings (tests/trt_fakes.py mirrors these) ----
def test_real_bindings_keep_the_contracts_the_fakes_mirror(fp16_bundle):
    import tensorrt as trt

    from edgevl.exporters.compile.trt_plan import parse_version
    from edgevl.runtimes.cuda_memory import open_cuda

    major = parse_version(trt.__version__)[0]
    assert trt.nptype(trt.float16) is np.float16
    with pytest.raises(TypeError):
        trt.nptype(trt.bfloat16)                                  # no numpy bfloat16
    assert hasattr(trt.BuilderFlag, "FP16") == (major < 11)
    assert hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") == (major < 11)
    cuda = open_cuda(0)
    bundle = fp16_bundle[0]
    with cuda.activate():
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine((bundle.path / "tensorrt" / "vision.engine").read_bytes())
        assert engine.num_optimization_profiles >= 1
        assert isinstance(engine.get_tensor_dtype(engine.get_tensor_name(0)), trt.DataType)
        context = engine.create_execution_context()
        stream = cuda.new_stream()
        assert context.set_optimization_profile_async(0, stream) is True
        with pytest.raises(RuntimeError, match="Error in set optimization profile async"):
            context.set_optimization_profile_async(engine.num_optimization_profiles, stream)
        del context, engine


def _dla_cores() -> int:
    if WHY is not None:
        return 0
    import tensorrt as trt

    return int(trt.Builder(trt.Logger(trt.Logger.WARNING)).num_DLA_cores)


@pytest.mark.skipif(WHY is None and _dla_cores() == 0, reason="this device reports no DLA core to TensorRT")
def test_dla_vision_engine_is_static_and_reports_its_layers(tiny_bundle, tmp_path):
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner
    from edgevl.runtimes.tensorrt import TensorRTRunner
    from edgevl.runtimes.trt_metadata import read_metadata

    bundle, logs = _compile(tiny_bundle, tmp_path / "dla", tmp_path, precision="fp16", dla_core=0, parts=["vision"])
    meta = read_metadata(bundle.part_file("vision", "tensorrt"))
    print("DLA report:", json.dumps(meta["dla"]), *[line for line in logs if "DLA" in line], sep="\n")
    assert meta["dla"]["layers"] > 0 and all(lo == hi for lo, _, hi in meta["build"]["profiles"][0]["shapes"].values())
    x = np.random.default_rng(0).random((1, 3, *bundle.manifest["preprocess"]["size"]), dtype=np.float32)
    with OnnxRuntimeRunner(bundle.path / "vision.onnx") as ort, \
            TensorRTRunner(bundle.part_file("vision", "tensorrt")) as trt_runner:
        a, b = ort.infer({"pixel_values": x})["image_embeds"], trt_runner.infer({"pixel_values": x})["image_embeds"]
    assert np.abs(a - b).max() < FP16_TOL["atol"]


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="cuda-python is not installed")
def test_cuda_python_runs_on_its_device_from_other_threads():
    import threading

    from edgevl.runtimes.cuda_memory import CudaPythonMemory

    cuda = CudaPythonMemory(0)
    seen = []

    def work():
        with cuda.activate():
            seen.append(int(cuda._call(cuda.rt.cudaGetDevice())))
        buf = cuda.alloc(1024)
        host = cuda.pinned(1024)
        host[:] = 7
        stream = cuda.new_stream()
        cuda.htod(buf.ptr, host, stream)
        back = np.zeros(1024, np.uint8)
        cuda.dtoh(back, buf.ptr, stream)
        cuda.synchronize(stream)
        seen.append(int(back.sum()))
        cuda.free(buf)
        cuda.free_pinned(host)
        cuda.destroy_stream(stream)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [0, 7 * 1024]
