"""Serving metrics for the batcher and the scheduler: counters, histograms, latency samples.

Everything is bounded in memory (a long-running server keeps a fixed-size window of recent
samples, not every sample ever), thread-safe (one lock; updates are a few dict operations)
and readable as a plain dict for logs, benchmarks and health endpoints.

Errors are recorded here as well as delivered to the futures they belong to: a worker thread
never swallows an exception, and ``health()`` says how many failures happened and the last one.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import Counter, deque

import numpy as np

SAMPLE_WINDOW = 4096     # recent samples kept per series for percentiles


class Series:
    """The last ``window`` values of one measurement (ms), plus an all-time count and sum."""

    def __init__(self, window: int = SAMPLE_WINDOW):
        self.recent: deque[float] = deque(maxlen=window)
        self.count = 0
        self.total = 0.0

    def add(self, value: float) -> None:
        self.recent.append(float(value))
        self.count += 1
        self.total += float(value)

    def summary(self) -> dict:
        if not self.recent:
            return {"count": self.count}
        a = np.fromiter(self.recent, dtype=np.float64)
        return {"count": self.count, "mean": round(self.total / self.count, 3),
                "p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
                "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3)}


class ServingMetrics:
    """Counters (``count``), gauges (``gauge``), histograms of small ints (``observe_size``) and
    latency series in ms (``observe_ms``), all under one lock."""

    def __init__(self, name: str):
        self.name = name
        self.started = time.time()
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}
        self.gauge_max: dict[str, float] = {}
        self.histograms: dict[str, Counter[int]] = {}
        self.series: dict[str, Series] = {}
        self.last_error: dict | None = None

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def gauge(self, key: str, value: float) -> None:
        with self._lock:
            self.gauges[key] = value
            self.gauge_max[key] = max(self.gauge_max.get(key, value), value)

    def observe_size(self, key: str, size: int) -> None:
        with self._lock:
            self.histograms.setdefault(key, Counter())[int(size)] += 1

    def observe_ms(self, key: str, ms: float) -> None:
        with self._lock:
            self.series.setdefault(key, Series()).add(ms)

    def record_error(self, where: str, error: BaseException, affected: int) -> None:
        """An exception that failed ``affected`` requests: counted and kept (with its traceback)."""
        with self._lock:
            self.counters["errors"] += 1
            self.last_error = {
                "where": where, "type": type(error).__name__, "message": str(error), "affected": affected,
                "time": time.time(),
                "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__))[-4000:],
            }

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "name": self.name,
                "uptime_s": round(time.time() - self.started, 3),
                "counters": dict(self.counters),
                "gauges": dict(self.gauges),
                "gauge_max": dict(self.gauge_max),
                "histograms": {k: dict(sorted(v.items())) for k, v in self.histograms.items()},
                "latency_ms": {k: s.summary() for k, s in self.series.items()},
                "last_error": None if self.last_error is None else
                {k: v for k, v in self.last_error.items() if k != "traceback"},
            }

    def health(self, alive: bool) -> dict:
        with self._lock:
            return {"name": self.name, "alive": alive, "errors": self.counters.get("errors", 0),
                    "last_error": self.last_error}
