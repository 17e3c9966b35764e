"""TensorRTRunner without a GPU: a fake engine (running the real ONNX parts in ONNX Runtime)
and a fake CUDA layer (queued async copies) are injected, so the runner's own work is what is
tested: binding by name, profile choice, shape bookkeeping, buffers, pinned staging, the KV
cache kept on the device, refusal of engines built elsewhere, and clear errors."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil

import numpy as np
import pytest

from edgevl.bundle import load_bundle, writing_bundle
from edgevl.errors import BackendUnavailable, BundleError, EngineMismatch, InputError
from edgevl.exporters.compile.trt_profiles import compute_profiles
from edgevl.runtimes.crosscheck import part_feeds
from edgevl.runtimes.device_kv_cache import DeviceKVCache
from edgevl.runtimes.engine import Engine
from edgevl.runtimes.kv_cache import KVCache
from edgevl.runtimes.tensorrt import TensorRTRunner
from edgevl.runtimes.trt_metadata import DeviceFingerprint, make_metadata, sidecar_path, write_engine
from trt_fakes import FakeCuda, FakeEngine, FakeTRT

BUILT_ON = DeviceFingerprint("10.3.0", "Fake GPU", "8.7")


@pytest.fixture(scope="module")
def trt_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle plus stand-in engine files with real sidecars (as `edgevl compile` writes)."""
    src = load_bundle(tiny_bundle)
    out = tmp_path_factory.mktemp("trt") / "tiny-trt"
    profiles = compute_profiles(src.manifest)
    with writing_bundle(out) as w:
        for rel in src.manifest["files"]:
            w.copy_in(src.path / rel, rel)
        w.manifest.update({k: v for k, v in copy.deepcopy(src.manifest).items() if k != "files"})
        for part, spec in w.manifest["parts"].items():
            rel = f"tensorrt/{part}.engine"
            meta = make_metadata(part=part, fingerprint=BUILT_ON, onnx_file=spec["onnx"],
                                 onnx_sha256=src.manifest["files"][spec["onnx"]]["sha256"], engine_sha256="",
                                 build={"profiles": [p.to_dict() for p in profiles[part]]})
            write_engine(w.file(rel), f"FAKE-ENGINE:{part}".encode(), meta)
            spec.setdefault("artifacts", {})["tensorrt"] = rel
    return load_bundle(out), profiles


def fake_runtime(bundle, profiles, version="10.3.0", gpu=("Fake GPU", "8.7")):
    cuda, trt = FakeCuda(*gpu), FakeTRT(version)
    for part, spec in bundle.parts.items():
        trt.engines[f"FAKE-ENGINE:{part}".encode()] = FakeEngine.from_onnx(
            cuda, bundle.path / spec["onnx"], spec, [p.shapes for p in profiles[part]])
    return trt, cuda


def runner(bundle, part, trt, cuda, **options):
    return TensorRTRunner(bundle.part_file(part, "tensorrt"), trt_module=trt, cuda=cuda, options=options)


def trt_engine(bundle, trt, cuda, **options):
    """An Engine whose runners are TensorRT runners on the fakes (Engine itself would look the
    backend up in the registry, which needs the real tensorrt package)."""
    engine = Engine(bundle, "onnxruntime")
    engine.runners = {p: runner(bundle, p, trt, cuda, **options) for p in bundle.parts}
    engine.backend = "tensorrt"
    return engine.activate()


@pytest.fixture(scope="module")
def ort_feeds(trt_bundle):
    bundle, _ = trt_bundle
    engine = Engine(bundle, "onnxruntime").activate()
    try:
        yield engine, part_feeds(engine)
    finally:
        engine.close()


def test_bindings_follow_the_engine(trt_bundle):
    bundle, profiles = trt_bundle
    trt, cuda = fake_runtime(bundle, profiles)
    with runner(bundle, "decoder", trt, cuda) as r:
        spec = bundle.parts["decoder"]
        assert r.input_names == [t["name"] for t in spec["inputs"]]
        assert r.output_names == [t["name"] for t in spec["outputs"]]
        info = {t.name: t for t in r.inputs}
        assert info["past_len"].dtype == "int64" and info["past_len"].shape == (None,)
        assert info["past_key.0"].shape == (None, 2, None, 32)
        assert len(r.io.profiles) == 2 and r.metadata["tensorrt_version"] == "10.3.0"
    with runner(bundle, "vision", trt, cuda) as r:
        assert r.inputs[0].shape == (None, 3, 64, 64) and r.outputs[0].dtype == "float32"


