"""Which frames get an answer: a rate (answers per second per source) or every Nth frame, and
optionally skipping frames that did not change since the last one the model saw.

The gate runs on the capture thread (a comparison per frame, no pixel work); the change check
runs on the source's worker thread, off the capture thread, once per frame that passed the gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevl.errors import ConfigError

CHANGE_SIDE = 32          # frames are compared as 32x32 gray thumbnails: cheap, and blind to sensor noise


@dataclass(frozen=True)
class FramePolicy:
    fps: float | None = None              # at most this many answers per second of stream time, per source
    every: int | None = None              # or: frames 0, N, 2N, ... of each source
    skip_unchanged: float | None = None   # mean abs gray difference (0..255) below which an answer is reused

    def __post_init__(self):
        if self.fps is not None and self.every is not None:
            raise ConfigError(f"choose one frame policy: --fps {self.fps} or --every {self.every}, not both")
        if self.fps is not None and not self.fps > 0:
            raise ConfigError(f"--fps must be positive, got {self.fps}")
        if self.every is not None and (int(self.every) != self.every or self.every < 1):
            raise ConfigError(f"--every must be a whole number >= 1, got {self.every}")
        if self.skip_unchanged is not None and not 0 <= self.skip_unchanged <= 255:
            raise ConfigError(f"--skip-unchanged is a mean absolute gray difference in 0..255, "
                              f"got {self.skip_unchanged}; try 2-6 for a camera with sensor noise")

    def gate(self) -> "FrameGate":
        return FrameGate(self.fps, self.every)

    def detector(self) -> "ChangeDetector | None":
        return ChangeDetector(self.skip_unchanged) if self.skip_unchanged is not None else None

    def describe(self) -> str:
        rate = (f"{self.fps:g} answers/s per source" if self.fps else f"every {self.every}th frame" if self.every
                else "as fast as the model answers")
        skip = f", reuse answers for frames changed by < {self.skip_unchanged:g}" if self.skip_unchanged is not None else ""
        return rate + skip


class FrameGate:
    """Decides, per captured frame, whether it may be answered. Rates are in stream time (media
    time for files, capture time for cameras), so a file processed offline gets the same frames
    as the same file played live."""

    def __init__(self, fps: float | None, every: int | None):
        self.period = 1.0 / fps if fps else None
        self.every = int(every) if every else None
        self._next_due: float | None = None

    def admit(self, index: int, stream_time: float) -> bool:
        if self.every is not None:
            return index % self.every == 0
        if self.period is None:
            return True
        if self._next_due is None or stream_time >= self._next_due - 1e-6:
            # due times advance on a fixed grid so the rate does not drift; after a long stall
            # (reconnect, slow start) the grid restarts at now instead of releasing a burst
            grid = self._next_due + self.period if self._next_due is not None else stream_time + self.period
            self._next_due = grid if grid > stream_time else stream_time + self.period
            return True
        return False


def thumbnail(image: np.ndarray) -> np.ndarray:
    """BGR uint8 frame -> (32, 32) float32 gray thumbnail (area-averaged: noise averages out)."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    return cv2.resize(gray, (CHANGE_SIDE, CHANGE_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)


class ChangeDetector:
    """Compares each frame with the last frame the model answered (not the last one seen, so a
    slow drift still triggers an answer once it adds up past the threshold)."""

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self._reference: np.ndarray | None = None

    def difference(self, thumb: np.ndarray) -> float | None:
        if self._reference is None or self._reference.shape != thumb.shape:
            return None
        return float(np.abs(thumb - self._reference).mean())

    def unchanged(self, thumb: np.ndarray) -> bool:
        diff = self.difference(thumb)
        return diff is not None and diff < self.threshold

    def remember(self, thumb: np.ndarray) -> None:
        self._reference = thumb

    def reset(self) -> None:
        """Forget the reference (after a reconnect the scene may be anything)."""
        self._reference = None
