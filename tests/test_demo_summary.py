"""`make demo`'s step-4 summary on synthetic timings: a speed-up is printed plainly only when the
passes agree and the machine was quiet; otherwise it is marked and the last sentence says why."""

from __future__ import annotations

import json

import pytest

from edgevl.demo import speed_rows, speed_sentence, summary_lines, time_variants

BUSY_WIDE = {"pytorch eager fp32": [26.0, 300.0, 1123.9, 1200.0, 1225.0],
             "openvino fp32": [40.0, 41.0, 40.5, 40.2, 40.8],
             "openvino int8": [21.2, 21.0, 21.4, 21.1, 21.3]}
QUIET = {"pytorch eager fp32": [100.0, 101.0, 99.0, 100.5, 100.2],
         "openvino int8": [21.2, 21.0, 21.4, 21.1, 21.3]}
ACCURACY = {"pytorch eager fp32": {"accuracy": 0.9, "by_task": {"count": 1.0}}}


def test_a_busy_wide_run_flags_every_speedup_and_says_why():
    rows = speed_rows(BUSY_WIDE, load_before=1.0, load_after=2.9, cores=2)
    table = summary_lines(rows, ACCURACY)
    assert "1.00x " in table[1] and "!" not in table[1]                   # the baseline itself
    assert all("x!" in line for line in table[2:])
    sentence = speed_sentence(rows)
    assert sentence.startswith("speed-up vs pytorch eager fp32 ('!' in the table): openvino fp32 27.75x, "
                               "openvino int8 53.01x  [not trustworthy: pytorch eager fp32 spread ")
    assert "of its median (limit 25%); machine load 2.9 while measuring on 2 cores — rerun on a quiet machine]" in sentence


def test_a_quiet_tight_run_prints_the_ratio_plainly():
    rows = speed_rows(QUIET, load_before=0.3, load_after=1.2, cores=2)
    assert "!" not in "\n".join(summary_lines(rows))
    assert speed_sentence(rows) == "speed-up vs pytorch eager fp32: openvino int8 4.73x"


def test_the_json_records_the_verdict_and_reasons():
    rows = speed_rows(QUIET, load_before=3.1, load_after=1.2, cores=2)
    doc = json.loads(json.dumps([r.to_dict() for r in rows]))
    assert doc[0]["speedup_trust"] is None and doc[1]["speedup"] == 4.726
    assert doc[1]["speedup_trust"]["trustworthy"] is False
    assert doc[1]["speedup_trust"]["reasons"] == ["machine load 3.1 before measuring on 2 cores"]


def test_variants_take_turns_pass_by_pass():
    calls = []
    variants = {name: (lambda img, q, name=name: calls.append((name, q))) for name in ("a", "b")}
    times = time_variants(variants, [(None, "q1"), (None, "q2")], passes=3)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert [n for n, _ in calls[:2]] == ["a", "b"]                          # one warm-up call each
    assert [n for n, _ in calls[2:]] == ["a", "a", "b", "b"] * 3


def test_other_processes_cpu_is_measured_without_counting_our_own(monkeypatch):
    import edgevl.benchmarks.machine as machine

    clock = iter([100.0, 102.0, 0.0, 1.0])        # a 2-second window (then a second one)
    busy = iter([50.0, 53.0])                     # all processes: 3 CPU seconds in it
    own = iter([7.0, 8.8, 0.0, 0.0])              # this process (and its children): 1.8 of them
    monkeypatch.setattr(machine, "_clock", lambda: next(clock))
    monkeypatch.setattr(machine, "_busy_cpu_seconds", lambda: next(busy))
    monkeypatch.setattr(machine, "_own_cpu_seconds", lambda: next(own))
    with machine.OthersCpu() as others:
        pass
    assert others.cores == pytest.approx(0.6)     # (3 - 1.8) / 2 s
    monkeypatch.setattr(machine, "_busy_cpu_seconds", lambda: None)
    with machine.OthersCpu() as unknown:          # no /proc/stat: unknown, not zero
        pass
    assert unknown.cores is None


def test_other_processes_cpu_reads_this_machine():
    from edgevl.benchmarks.machine import OthersCpu

    with OthersCpu() as others:
        sum(range(200_000))
    assert others.cores is None or others.cores >= 0.0


def test_a_busy_other_process_flags_the_ratio_and_a_quiet_one_does_not():
    from edgevl.benchmarks.trust import judge

    tight = {"a": [10.0, 10.1, 10.2, 10.0, 10.1], "b": [5.0, 5.1, 5.0, 5.05, 5.1]}
    busy = judge(tight, load_before=None, load_after=None, cores=2, others_cores=1.1)
    assert not busy.ok and "other processes kept 1.10 of 2 cores busy" in busy.flag()
    assert judge(tight, load_before=None, load_after=None, cores=2, others_cores=0.05).ok
