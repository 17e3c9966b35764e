"""TensorRT runner: one serialized engine (built by `edgevl compile --target tensorrt`) on one GPU.

Loading refuses an engine built for another TensorRT version, another GPU or another ONNX
file (engines are not portable; see trt_metadata). Inference uses the name-based tensor API
of TensorRT 10/11: pick the optimization profile that fits the feeds, ``set_input_shape`` for
each input whose shape changed, read the output shapes back, ``set_tensor_address`` for every
tensor and ``execute_async_v3`` on the runner's stream. Device buffers grow and are reused;
host inputs go through pinned staging buffers so the copies are truly asynchronous.

Feeds may be numpy arrays or DeviceArrays (no copy). When any feed is on the device, the
outputs named in ``device_outputs`` (default: ``present_*``) stay there too: that is how the
decoder's KV cache stays on the GPU between steps (``new_kv_cache`` hands Engine a
DeviceKVCache sharing this runner's stream). DeviceArray outputs point into the runner's own
buffers and are valid until its next ``infer``.

Options: ``device_kv_cache`` (default True), ``device_outputs`` (prefixes, default
("present_",)), ``allow_other_gpu`` (default False), ``device_index`` (or device="cuda:N").
Tests inject ``trt_module`` and ``cuda`` (fakes); nothing is monkeypatched.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np

from edgevl.errors import BackendError, BackendUnavailable, BundleError, InputError
from edgevl.runtimes.base import Runner
from edgevl.runtimes.cuda_memory import DeviceArray, open_cuda
from edgevl.runtimes.trt_bindings import EngineIO
from edgevl.runtimes.trt_metadata import (REBUILD_HINT, DeviceFingerprint, bundle_onnx_sha256, read_metadata,
                                          require_compatible)

MIN_BUFFER = 256         # bytes; TensorRT wants a valid address even for empty tensors


def import_tensorrt():
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable("backend 'tensorrt' needs the tensorrt Python package, which is not installed; "
                                 "install it with `pip install edgevl[tensorrt]` (on Jetson it comes with JetPack: "
                                 "`sudo apt install python3-libnvinfer`)")
    return importlib.import_module("tensorrt")


def _device_index(device: str | None, options: dict) -> int:
    if "device_index" in options:
        return int(options["device_index"])
    if device and device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    if device not in (None, "cuda", "gpu", "dla"):
        raise BackendUnavailable(f"tensorrt: unknown device {device!r}; use 'cuda' or 'cuda:N'")
    return 0


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, path, *, precision="fp32", threads=None, device=None, options=None,
                 trt_module=None, cuda=None):
        super().__init__(path, precision=precision, threads=threads, device=device, options=options)
        self._trt_module, self._cuda_layer = trt_module, cuda
        self.metadata: dict = {}

    # -- load ----------------------------------------------------------------------------------
    def _load(self):
        trt = self._trt_module or import_tensorrt()
        cuda = self._cuda_layer or open_cuda(_device_index(self.device, self.options))
        if not self.path.is_file():
            raise BundleError(f"{self.path}: engine file is missing; {REBUILD_HINT}")
        meta = read_metadata(self.path)
        gpu_name, capability = cuda.device_info()
        here = DeviceFingerprint(str(trt.__version__), gpu_name, capability)
        require_compatible(meta, here, self.path, onnx_sha256=bundle_onnx_sha256(self.path, meta),
                           allow_other_gpu=bool(self.options.get("allow_other_gpu", False)))
        with cuda.activate():
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            dla_core = meta.get("build", {}).get("dla_core")
            if dla_core is not None:
                self._runtime.DLA_core = int(dla_core)
            engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if engine is None:
                raise BundleError(f"{self.path}: TensorRT {trt.__version__} could not deserialize this engine (see "
                                  f"the TensorRT log above); {REBUILD_HINT}")
            context = engine.create_execution_context()
            if context is None:
                raise BackendUnavailable(f"{self.path}: TensorRT could not create an execution context (out of GPU "
                                         "memory?); close other GPU programs or rebuild with smaller --max-* ranges")
        self.metadata, self.engine, self.context, self.cuda = meta, engine, context, cuda
        self.io = EngineIO.from_engine(engine, trt)
        self.stream = cuda.new_stream()
        self._profile: int | None = None
        self._shapes_set: dict[str, tuple] = {}
        self._device: dict[str, object] = {}       # name -> DeviceBuffer (grow-only)
        self._pinned: dict[str, np.ndarray] = {}   # name -> pinned uint8 staging buffer (grow-only)
        self._keep_prefixes = tuple(self.options.get("device_outputs", ("present_",)))
        return [s.info() for s in self.io.inputs], [s.info() for s in self.io.outputs]

    # -- buffers -------------------------------------------------------------------------------
    def _device_buffer(self, name: str, nbytes: int):
        buf = self._device.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self.cuda.synchronize(self.stream)
                self.cuda.free(buf)
            size = max(MIN_BUFFER, nbytes if buf is None else max(nbytes, 2 * buf.nbytes))
            buf = self._device[name] = self.cuda.alloc(size)
        return buf

    def _host_buffer(self, name: str, nbytes: int) -> np.ndarray:
        host = self._pinned.get(name)
        if host is None or host.nbytes < nbytes:
            if host is not None:
                self.cuda.free_pinned(host)
            host = self._pinned[name] = self.cuda.pinned(max(MIN_BUFFER, nbytes))
        return host

    # -- inference -----------------------------------------------------------------------------
    def _select(self, shapes: dict[str, tuple]) -> None:
        profile = self.io.choose_profile(shapes, self._profile)
        if profile != self._profile:
            try:   # the binding returns True or raises RuntimeError("Error in set optimization profile async.")
                self.context.set_optimization_profile_async(profile, self.stream)
            except RuntimeError as e:
                raise BackendError(f"{self.path.name}: TensorRT refused to switch to optimization profile {profile} of "
                                   f"{len(self.io.profiles)} ({e}; see the TensorRT log above); if this engine was "
                                   f"copied from elsewhere, {REBUILD_HINT}") from e
            self._profile, self._shapes_set = profile, {}
        for name, shape in shapes.items():
            if self._shapes_set.get(name) != shape:
                if not self.context.set_input_shape(name, shape):
                    raise InputError(f"{self.path.name}: TensorRT rejected shape {shape} for input {name!r} "
                                     f"(profile {profile}: {self.io.profiles[profile].get(name)})")
                self._shapes_set[name] = shape

    def _infer(self, feeds):
        self.io.check_dtypes(feeds)
        shapes = {s.name: tuple(int(d) for d in feeds[s.name].shape) for s in self.io.inputs}
        on_device = any(isinstance(v, DeviceArray) for v in feeds.values())
        with self.cuda.activate():
            self._select(shapes)
            for slot in self.io.inputs:
                self.context.set_tensor_address(slot.name, self._bind_input(slot, feeds[slot.name]))
            out_shapes = {}
            for slot in self.io.outputs:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(slot.name))
                if any(d < 0 for d in shape):
                    raise BackendUnavailable(f"{self.path.name}: output {slot.name!r} has a data-dependent shape "
                                             f"{shape}, which edgevl's TensorRT runner does not support")
                out_shapes[slot.name] = shape
                nbytes = int(np.prod(shape, dtype=np.int64)) * slot.dtype.itemsize
                self.context.set_tensor_address(slot.name, self._device_buffer(slot.name, nbytes).ptr)
            if not self.context.execute_async_v3(self.stream):
                raise BackendUnavailable(f"{self.path.name}: TensorRT execution failed (see the TensorRT log above)")
            results, pending = {}, []
            for slot in self.io.outputs:
                shape, ptr = out_shapes[slot.name], self._device[slot.name].ptr
                if on_device and slot.name.startswith(self._keep_prefixes):
                    results[slot.name] = DeviceArray(self.cuda, ptr, shape, slot.dtype, self.stream)
                    continue
                nbytes = int(np.prod(shape, dtype=np.int64)) * slot.dtype.itemsize
                host = self._host_buffer(slot.name, nbytes)[:nbytes]
                if nbytes:
                    self.cuda.dtoh(host, ptr, self.stream)
                pending.append((slot, shape, host))
            self.cuda.synchronize(self.stream)
        for slot, shape, host in pending:   # copy out of the reused pinned buffers
            results[slot.name] = host.view(slot.dtype).reshape(shape).copy()
        return results

    def _bind_input(self, slot, value) -> int:
        if isinstance(value, DeviceArray):
            if slot.host_shape_tensor:
                raise InputError(f"input {slot.name!r} is a shape tensor and must be a host (numpy) array")
            return value.ptr
        array = np.ascontiguousarray(value)
        if slot.host_shape_tensor:       # TensorRT reads shape tensors from host memory
            host = self._host_buffer(slot.name, array.nbytes)
            host[:array.nbytes] = array.reshape(-1).view(np.uint8)
            return host.ctypes.data
        buf = self._device_buffer(slot.name, array.nbytes)
        if array.nbytes:
            host = self._host_buffer(slot.name, array.nbytes)[:array.nbytes]
            host[:] = array.reshape(-1).view(np.uint8)
            self.cuda.htod(buf.ptr, host, self.stream)
        return buf.ptr

    # -- KV cache on the device ----------------------------------------------------------------
    def new_kv_cache(self, *, n_layers, n_kv_heads, head_dim, slots=1, capacity=64, max_capacity=4096,
                     dtype=np.float32):
        """A DeviceKVCache on this runner's stream (the decoder part only), or None to let the
        Engine use its host KVCache (option device_kv_cache=False, or a part without a cache)."""
        if not self.options.get("device_kv_cache", True):
            return None
        self.activate()
        if "past_key.0" not in self.io.slots:
            return None
        from edgevl.runtimes.device_kv_cache import DeviceKVCache

        return DeviceKVCache(self.cuda, self.stream, n_layers, n_kv_heads, head_dim, slots=slots, capacity=capacity,
                             max_capacity=max_capacity, dtype=dtype)

    # -- close ---------------------------------------------------------------------------------
    def _close(self):
        try:
            self.cuda.synchronize(self.stream)
        finally:
            for buf in self._device.values():
                self.cuda.free(buf)
            for host in self._pinned.values():
                self.cuda.free_pinned(host)
            self.cuda.destroy_stream(self.stream)
            self._device, self._pinned = {}, {}
            self.context = self.engine = self._runtime = None

    @property
    def active_profile(self) -> int | None:
        return self._profile
