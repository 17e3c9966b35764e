"""The sample video of the synthetic world: deterministic, scene changes every K frames, truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgevl.data.tasks import caption
from edgevl.errors import ConfigError
from edgevl.pipelines.sample import frame_image, load_sample, make_sample_video, score

cv2 = pytest.importorskip("cv2", reason="sample videos need OpenCV: pip install edgevl[camera]")


def _frames(path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out = []
    while (frame := cap.read())[0]:
        out.append(frame[1])
    return out


def test_sample_is_deterministic_and_changes_scene_every_k_frames(tmp_path):
    a = make_sample_video(tmp_path / "a.avi", scenes=3, frames_per_scene=4, size=128)
    b = make_sample_video(tmp_path / "b.avi", scenes=3, frames_per_scene=4, size=128)
    assert a.path.read_bytes() == b.path.read_bytes()
    frames = _frames(a.path)
    assert len(frames) == a.n_frames == 12 and frames[0].shape == (128, 128, 3)
    diff = [float(np.abs(frames[i].astype(int) - frames[i + 1]).mean()) for i in range(11)]
    changes = [i + 1 for i, d in enumerate(diff) if d > 5]
    assert changes == [4, 8]                                           # a new scene at frames 4 and 8 only
    # the decoded frame is the scene, up to the codec
    assert np.abs(frames[5].astype(int) - frame_image(a.scenes[1], 128)).mean() < 6


def test_truth_file_gives_each_frames_answers(tmp_path):
    sample = make_sample_video(tmp_path / "s.avi", scenes=2, frames_per_scene=5, size=64)
    truth = json.loads(sample.truth_path.read_text())
    assert [s["first_frame"] for s in truth["scenes"]] == [0, 5]
    assert truth["scenes"][1]["caption"] == caption(sample.scenes[1])
    again = load_sample(sample.path)
    assert again.scenes == sample.scenes and again.n_frames == 10
    assert sample.expected_answer(7, "describe the image.") == caption(sample.scenes[1])
    assert sample.expected_answer(2, "How many shapes are there?") in ("one", "two", "three", "four")
    assert sample.expected_answer(2, "what color is the circle?") is None  # depends on the object: not checked
    records = [{"frame_index": 0, "prompt": "describe the image.", "answer": caption(sample.scenes[0])},
               {"frame_index": 6, "prompt": "describe the image.", "answer": "a red circle at top"},
               {"frame_index": 6, "prompt": "what color is the circle?", "answer": "red"}]
    result = score(sample, records)
    assert (result["checked"], result["correct"]) == (2, 1) and result["examples_wrong"][0]["frame"] == 6


def test_sample_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="multiple of 64"):
        make_sample_video(tmp_path / "x.avi", size=100)
    with pytest.raises(ConfigError, match="extension"):
        make_sample_video(tmp_path / "x.gif")