def test_outputs_equal_the_parts_run_directly(trt_bundle, ort_feeds):
    bundle, profiles = trt_bundle
    ort_engine, feeds = ort_feeds
    trt, cuda = fake_runtime(bundle, profiles)
    for part, feed_list in feeds.items():
        with runner(bundle, part, trt, cuda) as r:
            for feed in feed_list:
                got = r.infer(feed, check=True)
                want = ort_engine.runners[part].infer(feed)
                assert sorted(got) == sorted(want)
                for name in want:
                    np.testing.assert_array_equal(got[name], want[name], err_msg=f"{part}.{name}")
                    assert not cuda.is_pinned(got[name])    # a copy, not the reused staging buffer
    assert cuda.calls["htod"] == cuda.calls["htod_pinned"] > 0     # every upload went through pinned memory


def test_profile_choice_and_shape_bookkeeping(trt_bundle, ort_feeds):
    bundle, profiles = trt_bundle
    _, feeds = ort_feeds
    prefill, decode = feeds["decoder"]
    trt, cuda = fake_runtime(bundle, profiles)
    with runner(bundle, "decoder", trt, cuda) as r:
        ctx = r.context
        r.infer(prefill)
        assert r.active_profile == 0 and [p.name for p in profiles["decoder"]] == ["prefill", "decode"]
        r.infer(decode)
        assert r.active_profile == 1                      # seq 1 lands on the decode profile
        switches, shapes_set, allocs = (ctx.calls["set_optimization_profile_async"], ctx.calls["set_input_shape"],
                                        cuda.calls["alloc"])
        r.infer(decode)
        r.infer(decode)
        assert ctx.calls["set_optimization_profile_async"] == switches     # no switch for nothing
        assert ctx.calls["set_input_shape"] == shapes_set                   # unchanged shapes are not re-set
        assert cuda.calls["alloc"] == allocs                                # buffers are reused
        r.infer(prefill)
        assert r.active_profile == 0 and ctx.calls["set_optimization_profile_async"] == switches + 1
        assert trt.engines[b"FAKE-ENGINE:decoder"].executed_profiles == [0, 1, 1, 1, 0]


def test_shapes_outside_every_profile_say_how_to_rebuild(trt_bundle):
    bundle, profiles = trt_bundle
    trt, cuda = fake_runtime(bundle, profiles)
    with runner(bundle, "vision", trt, cuda) as r:
        with pytest.raises(InputError, match=r"none of the engine's optimization profiles.*--max-batch"):
            r.infer({"pixel_values": np.zeros((9, 3, 64, 64), np.float32)})
        with pytest.raises(InputError, match="dtype float64"):
            r.infer({"pixel_values": np.zeros((1, 3, 64, 64), np.float64)})
        with pytest.raises(InputError, match="missing"):
            r.infer({})


def test_kv_cache_stays_on_the_device_and_tokens_match(trt_bundle):
    from edgevl.runtimes.generation import stream_tokens
    from edgevl.runtimes.sampling import SamplingParams

    bundle, profiles = trt_bundle
    trt, cuda = fake_runtime(bundle, profiles)
    ort, dev = Engine(bundle, "onnxruntime").activate(), trt_engine(bundle, trt, cuda)
    try:
        params = SamplingParams(max_new_tokens=8)
        for prompt in ("what color is the circle?", "describe the image."):
            ids = ort.encode_prompt(prompt)
            pixels = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
            want = list(stream_tokens(ort, ids, ort.encode_images(pixels), params))
            got = list(stream_tokens(dev, ids, dev.encode_images(pixels), params))
            assert got == want and len(got) > 0

        # one decode step moves only the token, past_len and the logits across the bus
        host_cache, dev_cache = ort.new_cache(), dev.new_cache()
        assert isinstance(dev_cache, DeviceKVCache) and isinstance(host_cache, KVCache)
        embeds = ort.merge(ids, ort.encode_images(pixels))
        ort.prefill(host_cache, 0, embeds)
        dev.prefill(dev_cache, 0, embeds)
        before = dict(cuda.calls)
        logits_dev = dev.decode(dev_cache, 1, np.array([5], np.int64))
        logits_ort = ort.decode(host_cache, 1, np.array([5], np.int64))
        delta = {k: cuda.calls[k] - before.get(k, 0) for k in ("htod", "dtoh", "copy2d")}
        assert delta == {"htod": 3, "dtoh": 2, "copy2d": 2 * bundle.manifest["decoder"]["n_layers"]}
        np.testing.assert_array_equal(logits_dev, logits_ort)
        mirrored = dev_cache.to_host()
        for a, b in zip(mirrored.keys + mirrored.values, host_cache.keys + host_cache.values):
            n = int(host_cache.length[0])
            np.testing.assert_array_equal(a[:, :, :n], b[:, :, :n])
    finally:
        ort.close()
        dev.close()


