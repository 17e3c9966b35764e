"""ONNX Runtime runner: CPU (x86, ARM64); CUDA and TensorRT execution providers when present.

A graph whose metadata holds ``edgevl.kv_in_place`` (the decoder lowered by
edgevl.exporters.lower.onnxruntime_decoder) has extra outputs that must share memory with
inputs: ``{"cache_key.0": "past_key.0", ...}``. The runner binds each such output to its
input's array with IOBinding (``InPlaceBinding``), so GroupQueryAttention writes the step's
keys/values straight into the caller's KV cache (at each row's ``past_len``, positions the cache
contract treats as unused) and reads no more of it than each row's length. Those outputs are hidden: ``outputs`` and
``infer`` show the portable decoder's interface, with ``present_*`` read back from the written
buffers (views of the caller's cache arrays when every row sits at the same position).
"""

from __future__ import annotations

import json
import threading

import numpy as np

from edgevl.errors import BackendUnavailable, BundleError
from edgevl.runtimes.base import Runner, TensorInfo

KV_IN_PLACE_KEY = "edgevl.kv_in_place"

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool", "tensor(bfloat16)": "bfloat16",
}
_PROVIDERS = {
    None: ["CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _shape(dims) -> tuple:
    return tuple(d if isinstance(d, int) else None for d in dims)


def release_freed_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Creating a session parses the whole model file and builds its weights (and MLAS's prepacked
    copies) from it; the parse buffers are freed afterwards but glibc keeps most of them in the
    process. Measured on the SmolVLM-shaped int4 bundle (2-core AMD EPYC, ORT 1.32): the four
    sessions held 541 MB resident after loading, 447 MB after one trim; each call costs
    milliseconds, once per session."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim                # absent from musl: then nothing is held back anyway
    except (OSError, AttributeError):
        return
    trim(0)


class OnnxRuntimeRunner(Runner):
    """Options: ``spinning`` (bool, default True: lowest latency for back-to-back calls; turn
    off when ORT shares cores with other work, see benchmarks), ``memory_pattern`` (bool, default
    True: ORT plans one buffer for a run's activations from the previous run of the same shapes;
    turned off by the engine for parts called once per request, see engine._part_options),
    ``optimization`` ("all", "extended", "basic", "disabled"), ``profile`` (path prefix for ORT's
    JSON profile)."""

    backend = "onnxruntime"

    def _load(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        level = self.options.get("optimization", "all")
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[level]
        if not self.options.get("spinning", True):
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not self.options.get("memory_pattern", True):
            opts.enable_mem_pattern = False
        if self.options.get("profile"):
            opts.enable_profiling = True
            opts.profile_file_prefix = str(self.options["profile"])
        opts.log_severity_level = 3
        wanted = _PROVIDERS.get(self.device)
        if wanted is None:
            raise BackendUnavailable(f"onnxruntime: unknown device {self.device!r}; use cpu, cuda or tensorrt")
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BackendUnavailable(
                f"onnxruntime: {wanted[0]} is not available in this onnxruntime build (available: "
                f"{', '.join(available)}); install onnxruntime-gpu for CUDA/TensorRT, or use device='cpu'")
        if not self.path.is_file():
            raise BundleError(f"{self.path}: model file is missing")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=wanted)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError(f"onnxruntime could not load {self.path}: {e}") from e
        release_freed_heap()
        meta = self.session.get_modelmeta().custom_metadata_map
        pairs = json.loads(meta[KV_IN_PLACE_KEY]) if KV_IN_PLACE_KEY in meta else {}
        inputs = [TensorInfo(i.name, _ORT_TYPES.get(i.type, i.type), _shape(i.shape)) for i in self.session.get_inputs()]
        outputs = [TensorInfo(o.name, _ORT_TYPES.get(o.type, o.type), _shape(o.shape)) for o in self.session.get_outputs()
                   if o.name not in pairs]
        shapes = {i.name: i.shape for i in inputs}
        have = {o.name for o in outputs}
        for past in dict.fromkeys(pairs.values()):       # present_* the graph leaves to the runner
            present = "present_" + past[len("past_"):]
            if past.startswith("past_") and present not in have:
                dims = shapes[past]
                outputs.append(TensorInfo(present, "float32", (dims[0], dims[1], None, dims[3])))
        self._names = [o.name for o in outputs]
        self._run_options = None
        if self.options.get("release_memory", False):
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._in_place = InPlaceBinding(self.session, pairs, self._names, self._run_options) if pairs else None
        return inputs, outputs

    def _infer(self, feeds):
        if self._in_place:
            return self._in_place.run(feeds)
        values = self.session.run(self._names, feeds, self._run_options)
        return dict(zip(self._names, values))

    def _close(self):
        self.session = self._in_place = None

    @property
    def providers(self) -> list[str]:
        return self.activate().session.get_providers()


class InPlaceBinding:
    """Runs a session whose outputs ``pairs`` ({output: input}) must be the memory of their input.

    One IOBinding is kept across calls and each cache array is rebound only when its address or
    shape changed: a decode step feeds the same cache views every time, so a step rebinds just
    ``inputs_embeds`` and ``logits`` (binding a decoder's 120 cache tensors and
    fetching its 60 ``present_*`` outputs afresh cost ~1 ms a step from Python; ``logits``, of
    static width, is bound to an array of ours, so nothing is fetched from ORT). The step's
    keys/values (``present_*``, which the lowered graph does not compute) are read from the
    buffers GQA wrote, as views when every row is at the same position (copies otherwise), and
    returned as ``WrittenInPlace`` so KVCache.write does not store them a second time. A cache
    input that is not a writeable, C-contiguous array of its own is copied first (correct, not
    in place); its element type must be the graph's (float32, or int8 for an int8 KV cache).
    A step fed the very array objects of the last step (KVCache.feeds hands out the same views
    until the cache grows) skips even the per-array checks: the Python work around ORT's run fell
    from 238 to 72 us a step (60 cache arrays, CPU time, 2-core AMD EPYC), at ~5 ms an INT4 step."""

    def __init__(self, session, pairs: dict[str, str], outputs: list[str], run_options=None):
        self.session, self.outputs, self.run_options = session, list(outputs), run_options
        self.aliases: dict[str, list[str]] = {}
        for out, src in pairs.items():
            self.aliases.setdefault(src, []).append(out)
        self.present = {name: "present_" + name[len("past_"):] for name in self.aliases
                        if name.startswith("past_") and "present_" + name[len("past_"):] in self.outputs}
        # outputs ORT must produce: {name: static dims after the batch axis, or None}
        self.fetched = {}
        for o in session.get_outputs():
            if o.name in self.outputs and o.name not in self.present.values():
                dims = o.shape[1:]
                static = o.type == "tensor(float)" and o.shape and all(isinstance(d, int) for d in dims)
                self.fetched[o.name] = tuple(dims) if static else None
        # the cache's element type: float32, or int8 for a graph with an int8 KV cache (exporters/lower/kv_int8.py)
        self.cache_type = {i.name: "|i1" if i.type == "tensor(int8)" else "<f4"
                           for i in session.get_inputs() if i.name in self.aliases}
        self.io = session.io_binding()
        for name in self.fetched:              # first, so they come first in get_outputs()
            self.io.bind_output(name, "cpu")
        self.bound: dict[str, tuple] = {}
        self.last: dict[str, np.ndarray] = {}      # the cache arrays of the last run, bound in place
        self.plain: dict[str, np.ndarray | None] = {}   # the other inputs' arrays as last bound (kept alive)
        self.lock = threading.Lock()

    def _bind_changed(self, feeds: dict) -> tuple[dict, bool]:
        """Bind every cache array whose memory or shape changed since it was last bound;
        -> ({name: the array bound}, whether any had to be copied)."""
        from edgevl.errors import InputError

        aliases, bound, io = self.aliases, self.bound, self.io
        keep, seen, copied = {}, set(), False     # the arrays bound for this run stay alive through it
        for name, arr in feeds.items():
            outs = aliases.get(name)
            if outs is None:
                continue
            ai = arr.__array_interface__ if type(arr) is np.ndarray else None
            want = self.cache_type[name]
            # C-contiguous (strides None), writeable, of the cache's type, not fed twice: bind its own memory
            if ai is None or ai["strides"] is not None or ai["data"][1] or ai["typestr"] != want \
                    or ai["data"][0] in seen:
                if np.dtype(want) != np.asarray(arr).dtype:
                    raise InputError(f"{name} is {np.asarray(arr).dtype} but this decoder graph keeps its KV "
                                     f"cache as {np.dtype(want)}; make caches with Engine.new_cache(), which "
                                     "reads the cache type from the bundle")
                arr, copied = np.array(arr, dtype=want, order="C"), True
                ai = arr.__array_interface__
            ptr = ai["data"][0]
            keep[name] = arr
            seen.add(ptr)
            key = (ptr, ai["shape"])
            if bound.get(name) != key:
                io.bind_input(name, "cpu", 0, arr.dtype, arr.shape, ptr)
                for out in outs:
                    io.bind_output(out, "cpu", 0, arr.dtype, arr.shape, ptr)
                bound[name] = key
        return keep, copied

    def run(self, feeds: dict) -> dict:
        from edgevl.errors import InputError
        from edgevl.runtimes.kv_cache import WrittenInPlace

        missing = [name for name in ("inputs_embeds", "past_len", *self.aliases) if name not in feeds]
        if missing:
            raise InputError(f"inputs missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        with self.lock:
            last = self.last
            if last and all(feeds[name] is arr for name, arr in last.items()):
                # the very arrays of the last run (KVCache.feeds hands out the same views until the
                # cache grows): bound as they are, their memory is read and written when ORT runs
                keep, copied = dict(last), False
            else:
                keep, copied = self._bind_changed(feeds)
                # remember them only when each was bound in place (a copy is a new array every run)
                self.last = {} if copied else {name: feeds[name] for name in keep}
            io, plain = self.io, self.plain
            for name, arr in feeds.items():
                if name in keep:
                    continue
                if plain.get(name) is arr:       # e.g. the cache's lengths view: its memory is bound already
                    keep[name] = arr
                    continue
                keep[name] = bound_arr = np.ascontiguousarray(arr)
                io.bind_input(name, "cpu", 0, bound_arr.dtype, bound_arr.shape, bound_arr.ctypes.data)
                plain[name] = arr if bound_arr is arr else None
            batch, t = keep["inputs_embeds"].shape[:2]
            out = {}
            for name, dims in self.fetched.items():
                if dims is None:               # unallocated again: ORT sizes it for this run
                    io.bind_output(name, "cpu")
                else:                          # (batch, static dims...): ours, no fetch needed
                    arr = out[name] = np.empty((batch, *dims), np.float32)
                    io.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
            self.session.run_with_iobinding(io, self.run_options)
            if len(out) < len(self.fetched):
                values = io.get_outputs()
                out.update({name: values[j].numpy() for j, name in enumerate(self.fetched) if name not in out})
        starts = keep["past_len"].tolist() or [0]
        s0 = starts[0]
        if all(s == s0 for s in starts):               # the new positions of the buffers GQA wrote
            for past, present in self.present.items():
                out[present] = keep[past][:, :, s0:s0 + t]
        else:
            for past, present in self.present.items():
                buf = keep[past]
                out[present] = np.stack([buf[j, :, s:s + t] for j, s in enumerate(starts)])
        out = {name: out[name] for name in self.outputs}
        if copied or "past_key.0" not in keep:
            return out
        target = keep["past_key.0"]
        return WrittenInPlace(out, target if target.base is None else target.base)


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__

