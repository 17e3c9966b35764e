"""Fakes of the TensorRT and CUDA surfaces edgevl uses, for tests without a GPU.

They follow the real Python bindings' contracts (return types, exceptions, invariants), read
from NVIDIA's TensorRT repository on ``release/10.3`` and ``main`` (11.1):
``python/src/infer/pyCore.cpp`` (the bindings), ``python/docstrings/infer/pyCoreDoc.h`` (their
documented contracts), ``python/src/parsers/pyOnnx.cpp`` (the ONNX parser),
``python/src/infer/pyFoundationalTypes.cpp`` (DataType) and
``python/packaging/bindings_wheel/tensorrt/__init__.py`` (``nptype``). Each fake method names
what it mirrors. Where the real behaviour could not be read (the builder's internals, its log
wording), the fake says so and does the least surprising thing.

- FakeCuda: a CudaMemory whose "device" is numpy byte arrays at integer addresses. Copies and
  kernels are *queued* per stream and only run at ``synchronize`` (as on a GPU), so a runner
  that reads results before synchronising, or reuses a staging buffer too early, gets wrong
  numbers here too. Out-of-bounds accesses raise.
- FakeCudart: cuda-python's runtime module: ``(error, value)`` tuples and a current device
  per host thread, recording the device each call ran on.
- FakeEngine / FakeContext / FakeRuntime: the name-based tensor API. The math is a function of
  the feeds; ``FakeEngine.from_onnx`` runs the real ONNX part in ONNX Runtime.
- FakeTRT: ``import tensorrt`` for one version (10.x or 11.x): DataType and ``nptype``,
  Logger/ILogger, Runtime, and the build side from trt_fakes_build.py: Builder,
  NetworkDefinition, OnnxParser (parses the real ONNX file), OptimizationProfile,
  BuilderConfig, timing cache. A built plan can be deserialized again by the same FakeTRT's
  Runtime (ONNX Runtime computes it).

They are injected (``trt_module=``, ``cuda=``, ``cudart=``); nothing is patched globally.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import threading
from collections import Counter, defaultdict

import numpy as np

from edgevl.runtimes.cuda_memory import CudaMemory, DeviceBuffer


class FakeCuda(CudaMemory):
    name = "fake"

    def __init__(self, gpu_name: str = "Fake GPU", capability: str = "8.7"):
        self.gpu = (gpu_name, capability)
        self._mem: dict[int, np.ndarray] = {}
        self._bases: list[int] = []
        self._next = 0x10000
        self._queues: dict[int, list] = defaultdict(list)
        self._streams = 0
        self.pinned_buffers: list[np.ndarray] = []
        self.calls = Counter()

    # -- memory --------------------------------------------------------------------------------
    def device_info(self):
        return self.gpu

    def alloc(self, nbytes):
        self.calls["alloc"] += 1
        ptr = self._next
        self._next += ((max(1, nbytes) + 255) // 256) * 256 + 4096      # gaps catch overruns
        self._mem[ptr] = np.full(max(1, nbytes), 0xAB, np.uint8)         # garbage, like cudaMalloc
        bisect.insort(self._bases, ptr)
        return DeviceBuffer(ptr, nbytes)

    def free(self, buf):
        self.calls["free"] += 1
        self._drain()                 # cudaFree synchronises the device
        del self._mem[buf.ptr]
        self._bases.remove(buf.ptr)

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        i = bisect.bisect_right(self._bases, ptr) - 1
        if i < 0:
            raise MemoryError(f"address 0x{ptr:x} is not device memory")
        base = self._bases[i]
        mem = self._mem[base]
        off = ptr - base
        if off + nbytes > mem.nbytes:
            raise MemoryError(f"access of {nbytes} bytes at 0x{ptr:x} overruns an allocation of {mem.nbytes} bytes")
        return mem[off:off + nbytes]

    def pinned(self, nbytes):
        self.calls["pinned"] += 1
        host = np.zeros(max(1, nbytes), np.uint8)
        self.pinned_buffers.append(host)
        return host

    def free_pinned(self, host):
        self.calls["free_pinned"] += 1

    def is_pinned(self, array: np.ndarray) -> bool:
        return any(np.shares_memory(array, p) for p in self.pinned_buffers)

    # -- streams -------------------------------------------------------------------------------
    def new_stream(self):
        self._streams += 1
        return self._streams

    def enqueue(self, stream, fn) -> None:
        self._queues[stream].append(fn)

    def synchronize(self, stream):
        self.calls["synchronize"] += 1
        queue = self._queues[stream]
        while queue:
            queue.pop(0)()

    def _drain(self):
        for s in list(self._queues):
            self.synchronize(s)

    def htod(self, dst, src, stream):
        self.calls["htod"] += 1
        self.calls["htod_pinned"] += self.is_pinned(src)

        def run():   # reads the host memory when it runs, like DMA from pinned memory
            self.view(dst, src.nbytes)[:] = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
        self.enqueue(stream, run)

    def dtoh(self, dst, src, stream):
        self.calls["dtoh"] += 1

        def run():
            dst.reshape(-1).view(np.uint8)[:] = self.view(src, dst.nbytes)
        self.enqueue(stream, run)

    def dtod(self, dst, src, nbytes, stream):
        self.calls["dtod"] += 1
        self.enqueue(stream, lambda: self.view(dst, nbytes).__setitem__(slice(None), self.view(src, nbytes).copy()))

    def copy2d(self, dst, dst_pitch, src, src_pitch, width, height, stream):
        self.calls["copy2d"] += 1
        assert width <= dst_pitch and width <= src_pitch, "cudaMemcpy2D: width exceeds a pitch"

        def run():
            for r in range(height):
                self.view(dst + r * dst_pitch, width)[:] = self.view(src + r * src_pitch, width).copy()
        self.enqueue(stream, run)

    def zero(self, ptr, nbytes, stream):
        self.calls["zero"] += 1
        self.enqueue(stream, lambda: self.view(ptr, nbytes).__setitem__(slice(None), 0))

    def read(self, ptr, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self.view(ptr, n).view(dtype).reshape(shape).copy()


# -- CUDA runtime (cuda-python) ----------------------------------------------------------------
class FakeCudart:
    """cuda-python's runtime module (``cuda.bindings.runtime``): every call returns a tuple whose
    first item is the error code (0 = cudaSuccess). The current device is per host thread, as
    ``cudaSetDevice`` documents ("sets device as the current device for the calling host
    thread"); ``calls`` records (function, device it ran on, thread name)."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3

    def __init__(self, count: int = 2):
        self.count = count
        self._local = threading.local()
        self._host: dict[int, object] = {}
        self._next = 0x7000_0000
        self.calls: list[tuple[str, int, str]] = []

    def _device(self) -> int:
        return getattr(self._local, "device", 0)      # a new thread starts on device 0

    def _record(self, name):
        self.calls.append((name, self._device(), threading.current_thread().name))

    def cudaGetDeviceCount(self):
        return (0, self.count)

    def cudaSetDevice(self, device):
        if not 0 <= device < self.count:
            return (101,)                                # cudaErrorInvalidDevice
        self._local.device = device
        return (0,)

    def cudaGetDevice(self):
        return (0, self._device())

    def cudaGetDeviceProperties(self, device):
        from types import SimpleNamespace

        return (0, SimpleNamespace(name=b"Fake GPU\x00\x00", major=8, minor=7))

    def cudaMalloc(self, nbytes):
        self._record("cudaMalloc")
        self._next += 1 << 20
        return (0, self._next)

    def cudaFree(self, ptr):
        self._record("cudaFree")
        return (0,)

    def cudaMallocHost(self, nbytes):
        import ctypes

        self._record("cudaMallocHost")
        buf = (ctypes.c_uint8 * nbytes)()
        self._host[ctypes.addressof(buf)] = buf
        return (0, ctypes.addressof(buf))

    def cudaFreeHost(self, ptr):
        self._record("cudaFreeHost")
        self._host.pop(ptr, None)
        return (0,)

    def cudaStreamCreate(self):
        self._record("cudaStreamCreate")
        self._next += 1
        return (0, self._next)

    def cudaStreamDestroy(self, stream):
        self._record("cudaStreamDestroy")
        return (0,)

    def cudaStreamSynchronize(self, stream):
        self._record("cudaStreamSynchronize")
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self._record("cudaMemcpyAsync")
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        self._record("cudaMemcpy2DAsync")
        return (0,)

    def cudaMemsetAsync(self, ptr, value, nbytes, stream):
        self._record("cudaMemsetAsync")
        return (0,)


# -- enums and DataType (pyCore.cpp / pyFoundationalTypes.cpp py::enum_) -------------------------
class _Member:
    """One value of a pybind11 enum: ``int()`` gives its value, equality is identity (an int is
    not accepted where the enum is, as with pybind11)."""

    def __init__(self, enum: str, name: str, value: int):
        self.enum, self.name, self.value = enum, name, value

    def __int__(self):
        return self.value

    def __repr__(self):
        return f"<{self.enum}.{self.name}: {self.value}>"

    def __str__(self):
        return f"{self.enum}.{self.name}"


def _enum(name: str, members, start: int = 0):
    """A class with one _Member per name, like ``trt.BuilderFlag``; a missing name is an
    AttributeError, as on the real module."""
    values = {m: _Member(name, m, i) for i, m in enumerate(members, start)}
    return type(name, (), {**values, "__members__": values})


DataType = _enum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64", "INT4",
                              "FP4", "E8M0"])
