"""The little CUDA the TensorRT runner needs: device buffers, pinned host memory, a stream,
async copies (1-D and pitched 2-D) and device info; behind one small interface so the runner
can be tested here with a fake (no GPU on the CI machines) and run on pycuda or cuda-python.

    cuda = open_cuda()                 # pycuda if importable, else cuda-python
    buf = cuda.alloc(nbytes)           # DeviceBuffer(ptr, nbytes)
    host = cuda.pinned(nbytes)         # uint8 numpy array in page-locked memory
    s = cuda.new_stream()
    cuda.htod(buf.ptr, host, s); cuda.synchronize(s)

All pointers are plain ints; all copies are asynchronous on the given stream.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from dataclasses import dataclass

import numpy as np

from edgevl.errors import BackendUnavailable

INSTALL_HINT = "install it with `pip install edgevl[tensorrt]` (pycuda; cuda-python works too)"


@dataclass
class DeviceBuffer:
    ptr: int
    nbytes: int


class DeviceArray:
    """A typed, C-contiguous view of device memory. The runner accepts it as a feed (no copy)
    and returns it for outputs that stay on the GPU. ``np.asarray(x)`` / ``x.copy()`` download
    it, so code written for numpy arrays still works (slowly)."""

    def __init__(self, cuda: "CudaMemory", ptr: int, shape: tuple, dtype, stream: int | None = None):
        self.cuda, self.ptr, self.stream = cuda, int(ptr), stream
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, rows) -> "DeviceArray":
        """Leading-axis slices only (they stay contiguous): ``cache_keys[0:n]``."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("a DeviceArray supports only contiguous leading-axis slices such as x[a:b]")
        start, stop, _ = rows.indices(self.shape[0])
        stop = max(start, stop)
        row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        return DeviceArray(self.cuda, self.ptr + start * row_bytes, (stop - start, *self.shape[1:]), self.dtype,
                           self.stream)

    def to_host(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        if out.nbytes:
            stream = self.stream if self.stream is not None else self.cuda.default_stream()
            self.cuda.dtoh(out, self.ptr, stream)
            self.cuda.synchronize(stream)
        return out

    def copy(self) -> np.ndarray:
        return self.to_host()

    def __array__(self, dtype=None, copy=None):
        out = self.to_host()
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"DeviceArray(ptr=0x{self.ptr:x}, shape={self.shape}, dtype={self.dtype})"


class CudaMemory:
    """Interface of the CUDA layer (implemented by PyCudaMemory, CudaPythonMemory, test fakes)."""

    name = "?"

    def device_info(self) -> tuple[str, str]:           # (GPU name, "major.minor")
        raise NotImplementedError

    def alloc(self, nbytes: int) -> DeviceBuffer:
        raise NotImplementedError

    def free(self, buf: DeviceBuffer) -> None:
        raise NotImplementedError

    def pinned(self, nbytes: int) -> np.ndarray:          # uint8, page-locked
        raise NotImplementedError

    def free_pinned(self, host: np.ndarray) -> None:
        raise NotImplementedError

    def new_stream(self) -> int:
        raise NotImplementedError

    def destroy_stream(self, stream: int) -> None:
        pass

    def default_stream(self) -> int:
        return 0

    def synchronize(self, stream: int) -> None:
        raise NotImplementedError

    def htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        raise NotImplementedError

    def dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        raise NotImplementedError

    def dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        raise NotImplementedError

    def copy2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
               stream: int) -> None:
        """Device-to-device: ``height`` rows of ``width`` bytes, rows ``*_pitch`` bytes apart."""
        raise NotImplementedError

    def zero(self, ptr: int, nbytes: int, stream: int) -> None:
        raise NotImplementedError

    def activate(self):
        """Context manager making this layer's CUDA context current on the calling thread."""
        return contextlib.nullcontext()


