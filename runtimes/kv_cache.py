"""The runtime's KV cache: preallocated numpy arrays written in place.

Layout per layer: ``(slots, n_kv_heads, capacity, head_dim)``. Slot ``s`` holds ``length[s]``
valid positions. A decode step feeds the arrays as they are (views, no copy) and writes the
step's new keys/values at each slot's length. Capacity grows by doubling (one copy per
doubling, so amortised O(1) per token) and never exceeds ``max_capacity``; attention reads at
most twice the longest live sequence instead of a fixed maximum context.

Slots are handed out by the scheduler for in-flight batching; active slots are kept packed at
the front (``move`` copies one finished slot's neighbour down), so a batch of ``n`` active
sequences is the view ``[:n]`` of every array, with no gather.

The arrays are float32, or int8 when the decoder graph keeps a quantized cache (the
ONNX Runtime-lowered decoder with ``parts.decoder.kv_cache.onnxruntime`` = int8: the graph
quantizes and dequantizes, the cache only stores; exporters/lower/kv_int8.py).

A runner may write a step's keys/values into the fed arrays itself (ONNX Runtime's lowered
decoder: GroupQueryAttention works in the cache's memory). It then returns ``WrittenInPlace``
outputs naming the array it wrote, and ``write`` only advances the lengths.
"""

from __future__ import annotations

import numpy as np

from edgevl.errors import InputError

MIN_CAPACITY = 64


class WrittenInPlace(dict):
    """Decoder outputs of a step whose ``present_*`` keys/values are already stored in the fed
    ``past_*`` arrays at each row's length; ``target`` is the array that owns ``past_key.0``'s
    memory (so a cache can tell its own arrays were written, not another cache's)."""

    def __init__(self, outputs: dict, target):
        super().__init__(outputs)
        self.target = target


def _round_up_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, slots: int = 1,
                 capacity: int = MIN_CAPACITY, max_capacity: int = 4096, dtype=np.float32):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.slots, self.max_capacity, self.dtype = slots, max_capacity, np.dtype(dtype)
        self.capacity = min(max(MIN_CAPACITY, _round_up_pow2(capacity)), max_capacity)
        shape = (slots, n_kv_heads, self.capacity, head_dim)
        self.keys = [np.zeros(shape, self.dtype) for _ in range(n_layers)]
        self.values = [np.zeros(shape, self.dtype) for _ in range(n_layers)]
        self.length = np.zeros(slots, dtype=np.int64)
        self.position_delta = np.zeros(slots, dtype=np.int64)   # multimodal RoPE: next position - length
        self._views: dict = {}

    @property
    def nbytes(self) -> int:
        return 2 * sum(k.nbytes for k in self.keys)

    def ensure(self, needed: int) -> None:
        """Make room for ``needed`` positions in every slot (grow by doubling, keep contents)."""
        if needed <= self.capacity:
            return
        if needed > self.max_capacity:
            raise InputError(f"sequence needs {needed} positions but the context limit is {self.max_capacity}; "
                             "shorten the prompt or lower max_new_tokens")
        new_cap = min(self.max_capacity, max(_round_up_pow2(needed), 2 * self.capacity))
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = np.zeros((self.slots, self.n_kv_heads, new_cap, self.head_dim), self.dtype)
                grown[:, :, :self.capacity] = old
                store[i] = grown
        self.capacity = new_cap
        self._views.clear()

    def feeds(self, rows: slice) -> dict[str, np.ndarray]:
        """Decoder inputs for a contiguous range of slots: views, not copies.

        The same view objects come back for the same rows until the arrays are replaced (``ensure``
        growing them), so a runner can tell an unchanged binding by identity: ONNX Runtime's
        in-place binding then skips ~60 per-array checks a decode step (runtimes/onnxruntime.py)."""
        key = (rows.start, rows.stop, rows.step)
        memo = self._views.get(key)
        if memo is None or memo[0] is not self.keys or memo[1] is not self.values or memo[2] is not self.length:
            views: dict[str, np.ndarray] = {"past_len": self.length[rows]}
            for i in range(self.n_layers):
                views[f"past_key.{i}"] = self.keys[i][rows]
                views[f"past_value.{i}"] = self.values[i][rows]
            memo = self._views[key] = (self.keys, self.values, self.length, views)
        return dict(memo[3])

    def write(self, outputs: dict[str, np.ndarray], rows: slice, n_valid: np.ndarray | int | None = None) -> None:
        """Store a step's ``present_*`` outputs for a range of slots, each at its own length."""
        t = outputs["present_key.0"].shape[2]
        start = self.length[rows]
        if int(start.max(initial=0)) + t > self.capacity:
            raise InputError(f"KV cache of capacity {self.capacity} cannot take {t} more positions; call ensure()")
        if isinstance(outputs, WrittenInPlace) and outputs.target is self.keys[0]:
            self.length[rows] += t if n_valid is None else n_valid
            return
        if self.dtype.kind == "i" and outputs["present_key.0"].dtype != self.dtype:
            raise InputError(f"this KV cache is {self.dtype} (quantized by the decoder graph that writes it) but the "
                             f"step returned {outputs['present_key.0'].dtype} keys: an int8 cache works only with the "
                             "graph it was made for (Engine.new_cache picks the cache type from the bundle)")
        first = rows.start or 0
        same = bool((start == start[0]).all()) if len(start) else True
        for i in range(self.n_layers):
            k, v = outputs[f"present_key.{i}"], outputs[f"present_value.{i}"]
            if same:  # one slice assignment for the whole batch
                s = int(start[0])
                self.keys[i][rows, :, s:s + t] = k
                self.values[i][rows, :, s:s + t] = v
            else:
                for j, s in enumerate(start.tolist()):
                    self.keys[i][first + j, :, s:s + t] = k[j]
                    self.values[i][first + j, :, s:s + t] = v[j]
        self.length[rows] += t if n_valid is None else n_valid

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` into slot ``dst`` (only its valid part) and clear ``src``."""
        if src == dst:
            return
        n = int(self.length[src])
        for store in (self.keys, self.values):
            for arr in store:
                arr[dst, :, :n] = arr[src, :, :n]
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