# trt.nptype (tensorrt/__init__.py, release/10.3 and main): these seven map, the rest raise TypeError
_NPTYPE = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
           DataType.INT64: np.int64, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8}
_FROM_NUMPY = {np.dtype(v): k for k, v in _NPTYPE.items()}
_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16, 3: DataType.INT8, 6: DataType.INT32,
              7: DataType.INT64, 9: DataType.BOOL, 2: DataType.UINT8, 17: DataType.FP8, 22: DataType.INT4}


def nptype(trt_type):
    """``tensorrt.nptype``: the numpy type of a TensorRT DataType, TypeError when numpy has none."""
    if trt_type in _NPTYPE:
        return _NPTYPE[trt_type]
    raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")


def trt_dtype(dtype) -> _Member:
    """A DataType from a DataType, a DataType name ("BF16") or a numpy dtype."""
    if isinstance(dtype, _Member):
        return dtype
    if isinstance(dtype, str) and hasattr(DataType, dtype):
        return getattr(DataType, dtype)
    return _FROM_NUMPY[np.dtype(dtype)]


TensorIOMode = _enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
DeviceType = _enum("DeviceType", ["GPU", "DLA"])
MemoryPoolType = _enum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM",
                                          "TACTIC_DRAM", "TACTIC_SHARED_MEMORY"])
