"""edgevl batch (local): answers equal edgevl.load().generate(), a rerun skips what is done, a line cut
short by a crash is redone, and video files are sampled every N frames."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import HAS_CV2


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_folder_is_resumable_and_equals_generate(tiny_bundle, tmp_path):
    from PIL import Image

    import edgevl
    from edgevl.cli.main import main
    from edgevl.data.world import make_scene

    folder = tmp_path / "images"
    folder.mkdir()
    images = {f"{i}.png": make_scene("test", 30 + i).image() for i in range(5)}
    for name, image in images.items():
        Image.fromarray(image).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "answers.jsonl"
    args = ["batch", str(tiny_bundle), "--input", str(folder), "--prompt", "describe the image.", "--out", str(out),
            "--no-progress", "--backend", "onnxruntime"]
    assert main(args) == 0
    first = _read(out)
    reference = edgevl.load(tiny_bundle, backend="onnxruntime", verbose=False)
    assert [r["answer"] for r in first] == [reference.generate(images[n], "describe the image.", channels="rgb").text
                                            for n in sorted(images)]
    assert [r["id"] for r in first] == [str((folder / n).resolve()) for n in sorted(images)]

    # a crash mid-line: the last line is cut short, and two answers are missing
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])
    assert main(args) == 0
    again = _read(out)
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in first)
    assert {r["id"]: r["answer"] for r in again} == {r["id"]: r["answer"] for r in first}
    before = out.read_text()
    assert main(args) == 0                    # nothing left to do: the file is untouched
    assert out.read_text() == before


def test_batch_rejects_an_input_with_nothing_to_answer(tiny_bundle, tmp_path, capsys):
    from edgevl.cli.main import main

    assert main(["batch", str(tiny_bundle), "--input", str(tmp_path / "*.png"), "--prompt", "q",
                 "--out", str(tmp_path / "a.jsonl")]) == 2
    assert "matches no image or video files" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_CV2, reason="needs OpenCV: pip install edgevl[camera]")
def test_batch_samples_video_frames(tiny_bundle, tmp_path):
    import cv2

    import edgevl
    from edgevl.cli.main import main
    from edgevl.data.world import make_scene

    frames = [make_scene("test", 40 + i // 4).image() for i in range(12)]
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 10, (frames[0].shape[1], frames[0].shape[0]))
    for f in frames:
        writer.write(np.ascontiguousarray(f[:, :, ::-1]))
    writer.release()
    out = tmp_path / "video.jsonl"
    assert main(["batch", str(tiny_bundle), "--input", str(video), "--every", "4", "--prompt", "describe the image.",
                 "--out", str(out), "--no-progress", "--backend", "onnxruntime"]) == 0
    got = _read(out)
    assert [r["frame"] for r in got] == [0, 4, 8]
    reference = edgevl.load(tiny_bundle, backend="onnxruntime", verbose=False)
    assert [r["answer"] for r in got] == [reference.generate(frames[i], "describe the image.", channels="rgb").text
                                          for i in (0, 4, 8)]
