"""Offline batch answers: one prompt about every image of a folder or glob, or sampled video frames.

    edgevl batch BUNDLE --input photos/ --prompt "describe the image." --out answers.jsonl
    edgevl batch BUNDLE --input 'site/*/cam*.mp4' --every 30 --prompt ... --out answers.jsonl --ray

Each answer is one JSON line ``{"id", "source", "frame", "prompt", "answer", "tokens"}``, written
whole and flushed as it comes. The file is the checkpoint: a restart reads the ids already in it
and answers only the rest (a line cut short by a crash is dropped first), so the run is resumable
locally and on Ray alike. Locally the batching engine (in-flight scheduler) answers; with
``--ray`` a Ray Data actor pool of the same engines does, spread over the cluster's nodes (the
bundle and the inputs must be at the same path on every node).
"""

from __future__ import annotations

import glob as globlib
import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from edgevl.errors import ConfigError, InputError, SourceError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}


@dataclass(frozen=True)
class Item:
    """One thing to answer: an image file (frame None) or one frame of a video file."""
    source: str
    frame: int | None = None

    @property
    def id(self) -> str:
        return self.source if self.frame is None else f"{self.source}#frame={self.frame}"


def _video_frames(path: Path, every: int) -> list[int]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise SourceError(f"video {path} cannot be opened; check the file, or install edgevl[camera] for OpenCV")
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    return list(range(0, max(count, 0), every))


def list_items(spec: str, every: int = 30) -> list[Item]:
    """A folder (its images and videos, sorted), a video file, an image file, or a glob pattern."""
    if every < 1:
        raise ConfigError(f"--every must be >= 1, got {every}")
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in globlib.glob(spec, recursive=True)
                       if Path(p).suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    if not files:
        raise InputError(f"--input {spec} matches no image or video files (images: "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))}; videos: {', '.join(sorted(VIDEO_SUFFIXES))})")
    items = []
    for f in files:
        if f.suffix.lower() in VIDEO_SUFFIXES:
            items += [Item(str(f.resolve()), i) for i in _video_frames(f, every)]
        else:
            items.append(Item(str(f.resolve())))
    return items


def read_image(item: Item) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file or a video frame."""
    if item.frame is None:
        from edgevl.preprocess import to_rgb_uint8

        return to_rgb_uint8(item.source)
    import cv2

    capture = cv2.VideoCapture(item.source)
    try:
        capture.set(cv2.CAP_PROP_POS_FRAMES, item.frame)
        ok, frame = capture.read()
    finally:
        capture.release()
    if not ok:
        raise SourceError(f"frame {item.frame} of {item.source} cannot be read")
    return np.ascontiguousarray(frame[:, :, ::-1])


def answered_ids(out: Path) -> set[str]:
    """Ids already in ``out``; a last line cut short by a crash is removed so appends stay valid."""
    if not out.exists():
        return set()
    done, good_end = set(), 0
    with open(out, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                break
            good_end += len(line)
    if good_end != out.stat().st_size:
        with open(out, "r+b") as f:
            f.truncate(good_end)
    return done


class AnswerWriter:
    """Appends one whole JSON line per answer and flushes it (fsync every ``sync_every`` lines)."""

    def __init__(self, out: Path, sync_every: int = 64):
        out.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(out, "a", encoding="utf-8")
        self.sync_every, self.pending = sync_every, 0

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        self.pending += 1
        if self.pending >= self.sync_every:
            os.fsync(self.file.fileno())
            self.pending = 0

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def record(item: Item, prompt: str, text: str, tokens: int) -> dict:
    return {"id": item.id, "source": item.source, "frame": item.frame, "prompt": prompt, "answer": text,
            "tokens": tokens}


def answer_local(vlm, items: Iterable[Item], prompt: str, sampling: dict, window: int = 32) -> Iterator[dict]:
    """Answers in input order; up to ``window`` requests in the scheduler at once."""
    params = vlm._params(**sampling)
    ids = vlm.engine.encode_prompt(prompt, n_images=1)
    pending: deque = deque()
    for item in items:
        pixels = vlm.pixels([read_image(item)], channels="rgb")
        pending.append((item, vlm.scheduler.submit(ids, pixels, params, block=True)))
        while len(pending) >= window:
            yield _resolved(vlm, prompt, *pending.popleft())
    while pending:
        yield _resolved(vlm, prompt, *pending.popleft())


def _resolved(vlm, prompt: str, item: Item, future) -> dict:
    tokens = future.result()
    return record(item, prompt, vlm.engine.decode_tokens(tokens), len(tokens))


def run_batch(items: list[Item], out: Path, answer: Callable[[list[Item]], Iterable[dict]],
              progress: bool = True) -> dict:
    """Skip what ``out`` already holds, answer the rest with ``answer``, append as they come."""
    done = answered_ids(out)
    todo = [it for it in items if it.id not in done]
    bar = _progress(len(items), len(items) - len(todo), progress)
    writer = AnswerWriter(out)
    written = 0
    try:
        for rec in answer(todo):
            writer.write(rec)
            written += 1
            bar.update(1)
    finally:
        writer.close()
        bar.close()
    return {"items": len(items), "skipped": len(items) - len(todo), "answered": written, "out": str(out)}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="item", desc="edgevl batch", dynamic_ncols=True)