# BuilderFlag members, in the bindings' order (pyCore.cpp release/10.3 and main = 11.1): 11.x has no
# FP16, BF16, INT8, FP8, INT4 or precision-constraint flags (weak typing is gone)
BUILDER_FLAGS = {
    10: ["FP16", "BF16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
         "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO",
         "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8", "ERROR_ON_TIMING_CACHE_MISS", "DISABLE_COMPILATION_CACHE",
         "WEIGHTLESS", "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING", "INT4", "REFIT_INDIVIDUAL"],
    11: ["DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "EDITABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
         "SAFETY_SCOPE", "DIRECT_IO", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "ERROR_ON_TIMING_CACHE_MISS",
         "DISABLE_COMPILATION_CACHE", "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING", "REFIT_INDIVIDUAL",
         "STRICT_NANS", "MONITOR_MEMORY", "DISTRIBUTIVE_INDEPENDENCE"],
}
# NetworkDefinitionCreationFlag: 10.x EXPLICIT_BATCH (ignored) + STRONGLY_TYPED; 11.x lost EXPLICIT_BATCH
# and keeps STRONGLY_TYPED "Deprecated: always enabled"
NETWORK_FLAGS = {10: ["EXPLICIT_BATCH", "STRONGLY_TYPED"],
                 11: ["STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS"]}
PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4")
# ONNX ops the fake DLA takes: NVIDIA's "DLA Supported Layers and Restrictions" table, at ONNX-op
# granularity (an approximation: the real rules also depend on parameters and shapes)
DLA_OPS = {"Conv", "ConvTranspose", "Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu", "PRelu", "MaxPool", "AveragePool",
           "GlobalAveragePool", "BatchNormalization", "Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Concat",
           "Resize", "Softmax", "Slice", "Reshape", "Transpose"}


# -- loggers (pyCore.cpp: py::class_<ILogger, PyLogger>, Logger) ------------------------------
class ILogger:
    """``tensorrt.ILogger``: subclasses call ``ILogger.__init__(self)`` and override
    ``log(severity, msg)`` (pyCoreDoc.h ILoggerDoc). Severity values are exported on the class."""

    Severity = _enum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (Severity.INTERNAL_ERROR, Severity.ERROR, Severity.WARNING,
                                                     Severity.INFO, Severity.VERBOSE)

    def __init__(self):
        pass

    def log(self, severity, msg):
        raise NotImplementedError("ILogger.log must be overridden")


class Logger(ILogger):
    """``tensorrt.Logger(min_severity)``: keeps messages at ``min_severity`` or worse (the real one
    prints them to stderr)."""

    def __init__(self, min_severity=ILogger.WARNING):
        super().__init__()
        self.min_severity = min_severity
        self.messages: list[tuple[str, str]] = []

    def log(self, severity, msg):
        if int(severity) <= int(self.min_severity):
            self.messages.append((severity.name, msg))


# -- engine, context, runtime ------------------------------------------------------------------
class FakeContext:
    """``IExecutionContext`` (pyCore.cpp) as the runner uses it."""

    def __init__(self, engine: "FakeEngine"):
        self.engine = engine
        self.profile = 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.calls = Counter()

    def set_optimization_profile_async(self, profile_index, stream_handle):
        """``context_set_optimization_profile_async``: PY_ASSERT_RUNTIME_ERROR(setOptimizationProfileAsync(..),
        "Error in set optimization profile async.") then ``return true``: never returns False."""
        self.calls["set_optimization_profile_async"] += 1
        if not 0 <= profile_index < self.engine.num_optimization_profiles or profile_index in self.engine.refused:
            raise RuntimeError("Error in set optimization profile async.")
        self.profile, self.shapes = profile_index, {}     # a switch invalidates the input shapes (pyCoreDoc.h)
        return True

    def set_input_shape(self, name, shape):
        """``setInputShape`` via the tuple/list overloads: a bool, False for a name that is not an
        input or a shape outside the active profile."""
        self.calls["set_input_shape"] += 1
        if name not in self.engine.inputs:
            return False
        lo, _, hi = self.engine.profile_shape(name, self.profile)
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name):
        """Inputs: the shape set (or the engine's, -1 for unset dynamic axes); outputs: inferred
        from the input shapes, all -1 while any dynamic input shape is unset."""
        if name in self.engine.inputs:
            return self.shapes.get(name, self.engine.shapes[name])
        missing = [n for n in self.engine.inputs if n not in self.shapes and -1 in self.engine.shapes[n]]
        if missing:
            return tuple(-1 for _ in self.engine.shapes[name])
        return self.engine.output_shapes({n: self.get_tensor_shape(n) for n in self.engine.inputs})[name]

    def set_tensor_address(self, name, memory):
        """``setTensorAddress`` -> bool (False for an unknown name)."""
        if name not in self.engine.dtypes:
            return False
        self.addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle):
        """``enqueueV3`` -> bool: False (error in ``engine.errors``) when a tensor has no address
        or a dynamic input shape was not set; otherwise the work is queued on the stream."""
        self.calls["execute_async_v3"] += 1
        eng = self.engine
        unbound = sorted(set(eng.dtypes) - set(self.addresses))
        unset = [n for n in eng.inputs if n not in self.shapes and -1 in eng.shapes[n]]
        if unbound or unset:
            eng.errors.append(f"enqueueV3: unbound tensors {unbound}, input shapes not set {unset}")
            return False
        shapes = {n: self.get_tensor_shape(n) for n in eng.dtypes}
        addresses = dict(self.addresses)
        eng.executed_profiles.append(self.profile)

        def run():
            feeds = {n: eng.cuda.read(addresses[n], shapes[n], eng.np_dtype(n)) for n in eng.inputs}
            outputs = eng.compute(feeds)
            for n in eng.outputs:
                out = np.ascontiguousarray(outputs[n], dtype=eng.np_dtype(n))
                assert out.shape == tuple(shapes[n]), (n, out.shape, shapes[n])
                eng.cuda.view(addresses[n], out.nbytes)[:] = out.reshape(-1).view(np.uint8)
        eng.cuda.enqueue(stream_handle, run)
        return True


