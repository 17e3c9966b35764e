"""How the dynamic batcher joins requests into one runner call and splits the answer back.

A request is an array whose first axis counts rows (one image, or several): ``(n, ...)``.
A collation says which requests may share a batch (``key``), how to join them (``collate``)
and how to cut the runner's output back into one piece per request (``split``). The output
may be one array or a dict of arrays (what ``Runner.infer`` returns), each with the batch on
axis 0.

- ``StackByShape`` (the default) buckets by trailing shape and dtype: parts with static
  spatial shapes (the vision encoder of every bundle) cannot take padding, so requests of
  different shapes run in different batches.
- ``PadToLongest`` pads one axis to the longest request in the batch and trims the outputs
  back: for parts whose padded positions do not change the others' outputs (e.g. the token
  embedding, which is per-token).
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np

from edgevl.errors import ConfigError, InputError


def _as_array(item: Any) -> np.ndarray:
    if not isinstance(item, np.ndarray):
        raise InputError(f"a batched request must be a numpy array with the batch on axis 0, got {type(item).__name__}")
    if item.ndim == 0 or item.shape[0] < 1:
        raise InputError(f"a batched request needs at least one row on axis 0, got shape {item.shape}")
    return item


def _map_output(output: Any, fn):
    if isinstance(output, dict):
        return {k: fn(v) for k, v in output.items()}
    return fn(output)


def _leading_rows(output: Any) -> set[int]:
    arrays = output.values() if isinstance(output, dict) else [output]
    return {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in arrays}


class StackByShape:
    """Concatenate same-shape requests on axis 0; split the output by row counts (copies, so a
    runner that reuses its output buffers cannot change a result already handed out)."""

    def rows(self, item: Any) -> int:
        return int(_as_array(item).shape[0])

    def key(self, item: np.ndarray) -> Hashable:
        return tuple(item.shape[1:]), item.dtype.str

    def collate(self, items: Sequence[np.ndarray]) -> np.ndarray:
        return items[0] if len(items) == 1 else np.concatenate(items, axis=0)

    def split(self, output: Any, items: Sequence[np.ndarray]) -> list:
        counts = [self.rows(i) for i in items]
        total = sum(counts)
        if _leading_rows(output) != {total}:
            raise ConfigError(f"the batch function returned leading dims {sorted(_leading_rows(output))} for a batch "
                              f"of {total} rows; it must return one output row per input row (batch on axis 0)")
        bounds = np.cumsum([0] + counts)
        return [_map_output(output, lambda a, s=s, e=e: np.array(a[s:e], copy=True))
                for s, e in zip(bounds[:-1], bounds[1:])]


class PadToLongest(StackByShape):
    """Pad ``axis`` of every request to the longest in the batch with ``value``; trim each
    output's ``out_axis`` back to the request's own length."""

    def __init__(self, axis: int = 1, value: float = 0, out_axis: int | None = None):
        if axis == 0:
            raise ConfigError("PadToLongest cannot pad axis 0: that is the batch axis")
        self.axis, self.value = axis, value
        self.out_axis = axis if out_axis is None else out_axis

    def key(self, item: np.ndarray) -> Hashable:
        shape = list(item.shape[1:])
        del shape[self.axis - 1]
        return tuple(shape), item.dtype.str

    def collate(self, items: Sequence[np.ndarray]) -> np.ndarray:
        longest = max(i.shape[self.axis] for i in items)
        padded = []
        for item in items:
            widths = [(0, 0)] * item.ndim
            widths[self.axis] = (0, longest - item.shape[self.axis])
            padded.append(np.pad(item, widths, constant_values=self.value))
        return np.concatenate(padded, axis=0)

    def split(self, output: Any, items: Sequence[np.ndarray]) -> list:
        pieces = super().split(output, items)

        def trim(length):
            return lambda a: np.take(a, np.arange(length), axis=self.out_axis)

        return [_map_output(p, trim(item.shape[self.axis])) for p, item in zip(pieces, items)]
