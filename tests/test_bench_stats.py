"""Benchmark statistics on known numbers: percentiles, summaries, ratios, measuring plans."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgevl.benchmarks.machine import decode_ceiling, machine_info
from edgevl.benchmarks.stats import Plan, overhead, percentile, ratio, summarize, time_calls


def test_percentile_interpolates_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5, 1, 3], 50) == 3            # unsorted input
    assert percentile([10], 99) == 10
    values = [3.1, 7.4, 1.2, 9.9, 5.5, 2.2, 8.8, 4.0, 6.6, 0.5, 12.0]
    for q in (0, 10, 25, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_nothing_and_bad_q():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_of_one_to_ten():
    s = summarize(range(1, 11))
    assert (s.n, s.p50, s.min, s.max, s.mean) == (10, 5.5, 1, 10, 5.5)
    assert s.p10 == pytest.approx(1.9) and s.p90 == pytest.approx(9.1) and s.p99 == pytest.approx(9.91)
    assert s.spread == pytest.approx((9.1 - 1.9) / 5.5)
    assert s.wide and "wide spread" in s.warning("vision")


def test_tight_summary_has_no_warning():
    s = summarize([10.0, 10.1, 9.9, 10.05, 9.95])
    assert not s.wide and s.warning() is None
    assert s.to_dict()["n"] == 5


def test_median_resists_one_outlier():
    assert summarize([10, 10, 10, 10, 1000]).p50 == 10


def test_ratio_latency_and_throughput():
    assert ratio(50.0, 100.0, higher_is_better=False) == 2.0     # half the latency: 2x faster
    assert ratio(30.0, 10.0, higher_is_better=True) == 3.0        # 3x the tokens/s
    assert ratio(200.0, 100.0, higher_is_better=False) == 0.5
    assert ratio(None, 1.0, True) is None and ratio(1.0, None, False) is None
    assert ratio(0.0, 10.0, higher_is_better=False) is None       # never a made-up infinity
    assert ratio(5.0, 0.0, higher_is_better=True) is None


def test_overhead():
    assert overhead(1.1, 1.0) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        overhead(1.0, 0.0)


def test_time_calls_fixed_runs_and_warmup():
    calls = []
    samples = time_calls(lambda: calls.append(1), Plan.fixed(runs=7, warmup=3))
    assert len(samples) == 7 and len(calls) == 10
    assert all(s >= 0 for s in samples)


def test_time_calls_budget_stops_after_min_runs():
    # a fake clock: every call takes exactly 0.5 s
    t = [0.0]

    def clock():
        return t[0]

    def call():
        t[0] += 0.5

    samples = time_calls(call, Plan(warmup=0, min_runs=2, max_runs=100, budget_s=2.0), clock=clock)
    assert samples == [500.0] * 4                                  # 4 x 0.5 s reaches the 2 s budget
    samples = time_calls(call, Plan(warmup=0, min_runs=6, max_runs=100, budget_s=1.0), clock=clock)
    assert len(samples) == 6                                       # min_runs wins over the budget
    with pytest.raises(ValueError):
        Plan(min_runs=5, max_runs=2)


def test_decode_ceiling_arithmetic():
    # 10 GB/s over 250 MB of weights per token: 40 tokens/s
    assert decode_ceiling(10.0, 250e6) == pytest.approx(40.0)
    assert decode_ceiling(0, 1) is None and decode_ceiling(10, 0) is None


def test_machine_info_has_the_fields_results_need():
    info = machine_info()
    for key in ("cpu", "cores", "flags", "has", "memory_gb", "os", "python", "libraries"):
        assert key in info
    assert set(info["has"]) == {"avx512", "vnni", "bf16", "amx"}
    assert info["libraries"]["numpy"] == np.__version__
    assert not math.isnan(info["cores"])