class FakeEngine:
    """``ICudaEngine``. ``tensors``: [(name, is_input, dtype, shape with -1)], dtype a numpy
    dtype or a DataType name ("BF16"); ``profiles``: [{input: (min, opt, max)}]. With no
    profiles the engine has one implicit profile: num_optimization_profiles "is always at least
    1" (pyCoreDoc.h ICudaEngineDoc)."""

    def __init__(self, cuda: FakeCuda, tensors, profiles, compute):
        self.cuda, self.compute = cuda, compute
        self.profiles = [dict(p) for p in profiles] or [{}]
        self.names = [t[0] for t in tensors]
        self.inputs = [t[0] for t in tensors if t[1]]
        self.outputs = [t[0] for t in tensors if not t[1]]
        self.dtypes = {t[0]: trt_dtype(t[2]) for t in tensors}
        self.shapes = {t[0]: tuple(int(d) for d in t[3]) for t in tensors}
        self.contexts: list[FakeContext] = []
        self.executed_profiles: list[int] = []
        self.errors: list[str] = []
        self.refused: set[int] = set()     # profiles whose switch the C++ call refuses (a test sets them)
        self._shape_cache: dict = {}

    @classmethod
    def from_onnx(cls, cuda, onnx_path, part_spec: dict, profiles: list[dict]):
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        def compute(feeds):
            return dict(zip(names, session.run(names, feeds)))

        def dims(t):
            return tuple(d if isinstance(d, int) and d > 0 else -1 for d in t["shape"])
        tensors = [(t["name"], True, t["dtype"], dims(t)) for t in part_spec["inputs"]]
        tensors += [(t["name"], False, t["dtype"], dims(t)) for t in part_spec["outputs"]]
        return cls(cuda, tensors, profiles, compute)

    def np_dtype(self, name):
        return np.dtype(nptype(self.dtypes[name]))

    def profile_shape(self, name, index):
        static = self.shapes[name]
        return self.profiles[index].get(name, (static, static, static))

    # -- the ICudaEngine surface -------------------------------------------------------------
    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        """A ``DataType`` (not a numpy dtype): the runner maps it with ``trt.nptype``."""
        return self.dtypes[name]

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def is_shape_inference_io(self, name):
        return False

    @property
    def num_optimization_profiles(self):
        return len(self.profiles)

    def get_tensor_profile_shape(self, name, profile_index):
        """``get_tensor_profile_shape``: [min, opt, max] for the tensor under that profile."""
        return list(self.profile_shape(name, profile_index))

    def create_execution_context(self):
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx

    def output_shapes(self, input_shapes: dict) -> dict:
        """Like TensorRT's shape inference: computed from input shapes only (here by running zeros)."""
        key = tuple(sorted(input_shapes.items()))
        if key not in self._shape_cache:
            zeros = {n: np.zeros(s, self.np_dtype(n)) for n, s in input_shapes.items()}
            self._shape_cache[key] = {n: tuple(v.shape) for n, v in self.compute(zeros).items()}
        return self._shape_cache[key]


PLAN_MAGIC = b"FAKE-TRT-PLAN\n"


