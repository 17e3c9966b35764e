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


# -- trust.py: whether a ratio may be printed plainly ------------------------------------------
from edgevl.benchmarks.trust import Trust, format_ratio, format_ratios, judge, load_reason  # noqa: E402

TIGHT = [100.0, 101.0, 99.0, 100.5, 99.5, 100.2]
FAST = [21.0, 21.2, 21.1, 20.9, 21.3]


def test_a_tight_sample_on_a_quiet_machine_is_trusted():
    t = judge({"pytorch": TIGHT, "openvino int8": FAST}, load_before=0.4, load_after=1.9, cores=2)
    assert t.ok and t.reasons == () and t.flag() == ""
    assert format_ratio(4.734, t) == "4.73x"
    assert t.to_dict()["trustworthy"] is True


def test_a_wide_spread_is_flagged_with_its_numbers():
    wide = [26.0, 300.0, 1123.9, 1200.0, 1225.0, 1100.0]
    t = judge({"pytorch": wide, "openvino int8": FAST}, load_before=0.2, load_after=0.3, cores=2)
    assert not t.ok and len(t.reasons) == 1
    assert t.reasons[0].startswith("pytorch spread ") and "ms is" in t.reasons[0] and "of its median (limit 25%)" in t.reasons[0]
    text = format_ratio(53.03, t)
    assert text.startswith("53.03x  [not trustworthy: pytorch spread") and text.endswith("rerun on a quiet machine]")


def test_a_busy_machine_is_flagged_before_or_while_measuring():
    t = judge({"pytorch": TIGHT, "openvino int8": FAST}, load_before=1.0, load_after=2.9, cores=2)
    assert t.reasons == ("machine load 2.9 while measuring on 2 cores",)
    t = judge({"pytorch": TIGHT}, load_before=3.5, load_after=2.9, cores=2)
    assert t.reasons == ("machine load 3.5 before / 2.9 while measuring on 2 cores",)
    assert judge({}, load_before=3.0, load_after=None, cores=4).ok          # 3 runnable threads on 4 cores
    assert load_reason(1.5, None, 2, limit=1.0) == "machine load 1.5 before measuring on 2 cores"
    assert load_reason(None, None, 2) is None


def test_too_few_samples_are_flagged():
    t = judge({"pytorch": [100.0, 101.0, 99.0], "openvino int8": []}, load_before=None, load_after=None, cores=2)
    assert t.reasons == ("pytorch has 3 samples, fewer than 5", "openvino int8 has 0 samples, fewer than 5")


def test_verdicts_add_up_and_survive_json():
    busy = judge({"a": TIGHT}, load_before=None, load_after=3.0, cores=2)
    wide = judge({"b": [1.0, 2.0, 3.0, 4.0, 5.0]}, load_before=None, load_after=3.0, cores=2)
    both = busy + wide
    assert both.reasons == (wide.reasons[0], busy.reasons[0]) and both.load_after == 3.0   # spread, then load
    assert Trust.from_dict(both.to_dict()) == both and Trust.from_dict(None).ok
    assert format_ratios([("x", 2.0, busy), ("y", 3.0, busy)]).startswith("x 2.00x, y 3.00x  [not trustworthy: machine")
    assert format_ratios([("x", 2.0, Trust()), ("y", 3.0, busy)]).startswith("x 2.00x; y 3.00x  [not trustworthy")
    assert format_ratios([("x", 2.0, busy), ("y", 3.0, wide)]) == f"x 2.00x, y 3.00x  {both.flag()}"
