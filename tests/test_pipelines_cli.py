"""`edgevl stream` as a user runs it: to the end of a file, and stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines_fakes import sample_factory  # noqa: F401 (fixture)

cv2 = pytest.importorskip("cv2", reason="the pipelines need OpenCV: pip install edgevl[camera]")


def _cmd(bundle, *args) -> list[str]:
    return [sys.executable, "-m", "edgevl.cli.main", "stream", str(bundle), "--backend", "onnxruntime",
            "--prompt", "how many shapes are there?", *map(str, args)]


def _frame_count(path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]   # every line complete JSON


@pytest.mark.slow
def test_end_of_file_exits_cleanly_with_complete_outputs(tiny_bundle, sample_factory, tmp_path):
    sample = sample_factory(scenes=2, frames_per_scene=5)
    out = subprocess.run(_cmd(tiny_bundle, "--source", sample.path, "--every", "2", "--no-drop",
                              "--jsonl", tmp_path / "a.jsonl", "--video", tmp_path / "a.mp4",
                              "--metrics", tmp_path / "m.json"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert [r["frame_index"] for r in _records(tmp_path / "a.jsonl")] == [0, 2, 4, 6, 8]
    assert _frame_count(tmp_path / "a.mp4") == 5
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["stop_reason"] == "sources ended" and metrics["sources"]["sample"]["processed"] == 5
    assert "sample" in out.stdout and "answers/s" in out.stdout             # live lines and the summary


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_complete_outputs(tiny_bundle, sample_factory, tmp_path):
    sample = sample_factory(scenes=3, frames_per_scene=5)
    jsonl = tmp_path / "a.jsonl"
    proc = subprocess.Popen(_cmd(tiny_bundle, "--source", sample.path, "--source", f"second={sample.path}",
                                 "--loop", "--fps", "5", "--jsonl", jsonl, "--video", tmp_path / "a.mp4",
                                 "--metrics", tmp_path / "m.json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell without job control starts background jobs with SIGINT
                            # ignored, and Python then installs no Ctrl-C handler: give the child
                            # the default disposition, as a terminal would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 6:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    records = _records(jsonl)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["stop_reason"] == "interrupted"
    assert metrics["total"]["processed"] == len(records) >= 6
    for name in ("sample", "second"):
        assert metrics["sources"][name]["processed"] > 0
        assert _frame_count(tmp_path / f"a-{name}.mp4") == metrics["sources"][name]["processed"]
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]
