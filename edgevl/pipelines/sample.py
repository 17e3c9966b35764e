"""A sample video of the synthetic world whose scene changes every K frames, with ground truth.

Deterministic: the same arguments give the same scenes and (for a given OpenCV) the same file.
Scenes come from the held-out ``test`` split by default, so the answers on the demo video are
about layouts the model never saw. Each 64x64 scene is upscaled with nearest neighbour (to
256x256 by default), which the model's bilinear downscale undoes almost exactly. Next to the
video, ``<video>.truth.json`` gives each frame's scene, caption, count and questions.

    python -m edgevl.pipelines.sample make out/sample.avi --scenes 8 --frames-per-scene 15
    python -m edgevl.pipelines.sample score out/sample.avi answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevl.data.tasks import NUMBER_WORDS, TEMPLATES, caption, scene_qas
from edgevl.data.world import IMAGE_SIZE, Scene, make_scene
from edgevl.errors import ConfigError, InputError

_FIXED_QUESTIONS = {q: task for task in ("count", "caption") for q in TEMPLATES[task]}


@dataclass
class SampleVideo:
    path: Path
    fps: float
    frames_per_scene: int
    scenes: list[Scene]
    size: int
    seed: int = 0

    @property
    def n_frames(self) -> int:
        return self.frames_per_scene * len(self.scenes)

    @property
    def truth_path(self) -> Path:
        return truth_path(self.path)

    def scene_at(self, position: int) -> Scene:
        if not 0 <= position < self.n_frames:
            raise IndexError(f"frame {position} is outside the sample's {self.n_frames} frames")
        return self.scenes[position // self.frames_per_scene]

    def expected_answer(self, position: int, prompt: str) -> str | None:
        """The true answer to ``prompt`` on frame ``position``, for the prompts whose answer
        depends on the scene alone (the count and caption questions); None for others."""
        task = _FIXED_QUESTIONS.get(prompt.strip().lower())
        scene = self.scene_at(position)
        if task == "count":
            return NUMBER_WORDS[len(scene.objects)]
        if task == "caption":
            return caption(scene)
        return None

    def truth(self) -> dict:
        return {
            "video": self.path.name, "fps": self.fps, "frames_per_scene": self.frames_per_scene,
            "n_frames": self.n_frames, "size": self.size, "seed": self.seed,
            "scenes": [{"first_frame": i * self.frames_per_scene, "split": s.split, "index": s.index,
                        "caption": caption(s), "count": NUMBER_WORDS[len(s.objects)],
                        "qas": [{"task": qa.task, "question": qa.question, "answer": qa.answer}
                                for qa in scene_qas(s)]}
                       for i, s in enumerate(self.scenes)],
        }


def truth_path(video: str | Path) -> Path:
    video = Path(video)
    return video.with_name(video.name + ".truth.json")


def frame_image(scene: Scene, size: int) -> np.ndarray:
    """The scene as a BGR uint8 frame of ``size`` x ``size`` (nearest-neighbour upscale)."""
    factor = size // IMAGE_SIZE
    rgb = scene.image()
    big = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    return np.ascontiguousarray(big[:, :, ::-1])


def make_sample_video(path: str | Path, scenes: int = 8, frames_per_scene: int = 15, fps: float = 15.0,
                      size: int = 256, split: str = "test", seed: int = 0, noise: float = 0.0,
                      first_scene: int = 0) -> SampleVideo:
    """Write the sample video (atomically) and its truth file; returns what was written.

    ``noise``: standard deviation of per-frame Gaussian sensor noise (0: identical frames within
    a scene, apart from the codec), drawn from a generator seeded by ``seed``.
    """
    import cv2

    from edgevl.pipelines.sinks import VIDEO_CODECS

    path = Path(path)
    codec = VIDEO_CODECS.get(path.suffix.lower())
    if codec is None:
        raise ConfigError(f"unknown video extension {path.suffix!r}; use one of {', '.join(VIDEO_CODECS)}")
    if size % IMAGE_SIZE or size < IMAGE_SIZE:
        raise ConfigError(f"size must be a multiple of {IMAGE_SIZE} (nearest upscale of the {IMAGE_SIZE}px world), got {size}")
    if scenes < 1 or frames_per_scene < 1 or fps <= 0:
        raise ConfigError("scenes and frames_per_scene must be >= 1 and fps > 0")
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = SampleVideo(path, float(fps), frames_per_scene,
                         [make_scene(split, first_scene + i, seed) for i in range(scenes)], size, seed)
    temp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    writer = cv2.VideoWriter(str(temp), cv2.VideoWriter_fourcc(*codec), float(fps), (size, size))
    if not writer.isOpened():
        raise ConfigError(f"OpenCV cannot write {codec} video {path}")
    rng = np.random.default_rng([seed, 7])
    try:
        for scene in sample.scenes:
            image = frame_image(scene, size)
            for _ in range(frames_per_scene):
                frame = image
                if noise > 0:
                    frame = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
                writer.write(frame)
    finally:
        writer.release()
    os.replace(temp, path)
    t = truth_path(path)
    t.with_name(t.name + ".partial").write_text(json.dumps(sample.truth(), indent=1) + "\n")
    os.replace(t.with_name(t.name + ".partial"), t)
    return sample


def load_sample(path: str | Path) -> SampleVideo:
    """A sample video's description from its truth file (the scenes are rebuilt from their ids)."""
    path = Path(path)
    t = truth_path(path)
    if not t.is_file():
        raise InputError(f"{path} has no truth file {t.name}; make it with `python -m edgevl.pipelines.sample make`")
    data = json.loads(t.read_text())
    scenes = [make_scene(s["split"], s["index"], data.get("seed", 0)) for s in data["scenes"]]
    return SampleVideo(path, data["fps"], data["frames_per_scene"], scenes, data["size"], data.get("seed", 0))


def score(sample: SampleVideo, records) -> dict:
    """Compare JSONL answer records (from ``edgevl stream --jsonl``) with the sample's truth."""
    checked = correct = 0
    wrong = []
    for r in records:
        position = r.get("position", r["frame_index"]) % sample.n_frames
        expected = sample.expected_answer(position, r["prompt"])
        if expected is None:
            continue
        checked += 1
        if r["answer"].strip() == expected:
            correct += 1
        elif len(wrong) < 10:
            wrong.append({"frame": position, "answer": r["answer"], "expected": expected})
    return {"checked": checked, "correct": correct, "accuracy": correct / checked if checked else None,
            "examples_wrong": wrong}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgevl.pipelines.sample", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a sample video and its truth file")
    m.add_argument("out")
    m.add_argument("--scenes", type=int, default=8)
    m.add_argument("--frames-per-scene", type=int, default=15)
    m.add_argument("--fps", type=float, default=15.0)
    m.add_argument("--size", type=int, default=256)
    m.add_argument("--split", default="test")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--noise", type=float, default=0.0)
    s = sub.add_parser("score", help="score a stream's JSONL answers against the truth")
    s.add_argument("video")
    s.add_argument("jsonl")
    args = p.parse_args(argv)
    if args.cmd == "make":
        sample = make_sample_video(args.out, args.scenes, args.frames_per_scene, args.fps, args.size, args.split,
                                   args.seed, args.noise)
        print(f"wrote {sample.path} ({sample.n_frames} frames, a new scene every {sample.frames_per_scene}) "
              f"and {sample.truth_path.name}")
        return 0
    sample = load_sample(args.video)
    with open(args.jsonl, encoding="utf-8") as f:
        result = score(sample, (json.loads(line) for line in f if line.strip()))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