class PyCudaMemory(CudaMemory):
    """pycuda on the device's *primary* context: the one TensorRT (CUDA runtime API) uses, so
    buffers allocated here are valid in TensorRT's kernels. Pushed around each use, so any
    thread (the scheduler's, a server's) can run the runner."""

    name = "pycuda"

    def __init__(self, device_index: int = 0, driver=None):
        if driver is None:
            import pycuda.driver as driver
        self.drv = driver
        try:
            driver.init()
            count = driver.Device.count()
        except Exception as e:  # pycuda raises its own LogicError/RuntimeError when no driver or GPU
            raise BackendUnavailable(f"tensorrt: no usable NVIDIA GPU: CUDA failed to initialise ({e}); check the "
                                     "NVIDIA driver (nvidia-smi, or tegrastats on Jetson) and CUDA_VISIBLE_DEVICES") from e
        if count <= device_index:
            raise BackendUnavailable(f"tensorrt: CUDA sees {count} GPU(s), GPU {device_index} was asked for; "
                                     "check the NVIDIA driver and CUDA_VISIBLE_DEVICES")
        self.device = driver.Device(device_index)
        self.context = self.device.retain_primary_context()
        self._allocations: dict[int, object] = {}
        self._streams: dict[int, object] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def activate(self):
        self.context.push()
        try:
            yield
        finally:
            self.drv.Context.pop()

    def device_info(self):
        major, minor = self.device.compute_capability()
        return str(self.device.name()), f"{major}.{minor}"

    def alloc(self, nbytes):
        with self.activate():
            a = self.drv.mem_alloc(max(1, int(nbytes)))
        with self._lock:
            self._allocations[int(a)] = a
        return DeviceBuffer(int(a), int(nbytes))

    def free(self, buf):
        with self._lock:
            a = self._allocations.pop(buf.ptr, None)
        if a is not None:
            with self.activate():
                a.free()

    def pinned(self, nbytes):
        with self.activate():
            return self.drv.pagelocked_empty(max(1, int(nbytes)), np.uint8)

    def free_pinned(self, host):
        base = getattr(host, "base", None)
        if base is not None and hasattr(base, "free"):
            with self.activate():
                base.free()

    def new_stream(self):
        with self.activate():
            s = self.drv.Stream()
        self._streams[int(s.handle)] = s
        return int(s.handle)

    def destroy_stream(self, stream):
        self._streams.pop(stream, None)       # pycuda destroys the stream when the object goes

    def _stream(self, handle):
        return self._streams.get(handle)     # None: the legacy default stream

    def synchronize(self, stream):
        s = self._stream(stream)
        with self.activate():
            s.synchronize() if s is not None else self.drv.Context.synchronize()

    def htod(self, dst, src, stream):
        with self.activate():
            self.drv.memcpy_htod_async(dst, src, self._stream(stream))

    def dtoh(self, dst, src, stream):
        with self.activate():
            self.drv.memcpy_dtoh_async(dst, src, self._stream(stream))

    def dtod(self, dst, src, nbytes, stream):
        with self.activate():
            self.drv.memcpy_dtod_async(dst, src, nbytes, self._stream(stream))

    def copy2d(self, dst, dst_pitch, src, src_pitch, width, height, stream):
        c = self.drv.Memcpy2D()
        c.set_src_device(int(src))
        c.set_dst_device(int(dst))
        c.src_pitch, c.dst_pitch = int(src_pitch), int(dst_pitch)
        c.width_in_bytes, c.height = int(width), int(height)
        with self.activate():
            c(self._stream(stream))

    def zero(self, ptr, nbytes, stream):
        with self.activate():
            self.drv.memset_d8_async(ptr, 0, nbytes, self._stream(stream))