def test_device_kv_cache_can_be_turned_off(trt_bundle):
    bundle, profiles = trt_bundle
    trt, cuda = fake_runtime(bundle, profiles)
    engine = trt_engine(bundle, trt, cuda, device_kv_cache=False)
    try:
        assert isinstance(engine.new_cache(), KVCache)
    finally:
        engine.close()


def test_device_cache_behaves_like_the_host_cache():
    """Random writes at different lengths, growth, move and reset: same contents as KVCache."""
    rng = np.random.default_rng(1)
    cuda = FakeCuda()
    stream = cuda.new_stream()
    spec = dict(n_layers=2, n_kv_heads=2, head_dim=4, slots=3, capacity=64, max_capacity=256)
    host, dev = KVCache(**spec), DeviceKVCache(cuda, stream, **spec)

    def step(rows, t, same=True):
        n = rows.stop - rows.start
        out = {f"present_{k}.{i}": rng.standard_normal((n, 2, t, 4)).astype(np.float32)
               for i in range(2) for k in ("key", "value")}
        for cache in (host, dev):
            cache.ensure(int(cache.length[rows].max()) + t)
            cache.write(out, rows)

    step(slice(0, 1), 40)               # prefill slot 0
    step(slice(1, 2), 7)                # prefill slot 1 (different length)
    step(slice(0, 2), 1)                # batched decode, rows at different positions
    step(slice(2, 3), 70)               # slot 2 grows the cache past 64 (ensure doubles)
    step(slice(0, 3), 1)
    assert host.capacity == dev.capacity == 128
    for cache in (host, dev):
        cache.move(2, 0)
        cache.reset(1)
    step(slice(0, 1), 3)
    mirrored = dev.to_host()
    np.testing.assert_array_equal(mirrored.length, host.length)
    for a, b in zip(mirrored.keys + mirrored.values, host.keys + host.values):
        for slot, n in enumerate(host.length.tolist()):
            np.testing.assert_array_equal(a[slot, :, :n], b[slot, :, :n])
    feeds = dev.feeds(slice(0, 2))
    assert feeds["past_key.1"].shape == (2, 2, 128, 4) and feeds["past_len"].tolist() == host.length[:2].tolist()
    np.testing.assert_array_equal(feeds["past_key.0"].copy(), host.keys[0][:2])   # np-style access downloads
    dev.close()
    assert cuda.calls["free"] >= 4


def _copy_with_sidecar(trt_bundle, tmp_path, change):
    bundle, profiles = trt_bundle
    root = tmp_path / "b"
    shutil.copytree(bundle.path, root)
    side = sidecar_path(root / "tensorrt" / "vision.engine")
    meta = json.loads(side.read_text())
    change(meta)
    side.write_text(json.dumps(meta))
    return load_bundle(root, verify=False), profiles