class FakeRuntime:
    """``tensorrt.Runtime(logger)``: ``DLA_core`` (get/setDLACore) and
    ``deserialize_cuda_engine(buffer)`` -> ICudaEngine, or None (nullptr, error logged) for data
    it cannot read, including a plan from another TensorRT version."""

    def __init__(self, trt: "FakeTRT", logger):
        self.trt, self.logger = trt, logger
        self.DLA_core = -1

    def deserialize_cuda_engine(self, serialized_engine):
        data = bytes(memoryview(serialized_engine))
        if data in self.trt.engines:
            return self.trt.engines[data]
        if not data.startswith(PLAN_MAGIC):
            self.logger.log(ILogger.ERROR, "Engine deserialization failed: not a serialized engine")
            return None
        header = json.loads(data[len(PLAN_MAGIC):].decode())
        if header["version"] != self.trt.__version__:
            self.logger.log(ILogger.ERROR, f"The engine plan file is not compatible with this version of TensorRT, "
                                           f"expecting library version {self.trt.__version__} got {header['version']}")
            return None
        return self.trt.engine_from_plan(header)


class FakeHostMemory(bytes):
    """``IHostMemory``: a buffer (``memoryview``/``bytes()`` work) with ``nbytes``."""

    @property
    def nbytes(self):
        return len(self)


class FakeTRT:
    """Module-like stand-in for ``import tensorrt`` of one version.

    ``engines`` maps engine-file bytes to prepared FakeEngines; plans built by this FakeTRT's
    Builder deserialize through its Runtime (ONNX Runtime computes them on ``cuda``).
    ``dla_cores`` is what ``Builder.num_DLA_cores`` reports; ``unsupported_ops`` fail parsing;
    ``builds`` records what each build saw; ``timing_hits`` counts timing-cache entries reused."""

    ILogger, Logger = ILogger, Logger
    DataType, TensorIOMode, DeviceType, MemoryPoolType = DataType, TensorIOMode, DeviceType, MemoryPoolType
    float32, float16, bfloat16, int8, int32, int64, bool, uint8, fp8, int4 = (
        DataType.FLOAT, DataType.HALF, DataType.BF16, DataType.INT8, DataType.INT32, DataType.INT64, DataType.BOOL,
        DataType.UINT8, DataType.FP8, DataType.INT4)
    nptype = staticmethod(nptype)

    def __init__(self, version: str = "10.3.0", *, dla_cores: int = 0, cuda: FakeCuda | None = None,
                 gpu: str = "Fake GPU", unsupported_ops=(), dla_ops=DLA_OPS):
        self.__version__ = version
        self.major = int(version.split(".")[0])
        generation = 11 if self.major >= 11 else 10
        self.BuilderFlag = _enum("BuilderFlag", BUILDER_FLAGS[generation])
        self.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", NETWORK_FLAGS[generation])
        if generation >= 11:
            self.fp4 = DataType.FP4
        self.dla_cores, self.cuda, self.gpu = dla_cores, cuda, gpu
        self.unsupported_ops, self.dla_ops = set(unsupported_ops), set(dla_ops)
        self.engines: dict[bytes, FakeEngine] = {}
        self.onnx_models: dict[str, bytes] = {}
        self.builds: list[dict] = []
        self.timing_hits = 0

    def Runtime(self, logger):
        return FakeRuntime(self, logger)

    def Builder(self, logger):
        from trt_fakes_build import FakeBuilder

        return FakeBuilder(self, logger)

    def OnnxParser(self, network, logger):
        from trt_fakes_build import FakeOnnxParser

        return FakeOnnxParser(network, logger)

    def engine_from_plan(self, header: dict) -> FakeEngine:
        import onnxruntime as ort

        session = ort.InferenceSession(self.onnx_models[header["onnx"]], providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        tensors = [(n, True, getattr(DataType, d), s) for n, d, s in header["inputs"]]
        tensors += [(n, False, getattr(DataType, d), s) for n, d, s in header["outputs"]]
        profiles = [{k: tuple(tuple(s) for s in v) for k, v in p.items()} for p in header["profiles"]]
        return FakeEngine(self.cuda, tensors, profiles, lambda feeds: dict(zip(names, session.run(names, feeds))))