class CudaPythonMemory(CudaMemory):
    """cuda-python's runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6).

    The CUDA runtime's current device is per host thread (``cudaSetDevice`` "sets device as the
    current device for the calling host thread"), so setting it once in ``__init__`` would leave
    the scheduler's and a server's threads allocating and copying on device 0. Every call here
    runs under ``activate()``, which sets this device on the calling thread and restores the
    thread's previous device afterwards (as pycuda's context push/pop does)."""

    name = "cuda-python"

    def __init__(self, device_index: int = 0, cudart=None):
        if cudart is None:
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:
                from cuda import cudart
        self.rt = cudart
        try:
            count = self._call(cudart.cudaGetDeviceCount())
        except RuntimeError as e:
            raise BackendUnavailable(f"tensorrt: no usable NVIDIA GPU: {e}; check the NVIDIA driver and "
                                     "CUDA_VISIBLE_DEVICES") from e
        if count <= device_index:
            raise BackendUnavailable(f"tensorrt: CUDA sees {count} GPU(s), GPU {device_index} was asked for")
        self.index = device_index
        self._call(cudart.cudaSetDevice(device_index))    # fail here, not on first use, for a bad device
        self._pinned: dict[int, int] = {}

    def _call(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)

    @contextlib.contextmanager
    def activate(self):
        previous = int(self._call(self.rt.cudaGetDevice()))
        if previous != self.index:
            self._call(self.rt.cudaSetDevice(self.index))
        try:
            yield
        finally:
            if previous != self.index:
                self._call(self.rt.cudaSetDevice(previous))

    def device_info(self):
        prop = self._call(self.rt.cudaGetDeviceProperties(self.index))
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"

    def alloc(self, nbytes):
        with self.activate():
            return DeviceBuffer(int(self._call(self.rt.cudaMalloc(max(1, int(nbytes))))), int(nbytes))

    def free(self, buf):
        with self.activate():
            self._call(self.rt.cudaFree(buf.ptr))

    def pinned(self, nbytes):
        import ctypes

        n = max(1, int(nbytes))
        with self.activate():
            ptr = int(self._call(self.rt.cudaMallocHost(n)))
        host = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))
        self._pinned[host.ctypes.data] = ptr
        return host

    def free_pinned(self, host):
        ptr = self._pinned.pop(host.ctypes.data, None)
        if ptr is not None:
            with self.activate():
                self._call(self.rt.cudaFreeHost(ptr))

    def new_stream(self):
        with self.activate():
            return int(self._call(self.rt.cudaStreamCreate()))

    def destroy_stream(self, stream):
        with self.activate():
            self._call(self.rt.cudaStreamDestroy(stream))

    def synchronize(self, stream):
        with self.activate():
            self._call(self.rt.cudaStreamSynchronize(stream))

    def _kind(self, name):
        return getattr(self.rt.cudaMemcpyKind, name)

    def htod(self, dst, src, stream):
        with self.activate():
            self._call(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                                               self._kind("cudaMemcpyHostToDevice"), stream))

    def dtoh(self, dst, src, stream):
        with self.activate():
            self._call(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes,
                                               self._kind("cudaMemcpyDeviceToHost"), stream))

    def dtod(self, dst, src, nbytes, stream):
        with self.activate():
            self._call(self.rt.cudaMemcpyAsync(dst, src, nbytes, self._kind("cudaMemcpyDeviceToDevice"), stream))

    def copy2d(self, dst, dst_pitch, src, src_pitch, width, height, stream):
        with self.activate():
            self._call(self.rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height,
                                                 self._kind("cudaMemcpyDeviceToDevice"), stream))

    def zero(self, ptr, nbytes, stream):
        with self.activate():
            self._call(self.rt.cudaMemsetAsync(ptr, 0, nbytes, stream))


_OPEN: dict[int, CudaMemory] = {}
_OPEN_LOCK = threading.Lock()


def open_cuda(device_index: int = 0) -> CudaMemory:
    """The process-wide CUDA layer for one GPU (pycuda preferred, cuda-python as fallback)."""
    with _OPEN_LOCK:
        if device_index in _OPEN:
            return _OPEN[device_index]
        if importlib.util.find_spec("pycuda") is not None:
            cuda = PyCudaMemory(device_index)
        elif importlib.util.find_spec("cuda") is not None:
            cuda = CudaPythonMemory(device_index)
        else:
            raise BackendUnavailable(f"tensorrt: needs pycuda (or cuda-python) for GPU buffers and streams, and "
                                     f"neither is installed; {INSTALL_HINT}")
        _OPEN[device_index] = cuda
        return cuda