def test_engines_built_elsewhere_are_refused(trt_bundle, tmp_path):
    bundle, profiles = trt_bundle
    trt, cuda = fake_runtime(bundle, profiles, version="10.4.1")
    with pytest.raises(EngineMismatch, match=r"TensorRT 10\.3\.0.*TensorRT 10\.4\.1.*not portable.*"
                                             r"edgevl compile BUNDLE --target tensorrt"):
        runner(bundle, "vision", trt, cuda).activate()
    trt, cuda = fake_runtime(bundle, profiles, gpu=("Other GPU", "8.7"))
    with pytest.raises(EngineMismatch, match="built on 'Fake GPU', this GPU is 'Other GPU'"):
        runner(bundle, "vision", trt, cuda).activate()
    runner(bundle, "vision", trt, cuda, allow_other_gpu=True).activate().close()   # same compute capability
    trt, cuda = fake_runtime(bundle, profiles, gpu=("Fake GPU", "9.0"))
    with pytest.raises(EngineMismatch, match="compute capability 8.7"):
        runner(bundle, "vision", trt, cuda, allow_other_gpu=True).activate()

    stale, _ = _copy_with_sidecar(trt_bundle, tmp_path, lambda m: m["onnx"].update(sha256="0" * 64))
    trt, cuda = fake_runtime(stale, profiles)
    with pytest.raises(EngineMismatch, match="different vision.onnx.*stale"):
        runner(stale, "vision", trt, cuda).activate()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_missing_tensorrt_names_the_extra(trt_bundle):
    from edgevl.runtimes.registry import get_runner_class

    bundle, _ = trt_bundle
    with pytest.raises(BackendUnavailable, match=r"pip install edgevl\[tensorrt\]"):
        get_runner_class("tensorrt")
    with pytest.raises(BackendUnavailable, match=r"pip install edgevl\[tensorrt\]"):
        TensorRTRunner(bundle.part_file("vision", "tensorrt"), cuda=FakeCuda()).activate()


@pytest.mark.skipif(importlib.util.find_spec("pycuda") is not None or importlib.util.find_spec("cuda") is not None,
                    reason="pycuda or cuda-python is installed here")
def test_missing_cuda_bindings_name_the_extra(trt_bundle):
    bundle, profiles = trt_bundle
    trt, _ = fake_runtime(bundle, profiles)
    with pytest.raises(BackendUnavailable, match=r"pycuda.*pip install edgevl\[tensorrt\]"):
        TensorRTRunner(bundle.part_file("vision", "tensorrt"), trt_module=trt).activate()


class _NoDriver:
    """pycuda.driver as it behaves without a GPU or driver."""

    class Device:
        @staticmethod
        def count():
            return 0

    def __init__(self, init_error=None):
        self.init_error = init_error

    def init(self):
        if self.init_error:
            raise self.init_error


def test_no_gpu_is_a_clear_error():
    from edgevl.runtimes.cuda_memory import CudaPythonMemory, PyCudaMemory

    with pytest.raises(BackendUnavailable, match="no usable NVIDIA GPU.*no CUDA-capable device.*driver"):
        PyCudaMemory(driver=_NoDriver(RuntimeError("cuInit failed: no CUDA-capable device is detected")))
    with pytest.raises(BackendUnavailable, match=r"CUDA sees 0 GPU\(s\)"):
        PyCudaMemory(driver=_NoDriver())

    class _Runtime:      # cuda-python returns (error, value) tuples
        @staticmethod
        def cudaGetDeviceCount():
            return (100, 0)       # cudaErrorNoDevice
    with pytest.raises(BackendUnavailable, match="no usable NVIDIA GPU"):
        CudaPythonMemory(cudart=_Runtime())


# -- findings from reading the real bindings (issue 20) -------------------------------------------
def _standalone_engine(tmp_path, tensors, profiles, compute, version="10.3.0"):
    """An engine file + sidecar outside any bundle, backed by a FakeEngine."""
    cuda, trt = FakeCuda(), FakeTRT(version)
    path = tmp_path / "part.engine"
    write_engine(path, b"FAKE-ENGINE:standalone", make_metadata(
        part="part", fingerprint=DeviceFingerprint(version, "Fake GPU", "8.7"), onnx_file="part.onnx",
        onnx_sha256="", engine_sha256="", build={}))
    trt.engines[b"FAKE-ENGINE:standalone"] = FakeEngine(cuda, tensors, profiles, compute)
    return TensorRTRunner(path, trt_module=trt, cuda=cuda), trt, cuda


