"""The whole pipeline with a stand-in model: counts, several sources, faults, sinks, stopping."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from edgevl.errors import SourceError
from edgevl.pipelines import ArraySource, CallbackSink, Reconnect, run_stream
from edgevl.pipelines.stream import StreamPipeline
from pipelines_fakes import FakeVLM, FlakySource, gray_frames

pytest.importorskip("cv2", reason="the pipelines need OpenCV: pip install edgevl[camera]")

FAST = Reconnect(max_attempts=3, initial_delay=0.01, max_delay=0.02)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _balanced(s: dict) -> bool:
    return s["captured"] == s["processed"] + s["skipped"] + s["dropped"] + s["failed"]


def test_offline_every_nth_frame_is_answered_and_logged(tmp_path):
    collected = []
    report = run_stream(FakeVLM(), [ArraySource("a", gray_frames(20))], "what?", every=3, no_drop=True,
                        jsonl=tmp_path / "a.jsonl", metrics=tmp_path / "m.json", console=False,
                        sinks=[CallbackSink(collected.append)])
    s = report.sources["a"]
    assert (s["captured"], s["processed"], s["dropped_by_policy"], s["dropped_stale"]) == (20, 7, 13, 0)
    assert _balanced(s) and report.ok and report.metrics["stop_reason"] == "sources ended"
    lines = _lines(tmp_path / "a.jsonl")
    assert [r["frame_index"] for r in lines] == list(range(0, 20, 3))
    assert [r["answer"] for r in lines] == [f"mean {i}" for i in range(0, 20, 3)]   # the frame's own answer
    first = lines[0]
    assert first["source"] == "a" and first["prompt"] == "what?" and first["skipped"] is False
    assert {"slot_wait", "preprocess", "model_total", "capture_to_answer"} <= set(first["latency_ms"])
    assert [a.frame_index for a in collected] == [r["frame_index"] for r in lines]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["sources"]["a"]["processed"] == 7 and metrics["health"]["ok"]
    assert metrics["sinks"]["jsonl"]["lines"] == 7


def test_two_sources_progress_together_and_reach_the_model_concurrently():
    vlm = FakeVLM(delay_s=0.02)
    report = run_stream(vlm, [ArraySource("left", gray_frames(15)), ArraySource("right", gray_frames(15, start=100))],
                        "what?", no_drop=True, console=False)
    assert report.sources["left"]["processed"] == 15 and report.sources["right"]["processed"] == 15
    assert vlm.max_concurrent == 2          # both workers in the model at once: what the batcher needs
    assert report.total["processed"] == 30 and report.ok


def test_a_source_that_disappears_is_retried_and_reported_while_the_other_goes_on(tmp_path):
    gone = FlakySource("gone", gray_frames(40), drop_at=5, failed_reopens=None)
    steady = ArraySource("steady", gray_frames(30, start=50))
    report = run_stream(FakeVLM(delay_s=0.005), [gone, steady], "what?", no_drop=True, reconnect=FAST,
                        jsonl=tmp_path / "a.jsonl", console=False)
    assert report.sources["steady"]["processed"] == 30                     # never waited on the other
    assert report.sources["gone"]["processed"] == 5
    health = report.metrics["health"]
    assert not report.ok
    assert health["components"]["source:gone"]["state"] == "failed"
    assert health["components"]["source:gone"]["reconnect_attempts"] == FAST.max_attempts
    kinds = [e["kind"] for e in health["events"] if e["component"] == "source:gone"]
    assert kinds[0] == "dropped" and kinds.count("reconnecting") == 3 and kinds[-1] == "gave_up"
    assert health["components"]["source:steady"]["state"] == "ended"
    assert len(_lines(tmp_path / "a.jsonl")) == 35


def test_a_source_that_comes_back_continues_where_it_stopped():
    flaky = FlakySource("flaky", gray_frames(20), drop_at=7, failed_reopens=1)
    report = run_stream(FakeVLM(), [flaky], "what?", no_drop=True, reconnect=FAST, console=False)
    assert report.sources["flaky"]["processed"] == 20 and report.ok
    c = report.metrics["health"]["components"]["source:flaky"]
    assert (c["reconnects"], c["reconnect_attempts"], c["state"]) == (1, 2, "ended")


def test_model_errors_are_counted_and_reported_not_fatal():
    vlm = FakeVLM(fail_when=lambda image: int(image.mean()) == 4)
    report = run_stream(vlm, [ArraySource("a", gray_frames(10))], "what?", no_drop=True, console=False)
    s = report.sources["a"]
    assert (s["processed"], s["failed"]) == (9, 1) and _balanced(s)
    errors = [e for e in report.metrics["health"]["events"] if e["level"] == "error"]
    assert len(errors) == 1 and errors[0]["kind"] == "model_error" and "frame 4" in errors[0]["message"]
    assert "fake backend failure" in errors[0]["detail"]                   # the traceback is kept


def test_a_failing_sink_is_switched_off_and_the_others_keep_writing(tmp_path):
    def explode(answer):
        raise OSError("disk full")

    report = run_stream(FakeVLM(), [ArraySource("a", gray_frames(6))], "what?", no_drop=True, console=False,
                        sinks=[CallbackSink(explode, name="uploader")], jsonl=tmp_path / "a.jsonl")
    assert len(_lines(tmp_path / "a.jsonl")) == 6
    assert not report.ok
    assert report.metrics["health"]["components"]["sink:uploader"]["errors"] == 1


def test_a_source_that_cannot_open_is_named_and_nothing_starts(tmp_path):
    with pytest.raises(SourceError, match="missing.mp4"):
        run_stream(FakeVLM(), [ArraySource("a", gray_frames(3)), str(tmp_path / "missing.mp4")], "what?",
                   console=False)
    missing = tmp_path / "there.mp4"
    missing.write_bytes(b"not a video")
    with pytest.raises(SourceError, match="there.mp4"):
        run_stream(FakeVLM(), [ArraySource("a", gray_frames(3)), str(missing)], "what?", console=False,
                   jsonl=tmp_path / "a.jsonl")
    assert (tmp_path / "a.jsonl").read_text() == ""                        # opened and closed, nothing in it


def test_skip_unchanged_reuses_the_answer_of_the_last_processed_frame():
    still = [np.full((32, 32, 3), 10, np.uint8)] * 6 + [np.full((32, 32, 3), 200, np.uint8)] * 4
    collected = []
    vlm = FakeVLM()
    report = run_stream(vlm, [ArraySource("still", still)], "what?", no_drop=True, skip_unchanged=2.0,
                        console=False, sinks=[CallbackSink(collected.append)])
    s = report.sources["still"]
    assert (s["processed"], s["skipped"], s["captured"]) == (2, 8, 10) and _balanced(s)
    assert vlm.calls == 2
    assert [a.reused for a in collected] == [False] + [True] * 5 + [False] + [True] * 3
    assert collected[3].reused_from == 0 and collected[3].answer == "mean 10"
    assert collected[8].reused_from == 6 and collected[8].answer == "mean 200"
    assert s["reused_latency_ms"]["n"] == 8 and s["latency_ms"]["n"] == 2


def test_live_pace_drops_stale_frames_when_the_model_is_slow():
    camera = ArraySource("cam", gray_frames(60), fps=200.0)        # 0.3 s of a 200 fps camera
    report = run_stream(FakeVLM(delay_s=0.03), [camera], "what?", console=False)
    s = report.sources["cam"]
    assert s["captured"] == 60 and 0 < s["processed"] < 30 and s["dropped_stale"] > 0 and _balanced(s)
    assert s["latency_ms"]["p99"] < 1000            # bounded: never a queue of old frames behind the model


def test_stop_and_duration_end_a_looping_stream_cleanly(tmp_path):
    report = run_stream(FakeVLM(delay_s=0.002), [ArraySource("loop", gray_frames(5))], "what?", loop=True,
                        duration=0.5, jsonl=tmp_path / "a.jsonl", console=False)
    assert report.metrics["stop_reason"] == "duration"
    assert report.sources["loop"]["processed"] == len(_lines(tmp_path / "a.jsonl")) > 5
    assert _balanced(report.sources["loop"])

    pipeline = StreamPipeline(FakeVLM(delay_s=0.002), [ArraySource("loop", gray_frames(5))], "what?", loop=True)
    pipeline.start()
    threading.Timer(0.3, pipeline.stop).start()
    report = pipeline.wait(duration=10)
    assert report.metrics["stop_reason"] == "requested" and report.sources["loop"]["processed"] > 0


def test_console_prints_one_line_per_answer(capsys):
    run_stream(FakeVLM(), [ArraySource("a", gray_frames(4))], "what?", no_drop=True, verbose=False)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[2].split()[0] == "a" and "#2" in out[2] and out[2].endswith("mean 2")
    assert "ms" in out[2]


def test_window_without_a_display_is_reported_and_skipped(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    report = run_stream(FakeVLM(), [ArraySource("a", gray_frames(3))], "what?", no_drop=True, window=True,
                        console=False)
    events = report.metrics["health"]["events"]
    assert any(e["component"] == "sink:window" and "no display" in e["message"] for e in events)
    assert report.sources["a"]["processed"] == 3 and report.ok          # a warning, not a failure


def test_annotated_frame_shows_the_answer():
    from edgevl.pipelines.sinks import Answer, annotate

    frame = np.full((256, 256, 3), 128, np.uint8)
    long_answer = " and ".join(["a red circle at top left"] * 8)
    drawn = annotate(frame, Answer("cam", 3, 3, 0.0, 0.1, "q", long_answer))
    assert drawn.shape == frame.shape and not np.array_equal(drawn, frame)
    assert np.array_equal(drawn[:100], frame[:100])                    # the top of the picture is left alone
    assert np.array_equal(frame, np.full((256, 256, 3), 128, np.uint8))  # the input frame is not modified
