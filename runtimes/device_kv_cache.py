"""The KV cache kept on the GPU between decode steps (the TensorRT runner's twin of KVCache).

Same interface and semantics as edgevl.runtimes.kv_cache.KVCache (layout per layer
``(slots, n_kv_heads, capacity, head_dim)``, ``length`` per slot on the host, ``ensure`` /
``feeds`` / ``write`` / ``move`` / ``reset``), so Engine, generation and the scheduler use it
unchanged. The difference is where the bytes live:

- ``feeds(rows)`` returns DeviceArray views of the cache, which the runner binds directly as
  ``past_key.i`` / ``past_value.i`` (no host-to-device copy of the cache per step);
- the runner, seeing device feeds, leaves ``present_*`` outputs on the GPU, and ``write``
  scatters them into each slot at its own length with pitched 2-D device copies (one per
  layer, key/value and row; one per layer and key/value when all rows are at the same length).

Only ``logits`` cross the PCIe bus (or, on Jetson, the cache flush) per step.
"""

from __future__ import annotations

import numpy as np

from edgevl.errors import InputError
from edgevl.runtimes.cuda_memory import CudaMemory, DeviceArray
from edgevl.runtimes.kv_cache import MIN_CAPACITY, _round_up_pow2


class DeviceKVCache:
    def __init__(self, cuda: CudaMemory, stream: int, n_layers: int, n_kv_heads: int, head_dim: int,
                 slots: int = 1, capacity: int = MIN_CAPACITY, max_capacity: int = 4096, dtype=np.float32):
        self.cuda, self.stream = cuda, stream
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.slots, self.max_capacity, self.dtype = slots, max_capacity, np.dtype(dtype)
        self.capacity = min(max(MIN_CAPACITY, _round_up_pow2(capacity)), max_capacity)
        self.length = np.zeros(slots, dtype=np.int64)
        self.position_delta = np.zeros(slots, dtype=np.int64)   # as KVCache.position_delta
        self._buffers = [self._new_buffer(self.capacity) for _ in range(2 * n_layers)]   # k0, v0, k1, v1...

    # -- layout ------------------------------------------------------------------------------
    def _row_bytes(self, capacity: int) -> int:           # one (slot, head) row of the cache
        return capacity * self.head_dim * self.dtype.itemsize

    def _new_buffer(self, capacity: int):
        buf = self.cuda.alloc(self.slots * self.n_kv_heads * self._row_bytes(capacity))
        # zeroed: masked positions must hold finite values (0 * NaN garbage would still be NaN)
        self.cuda.zero(buf.ptr, buf.nbytes, self.stream)
        return buf

    def _view(self, i: int) -> DeviceArray:
        return DeviceArray(self.cuda, self._buffers[i].ptr,
                           (self.slots, self.n_kv_heads, self.capacity, self.head_dim), self.dtype, self.stream)

    @property
    def keys(self) -> list[DeviceArray]:
        return [self._view(2 * i) for i in range(self.n_layers)]

    @property
    def values(self) -> list[DeviceArray]:
        return [self._view(2 * i + 1) for i in range(self.n_layers)]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    # -- KVCache interface ---------------------------------------------------------------------
    def ensure(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        if needed > self.max_capacity:
            raise InputError(f"sequence needs {needed} positions but the context limit is {self.max_capacity}; "
                             "shorten the prompt or lower max_new_tokens")
        new_cap = min(self.max_capacity, max(_round_up_pow2(needed), 2 * self.capacity))
        old_pitch, new_pitch = self._row_bytes(self.capacity), self._row_bytes(new_cap)
        grown = []
        for old in self._buffers:
            new = self._new_buffer(new_cap)
            self.cuda.copy2d(new.ptr, new_pitch, old.ptr, old_pitch, old_pitch, self.slots * self.n_kv_heads,
                             self.stream)
            grown.append(new)
        self.cuda.synchronize(self.stream)      # the copies must finish before the old memory goes
        for old in self._buffers:
            self.cuda.free(old)
        self._buffers, self.capacity = grown, new_cap

    def feeds(self, rows: slice) -> dict:
        out: dict = {"past_len": self.length[rows]}
        for i in range(self.n_layers):
            out[f"past_key.{i}"] = self._view(2 * i)[rows]
            out[f"past_value.{i}"] = self._view(2 * i + 1)[rows]
        return out

    def write(self, outputs: dict, rows: slice, n_valid=None) -> None:
        """Scatter a step's ``present_*`` (device or host arrays, (n, KV, T, Dh)) into the slots."""
        t = int(outputs["present_key.0"].shape[2])
        start = self.length[rows]
        if int(start.max(initial=0)) + t > self.capacity:
            raise InputError(f"KV cache of capacity {self.capacity} cannot take {t} more positions; call ensure()")
        first, n = rows.start or 0, len(start)
        kv, pitch = self.n_kv_heads, self._row_bytes(self.capacity)
        width = t * self.head_dim * self.dtype.itemsize          # one (row, head) block of the step
        slot_bytes, pos_bytes = kv * pitch, self.head_dim * self.dtype.itemsize
        same = bool((start == start[0]).all()) if n else True
        staged = []
        for i in range(2 * self.n_layers):
            name = f"present_{'key' if i % 2 == 0 else 'value'}.{i // 2}"
            src = self._on_device(outputs[name], staged)
            if src.dtype != self.dtype:
                raise InputError(f"{name} is {src.dtype}, the KV cache holds {self.dtype}")
            base = self._buffers[i].ptr
            if same:   # one pitched copy for all rows: (row, head) blocks are evenly spaced on both sides
                dst = base + first * slot_bytes + int(start[0]) * pos_bytes
                self.cuda.copy2d(dst, pitch, src.ptr, width, width, n * kv, self.stream)
            else:
                for j, s in enumerate(start.tolist()):
                    dst = base + (first + j) * slot_bytes + s * pos_bytes
                    self.cuda.copy2d(dst, pitch, src.ptr + j * kv * width, width, width, kv, self.stream)
        if staged:
            self.cuda.synchronize(self.stream)
            for buf in staged:
                self.cuda.free(buf)
        self.length[rows] += t if n_valid is None else n_valid

    def _on_device(self, array, staged: list) -> DeviceArray:
        if isinstance(array, DeviceArray):
            return array
        host = np.ascontiguousarray(array)             # a host output (runner without device outputs)
        buf = self.cuda.alloc(host.nbytes)
        staged.append(buf)
        self.cuda.htod(buf.ptr, host, self.stream)
        self.cuda.synchronize(self.stream)
        return DeviceArray(self.cuda, buf.ptr, host.shape, host.dtype, self.stream)

    def move(self, src: int, dst: int) -> None:
        if src == dst:
            return
        n = int(self.length[src])
        if n:
            pitch = self._row_bytes(self.capacity)
            slot_bytes = self.n_kv_heads * pitch
            for buf in self._buffers:
                self.cuda.copy2d(buf.ptr + dst * slot_bytes, pitch, buf.ptr + src * slot_bytes, pitch,
                                 n * self.head_dim * self.dtype.itemsize, self.n_kv_heads, self.stream)
        self.length[dst] = n
        self.length[src] = 0
        self.position_delta[dst] = self.position_delta[src]

    def reset(self, slot: int | None = None) -> None:
        if slot is None:
            self.length[:] = 0
            self.position_delta[:] = 0
        else:
            self.length[slot] = 0
            self.position_delta[slot] = 0

    # -- lifetime ------------------------------------------------------------------------------
    def to_host(self):
        """A host KVCache with the same contents (for checks and debugging)."""
        from edgevl.runtimes.kv_cache import KVCache

        host = KVCache(self.n_layers, self.n_kv_heads, self.head_dim, self.slots, self.capacity,
                       self.max_capacity, self.dtype)
        host.keys = [k.to_host() for k in self.keys]
        host.values = [v.to_host() for v in self.values]
        host.length = self.length.copy()
        host.position_delta = self.position_delta.copy()
        return host

    def close(self) -> None:
        if self._buffers:
            self.cuda.synchronize(self.stream)
            for buf in self._buffers:
                self.cuda.free(buf)
            self._buffers = []

    def __del__(self):
        try:
            self.close()
        except Exception:   # interpreter shutdown or a dead context: the driver reclaims the memory
            pass