def test_a_refused_profile_switch_is_an_edgevl_error(trt_bundle, ort_feeds):
    """Finding 1: set_optimization_profile_async never returns False; the binding raises
    RuntimeError("Error in set optimization profile async.") (pyCore.cpp), which the runner turns
    into its own message."""
    from edgevl.errors import BackendError

    bundle, profiles = trt_bundle
    prefill, decode = ort_feeds[1]["decoder"]
    trt, cuda = fake_runtime(bundle, profiles)
    trt.engines[b"FAKE-ENGINE:decoder"].refused.add(1)          # TensorRT refuses the decode profile
    with runner(bundle, "decoder", trt, cuda) as r:
        r.infer(prefill)
        with pytest.raises(BackendError, match=r"refused to switch to optimization profile 1 of 2 \(Error in set "
                                               r"optimization profile async\."):
            r.infer(decode)


def test_static_engines_have_one_profile_and_run(tmp_path):
    """Finding 7: an engine without dynamic inputs still has one optimization profile
    (num_optimization_profiles "is always at least 1", pyCoreDoc.h)."""
    tensors = [("x", True, np.float32, (2, 3)), ("y", False, np.float32, (2, 3))]
    r, trt, _ = _standalone_engine(tmp_path, tensors, [], lambda feeds: {"y": feeds["x"] * 2})
    with r:
        assert trt.engines[b"FAKE-ENGINE:standalone"].num_optimization_profiles == 1
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        np.testing.assert_array_equal(r.infer({"x": x})["y"], x * 2)
        assert r.inputs[0].shape == (2, 3) and r.active_profile == 0


def test_tensorrt_dtypes_map_like_the_real_nptype(tmp_path):
    """Finding 8: get_tensor_dtype returns a TensorRT DataType; trt.nptype maps FLOAT, HALF, INT8,
    INT32, INT64, BOOL, UINT8 and raises TypeError for BF16/FP8/INT4/FP4, which the runner
    reports as an engine it cannot bind."""
    trt = FakeTRT("11.4.1")
    assert trt.nptype(trt.float16) is np.float16 and trt.nptype(trt.bool) is np.bool_
    for unsupported in (trt.bfloat16, trt.fp8, trt.int4, trt.fp4):
        with pytest.raises(TypeError, match="Could not resolve TensorRT datatype"):
            trt.nptype(unsupported)

    tensors = [("x", True, np.float16, (-1, 4)), ("n", True, np.int64, (1,)), ("y", False, np.float16, (-1, 4))]
    r, _, _ = _standalone_engine(tmp_path, tensors, [{"x": ((1, 4), (1, 4), (4, 4))}],
                                 lambda feeds: {"y": feeds["x"] + 1})
    with r:
        assert [(t.name, t.dtype) for t in r.inputs] == [("x", "float16"), ("n", "int64")]
        out = r.infer({"x": np.ones((3, 4), np.float16), "n": np.zeros(1, np.int64)})["y"]
        assert out.dtype == np.float16 and out.tolist() == [[2.0] * 4] * 3

    tensors = [("x", True, np.float32, (1, 4)), ("y", False, "BF16", (1, 4))]
    (tmp_path / "bf16").mkdir()
    r, _, _ = _standalone_engine(tmp_path / "bf16", tensors, [], lambda feeds: {})
    with pytest.raises(BundleError, match=r"engine tensor 'y' has TensorRT type DataType.BF16, which has no numpy "
                                          r"equivalent.*float32/float16"):
        r.activate()


def test_cuda_python_sets_the_device_on_every_calling_thread():
    """Finding 6: cudaSetDevice is per host thread; a scheduler or server thread must allocate,
    create streams and copy on the runner's device, not on device 0."""
    import threading

    from edgevl.runtimes.cuda_memory import CudaPythonMemory
    from trt_fakes import FakeCudart

    rt = FakeCudart(count=2)
    cuda = CudaPythonMemory(device_index=1, cudart=rt)
    rt.calls.clear()

    def work():
        buf = cuda.alloc(64)
        stream = cuda.new_stream()
        host = cuda.pinned(64)
        cuda.htod(buf.ptr, host, stream)
        cuda.synchronize(stream)
        cuda.free(buf)
        after.append(rt.cudaGetDevice())

    after: list = []
    worker = threading.Thread(target=work, name="scheduler")
    worker.start()
    worker.join()
    ran = [(name, device) for name, device, thread in rt.calls if thread == "scheduler"]
    assert len(ran) == 6 and {device for _, device in ran} == {1}, ran
    assert after == [(0, 0)]                     # the thread's own current device is left as it was
