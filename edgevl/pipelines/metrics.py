"""Per-source counters and latencies, and the end-of-run summary.

Every captured frame ends in exactly one bucket, so ``captured == processed + skipped + dropped
+ failed`` once a run is over (a frame still in flight when the run stops is finished first):

- processed: answered by the model
- skipped:   unchanged since the last processed frame, its answer reused (--skip-unchanged)
- dropped:   never answered: not selected by --fps/--every (``dropped_by_policy``), or replaced
             by a newer frame before the model was free (``dropped_stale``, latest frame wins)
- failed:    the model call raised (the error is in the health report)

Latency is capture to answer (from the frame's capture stamp to the answer being ready), over
processed frames; a reused answer's latency is reported apart, it would flatter the numbers.
"""

from __future__ import annotations

import threading
import time

import numpy as np

COUNTERS = ("captured", "processed", "skipped", "dropped_policy", "dropped_stale", "failed")


def latency_summary(values_ms: list[float]) -> dict:
    if not values_ms:
        return {"n": 0, "p50": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(values_ms, dtype=np.float64)
    return {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), 2), "p99": round(float(np.percentile(a, 99)), 2),
            "mean": round(float(a.mean()), 2), "max": round(float(a.max()), 2)}


class SourceStats:
    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.latencies_ms: list[float] = []
        self.reused_latencies_ms: list[float] = []
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.first_answer: float | None = None
        self.last_answer: float | None = None

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def answered(self, latency_ms: float, reused: bool) -> None:
        t = time.perf_counter()
        with self._lock:
            self.counts["skipped" if reused else "processed"] += 1
            (self.reused_latencies_ms if reused else self.latencies_ms).append(latency_ms)
            self.first_answer = t if self.first_answer is None else self.first_answer
            self.last_answer = t

    def mark_started(self) -> None:
        self.started = time.perf_counter()

    def mark_ended(self) -> None:
        with self._lock:
            self.ended = self.ended or time.perf_counter()

    def to_dict(self, until: float | None = None) -> dict:
        with self._lock:
            c = dict(self.counts)
            end = self.ended or until or time.perf_counter()
            elapsed = max(1e-9, end - self.started)
            latencies, reused = list(self.latencies_ms), list(self.reused_latencies_ms)
        answers = c["processed"] + c["skipped"]
        return {
            "captured": c["captured"], "processed": c["processed"], "skipped": c["skipped"],
            "dropped": c["dropped_policy"] + c["dropped_stale"], "dropped_by_policy": c["dropped_policy"],
            "dropped_stale": c["dropped_stale"], "failed": c["failed"],
            "latency_ms": latency_summary(latencies), "reused_latency_ms": latency_summary(reused),
            "answers_per_s": round(answers / elapsed, 3), "model_answers_per_s": round(c["processed"] / elapsed, 3),
            "elapsed_s": round(elapsed, 3),
        }


def totals(per_source: dict[str, dict], all_latencies_ms: list[float]) -> dict:
    keys = ("captured", "processed", "skipped", "dropped", "dropped_by_policy", "dropped_stale", "failed",
            "answers_per_s", "model_answers_per_s")
    out = {k: round(sum(s[k] for s in per_source.values()), 3) for k in keys}
    out["latency_ms"] = latency_summary(all_latencies_ms)
    return out


def format_metrics(metrics: dict) -> str:
    """The end-of-run table: one line per source and a total."""
    header = f"{'source':<16} {'captured':>8} {'processed':>9} {'skipped':>7} {'dropped':>7} {'failed':>6} " \
             f"{'p50 ms':>8} {'p99 ms':>8} {'answers/s':>9}  state"
    lines = [header]
    states = {name.split(":", 1)[1]: c["state"] for name, c in metrics.get("health", {}).get("components", {}).items()
              if name.startswith("source:")}

    def fmt(v):
        return f"{v:8.1f}" if isinstance(v, (int, float)) else f"{'-':>8}"

    rows = list(metrics["sources"].items()) + [("total", metrics["total"])]
    for name, s in rows:
        lines.append(f"{name[:16]:<16} {s['captured']:>8} {s['processed']:>9} {s['skipped']:>7} {s['dropped']:>7} "
                     f"{s['failed']:>6} {fmt(s['latency_ms']['p50'])} {fmt(s['latency_ms']['p99'])} "
                     f"{s['answers_per_s']:>9.2f}  {states.get(name, '')}")
    return "\n".join(lines)
