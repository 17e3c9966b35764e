"""`make demo`'s step-4 summary on synthetic timings: a speed-up is printed plainly only when the
passes agree and the machine was quiet; otherwise it is marked and the last sentence says why."""

from __future__ import annotations

import json

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
