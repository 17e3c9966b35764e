"""Fakes of the small TensorRT and CUDA surfaces the TensorRT runner uses, for tests without a GPU.

- FakeCuda: a CudaMemory whose "device" is numpy byte arrays at integer addresses. Copies and
  kernels are *queued* per stream and only run at ``synchronize`` (as on a GPU), so a runner
  that reads results before synchronising, or reuses a staging buffer too early, gets wrong
  numbers here too. Out-of-bounds accesses raise.
- FakeEngine / FakeContext: the name-based tensor API (num_io_tensors, get_tensor_*,
  optimization profiles, set_input_shape, set_tensor_address, execute_async_v3). The math is a
  function of the feeds; ``FakeEngine.from_onnx`` runs the real ONNX part in ONNX Runtime, so
  the fake engine computes exactly what the bundle computes.
- FakeTRT: the module-level bits (``__version__``, Logger, Runtime, TensorIOMode, nptype).

They are injected into TensorRTRunner (``trt_module=``, ``cuda=``); nothing is patched globally.
"""

from __future__ import annotations

import bisect
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


class FakeContext:
    def __init__(self, engine: "FakeEngine"):
        self.engine = engine
        self.profile = 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.calls = Counter()

    def set_optimization_profile_async(self, index, stream):
        self.calls["set_optimization_profile_async"] += 1
        if not 0 <= index < len(self.engine.profiles):
            return False
        self.profile, self.shapes = index, {}     # TensorRT invalidates input shapes on a switch
        return True

    def set_input_shape(self, name, shape):
        self.calls["set_input_shape"] += 1
        static = self.engine.shapes[name]
        lo, _, hi = self.engine.profiles[self.profile].get(name, (static, static, static))
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name in self.engine.inputs:
            return self.shapes.get(name, self.engine.shapes[name])
        missing = [n for n in self.engine.inputs if n not in self.shapes and -1 in self.engine.shapes[n]]
        if missing:
            return tuple(-1 for _ in self.engine.shapes[name])
        return self.engine.output_shapes({n: self.get_tensor_shape(n) for n in self.engine.inputs})[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream):
        self.calls["execute_async_v3"] += 1
        eng = self.engine
        assert set(self.addresses) == set(eng.dtypes), f"unbound tensors: {set(eng.dtypes) - set(self.addresses)}"
        shapes = {n: self.get_tensor_shape(n) for n in eng.dtypes}
        addresses = dict(self.addresses)
        self.engine.executed_profiles.append(self.profile)

        def run():
            feeds = {n: eng.cuda.read(addresses[n], shapes[n], eng.dtypes[n]) for n in eng.inputs}
            outputs = eng.compute(feeds)
            for n in eng.outputs:
                out = np.ascontiguousarray(outputs[n], dtype=eng.dtypes[n])
                assert out.shape == tuple(shapes[n]), (n, out.shape, shapes[n])
                eng.cuda.view(addresses[n], out.nbytes)[:] = out.reshape(-1).view(np.uint8)
        eng.cuda.enqueue(stream, run)
        return True


class FakeEngine:
    """``tensors``: [(name, is_input, dtype, shape with -1)]; ``profiles``: [{input: (min, opt, max)}]."""

    def __init__(self, cuda: FakeCuda, tensors, profiles, compute):
        self.cuda, self.compute, self.profiles = cuda, compute, profiles
        self.names = [t[0] for t in tensors]
        self.inputs = [t[0] for t in tensors if t[1]]
        self.outputs = [t[0] for t in tensors if not t[1]]
        self.dtypes = {t[0]: np.dtype(t[2]) for t in tensors}
        self.shapes = {t[0]: tuple(t[3]) for t in tensors}
        self.contexts: list[FakeContext] = []
        self.executed_profiles: list[int] = []
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

    # -- the ICudaEngine surface the runner uses ---------------------------------------------
    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return FakeTRT.TensorIOMode.INPUT if name in self.inputs else FakeTRT.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def is_shape_inference_io(self, name):
        return False

    @property
    def num_optimization_profiles(self):
        return len(self.profiles)

    def get_tensor_profile_shape(self, name, index):
        return self.profiles[index][name]

    def create_execution_context(self):
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx

    def output_shapes(self, input_shapes: dict) -> dict:
        """Like TensorRT's shape inference: computed from input shapes only (here by running zeros)."""
        key = tuple(sorted(input_shapes.items()))
        if key not in self._shape_cache:
            zeros = {n: np.zeros(s, self.dtypes[n]) for n, s in input_shapes.items()}
            self._shape_cache[key] = {n: tuple(v.shape) for n, v in self.compute(zeros).items()}
        return self._shape_cache[key]


class FakeRuntime:
    def __init__(self, trt: "FakeTRT"):
        self.trt = trt
        self.DLA_core = -1

    def deserialize_cuda_engine(self, data: bytes):
        return self.trt.engines.get(bytes(data))


class FakeTRT:
    """Module-like stand-in for ``import tensorrt``; ``engines`` maps engine-file bytes to engines."""

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class Logger:
        WARNING = 2

        def __init__(self, level=None):
            self.level = level

    def __init__(self, version: str = "10.3.0"):
        self.__version__ = version
        self.engines: dict[bytes, FakeEngine] = {}

    def Runtime(self, logger):
        return FakeRuntime(self)

    @staticmethod
    def nptype(dtype):
        return dtype
