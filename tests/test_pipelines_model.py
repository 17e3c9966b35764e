"""The pipeline with the real edgevl-tiny bundle on generated videos of the synthetic world."""

from __future__ import annotations

import importlib.util
import json

import pytest

import edgevl
from edgevl.pipelines import CallbackSink, run_stream
from edgevl.pipelines.sample import load_sample, score
from pipelines_fakes import sample_factory  # noqa: F401 (fixture)

cv2 = pytest.importorskip("cv2", reason="the pipelines need OpenCV: pip install edgevl[camera]")

PROMPT = "describe the image."


@pytest.fixture(scope="module")
def vlm(tiny_bundle):
    model = edgevl.load(tiny_bundle, backend="onnxruntime", threads=1, verbose=False)
    yield model
    model.close()


def read_frames(path) -> list:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def test_each_answer_is_the_models_answer_on_that_frame_alone(vlm, sample_factory, tmp_path):
    sample = sample_factory(scenes=3, frames_per_scene=4)
    report = run_stream(vlm, [str(sample.path)], PROMPT, every=2, no_drop=True, console=False,
                        jsonl=tmp_path / "a.jsonl", video=tmp_path / "annotated.mp4", metrics=tmp_path / "m.json")
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["frame_index"] for r in records] == list(range(0, 12, 2))
    frames = read_frames(sample.path)
    for r in records:
        alone = vlm.generate(frames[r["frame_index"]], PROMPT, channels="bgr")
        assert r["answer"] == alone.text and r["tokens"] == len(alone.tokens), r["frame_index"]
    s = report.sources["sample"]
    assert (s["captured"], s["processed"], s["dropped"], s["failed"]) == (12, 6, 6, 0) and report.ok
    assert s["latency_ms"]["n"] == 6 and s["latency_ms"]["p50"] > 0
    written = read_frames(tmp_path / "annotated.mp4")            # playable, one frame per answer
    assert len(written) == 6 and written[0].shape == frames[0].shape
    assert not list(tmp_path.glob(".*partial*"))                 # the temporary name is gone
    # the truth file checks the answers against the world (accuracy depends on the checkpoint)
    checked = score(load_sample(sample.path), records)
    assert checked["checked"] == 6 and 0 <= checked["correct"] <= 6


def test_skip_unchanged_on_a_still_video_runs_the_model_once(vlm, sample_factory):
    still = sample_factory("still.avi", scenes=1, frames_per_scene=10)
    report = run_stream(vlm, [str(still.path)], PROMPT, no_drop=True, skip_unchanged=2.0, console=False)
    s = report.sources["still"]
    assert (s["captured"], s["processed"], s["skipped"]) == (10, 1, 9)
    changing = sample_factory("changing.avi", scenes=3, frames_per_scene=4)
    report = run_stream(vlm, [str(changing.path)], PROMPT, no_drop=True, skip_unchanged=2.0, console=False)
    assert (report.sources["changing"]["processed"], report.sources["changing"]["skipped"]) == (3, 9)


def test_two_video_files_at_once_from_a_bundle_path(tiny_bundle, sample_factory, tmp_path):
    a = sample_factory("a.avi", scenes=2, frames_per_scene=3)
    b = sample_factory("b.avi", scenes=2, frames_per_scene=3, first_scene=5)
    report = run_stream(tiny_bundle, [str(a.path), str(b.path)], PROMPT, no_drop=True, console=False,
                        backend="onnxruntime", video=tmp_path / "out.avi")
    assert report.sources["a"]["processed"] == 6 and report.sources["b"]["processed"] == 6
    assert report.metrics["backend"] == "onnxruntime" and report.ok
    assert len(read_frames(tmp_path / "out-a.avi")) == 6 and len(read_frames(tmp_path / "out-b.avi")) == 6


@pytest.mark.skipif(importlib.util.find_spec("edgevl.runtimes.scheduler") is None,
                    reason="batching needs edgevl.runtimes.scheduler")
def test_batched_across_sources_answers_match_the_frame_alone(tiny_bundle, vlm, sample_factory, tmp_path):
    a = sample_factory("a.avi", scenes=2, frames_per_scene=3)
    b = sample_factory("b.avi", scenes=2, frames_per_scene=3, first_scene=4)
    batched = edgevl.load(tiny_bundle, backend="onnxruntime", threads=1, batching=True, max_batch_size=4,
                          verbose=False)
    try:
        collected = []
        report = run_stream(batched, [str(a.path), str(b.path)], PROMPT, no_drop=True, console=False,
                            sinks=[CallbackSink(collected.append)])
    finally:
        batched.close()
    assert report.metrics["batching"]["enabled"] and report.ok
    assert report.sources["a"]["processed"] == 6 and report.sources["b"]["processed"] == 6
    frames = {"a": read_frames(a.path), "b": read_frames(b.path)}
    for answer in collected:
        alone = vlm.generate(frames[answer.source][answer.frame_index], PROMPT, channels="bgr")
        assert answer.answer == alone.text, (answer.source, answer.frame_index)
