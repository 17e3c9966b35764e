"""Benchmark statistics: warm-up, a fixed number of runs or a time budget, robust summaries.

Latency on a shared 2-core machine is skewed and drifts, so everything here is order
statistics: the median (p50) with p10/p90 (and p99 for latency under load), the number of
runs, and a warning when the spread is wide enough that a ratio between two variants should
not be trusted. Means are reported but never used for comparisons.

Percentiles use linear interpolation between order statistics (numpy's default, "type 7"),
so ``percentile([1, 2, 3, 4], 50) == 2.5``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

DEFAULT_SPREAD_LIMIT = 0.25      # (p90 - p10) / p50 above this: the median is not a stable number


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values`` by linear interpolation (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(float(v) for v in values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Order statistics of one measured quantity (units are the caller's: ms, tok/s, ...)."""

    n: int
    p50: float
    p10: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    spread: float                 # (p90 - p10) / p50: relative width of the central 80%
    wide: bool                    # spread above the limit it was summarised with

    def to_dict(self, digits: int = 4) -> dict:
        return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def warning(self, what: str = "") -> str | None:
        if not self.wide:
            return None
        label = f"{what}: " if what else ""
        return (f"{label}wide spread (p10 {self.p10:.4g}, p50 {self.p50:.4g}, p90 {self.p90:.4g}, n={self.n}; "
                f"(p90-p10)/p50 = {self.spread:.0%}); the machine was busy or the budget too small, "
                f"treat ratios with care")


def summarize(values: Iterable[float], spread_limit: float = DEFAULT_SPREAD_LIMIT) -> Summary:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize() needs at least one value")
    p50 = percentile(vals, 50)
    p10, p90 = percentile(vals, 10), percentile(vals, 90)
    spread = (p90 - p10) / abs(p50) if p50 else (0.0 if p90 == p10 else math.inf)
    return Summary(n=len(vals), p50=p50, p10=p10, p90=p90, p99=percentile(vals, 99),
                   mean=sum(vals) / len(vals), min=min(vals), max=max(vals), spread=spread,
                   wide=spread > spread_limit)


def ratio(value: float | None, baseline: float | None, higher_is_better: bool) -> float | None:
    """How many times better ``value`` is than ``baseline`` (> 1: better).

    Latency (lower is better): baseline / value. Throughput (higher is better): value / baseline.
    None when either is missing or the division is undefined, never a made-up number.
    """
    if value is None or baseline is None:
        return None
    if higher_is_better:
        return value / baseline if baseline > 0 else None
    return baseline / value if value > 0 else None


def overhead(value: float, bare: float) -> float:
    """Relative extra cost of ``value`` over ``bare`` (0.05 = 5% slower)."""
    if bare <= 0:
        raise ValueError(f"bare time must be positive, got {bare}")
    return value / bare - 1.0


@dataclass(frozen=True)
class Plan:
    """How long to measure: ``warmup`` untimed calls, then at least ``min_runs`` timed calls and
    at most ``max_runs``, stopping early once ``budget_s`` of timed calls have been spent."""

    warmup: int = 3
    min_runs: int = 5
    max_runs: int = 1000
    budget_s: float | None = 2.0

    def __post_init__(self):
        if self.warmup < 0 or self.min_runs < 1 or self.max_runs < self.min_runs:
            raise ValueError(f"bad measuring plan {self}: need warmup >= 0 and 1 <= min_runs <= max_runs")

    @classmethod
    def fixed(cls, runs: int, warmup: int = 3) -> "Plan":
        return cls(warmup=warmup, min_runs=runs, max_runs=runs, budget_s=None)


def time_calls(fn: Callable[[], object], plan: Plan, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Call ``fn`` per ``plan``; return each timed call's wall time in milliseconds."""
    for _ in range(plan.warmup):
        fn()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < plan.max_runs:
        t = clock()
        fn()
        dt = clock() - t
        samples.append(dt * 1e3)
        spent += dt
        if len(samples) >= plan.min_runs and plan.budget_s is not None and spent >= plan.budget_s:
            break
    return samples
