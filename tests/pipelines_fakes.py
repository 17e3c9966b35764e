"""Stand-ins for the pipeline tests: a model that answers instantly, sources that fail on cue."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from edgevl.errors import InputError, SourceError
from edgevl.pipelines.sources import ArraySource, SourceDropped


class FakeVLM:
    """Answers with the frame's mean brightness: deterministic per frame, no model needed.
    ``fail_when(image)`` makes a call raise, as a backend error would."""

    backend = "fake"
    scheduler = None

    def __init__(self, delay_s: float = 0.0, fail_when=None):
        self.delay_s, self.fail_when = delay_s, fail_when
        self.calls = 0
        self.max_concurrent = 0
        self._active = 0
        self._lock = threading.Lock()

    def generate(self, image, prompt, channels="bgr", **sampling):
        with self._lock:
            self.calls += 1
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.fail_when is not None and self.fail_when(image):
                raise InputError("fake backend failure")
            return SimpleNamespace(text=f"mean {int(image.mean())}", tokens=[1, 2],
                                   timings_ms={"preprocess": 0.1, "total": self.delay_s * 1e3})
        finally:
            with self._lock:
                self._active -= 1


def gray_frames(n: int, size: int = 32, start: int = 0) -> list[np.ndarray]:
    """Frames of brightness start, start+1, ...: each one's fake answer names its number."""
    return [np.full((size, size, 3), start + i, np.uint8) for i in range(n)]


class FlakySource(ArraySource):
    """Frames from memory that drop after ``drop_at`` frames; reopening then fails
    ``failed_reopens`` times (forever when None) before it works again."""

    kind = "flaky"

    def __init__(self, name: str, frames, drop_at: int, failed_reopens: int | None = 2, fps: float = 30.0,
                 live: bool = False):
        super().__init__(name, frames, fps=fps, live=live)
        self.drop_at, self.failed_reopens = drop_at, failed_reopens
        self.opens = 0
        self.dropped = False

    def _open(self) -> None:
        self.opens += 1
        if self.dropped and (self.failed_reopens is None or self.opens - 2 < self.failed_reopens):
            raise SourceError(f"cannot open {self.describe()}: camera unplugged")

    def read(self):
        if not self.dropped and self.position == self.drop_at:
            self.dropped = True
            raise SourceDropped(f"{self.describe()}: connection reset")
        return super().read()


class RaisingSource(ArraySource):
    """A source whose read raises an arbitrary exception (a driver bug) at frame ``at``."""

    def __init__(self, name, frames, at: int):
        super().__init__(name, frames)
        self.at = at

    def read(self):
        if self.position == self.at:
            self.at = -1
            raise RuntimeError("driver exploded")
        return super().read()


@pytest.fixture
def sample_factory(tmp_path):
    """Makes sample videos of the synthetic world in the test's folder (OpenCV needed)."""
    pytest.importorskip("cv2", reason="sample videos need OpenCV: pip install edgevl[camera]")
    from edgevl.pipelines.sample import make_sample_video

    def make(name: str = "sample.avi", **kwargs):
        kwargs.setdefault("scenes", 3)
        kwargs.setdefault("frames_per_scene", 4)
        kwargs.setdefault("size", 128)
        return make_sample_video(tmp_path / name, **kwargs)

    return make
