"""Where answers go: the console, a JSON Lines file, an annotated video, a window, a callback.

Sinks run on one thread (the pipeline's sink thread), in answer order, so they need no locks.
A sink that raises is reported to the health channel and switched off; the others go on.
``close()`` is always called, also on Ctrl-C: the JSONL file then holds one complete line per
answer and each video is finalised (written under a temporary name, renamed when complete).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgevl.errors import ConfigError

MAX_LINES = 5                         # answer lines drawn on a frame; longer answers end in "..."
VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


@dataclass
class Answer:
    source: str
    frame_index: int
    position: int | None              # frame number inside a file or folder
    captured_at: float                # wall clock of capture
    stream_time: float                # seconds into the stream
    prompt: str
    answer: str
    reused: bool = False              # skip-unchanged: the answer of frame ``reused_from``
    reused_from: int | None = None
    latency_ms: dict = field(default_factory=dict)
    tokens: int = 0
    frame: np.ndarray | None = field(default=None, repr=False)

    def to_record(self) -> dict:
        record = {"source": self.source, "frame_index": self.frame_index, "timestamp": round(self.captured_at, 6),
                  "stream_time": round(self.stream_time, 4), "prompt": self.prompt, "answer": self.answer,
                  "skipped": self.reused, "latency_ms": self.latency_ms, "tokens": self.tokens}
        if self.position is not None:
            record["position"] = self.position
        if self.reused:
            record["reused_from"] = self.reused_from
        return record


class Sink:
    name = "sink"
    needs_frames = False              # the pipeline keeps each answered frame only when a sink draws it

    def start(self, sources: dict[str, dict], request_stop: Callable[[], None]) -> None:
        """Called once before the first answer: ``sources`` maps each source name to
        ``{"fps": answers per second the video should play at}``."""

    def write(self, answer: Answer) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def summary(self) -> dict:
        return {}


def clock(seconds: float) -> str:
    m, s = divmod(max(0.0, seconds), 60)
    return f"{int(m):02d}:{s:06.3f}"


class ConsoleSink(Sink):
    """One line per answer: source, frame, stream time, capture-to-answer latency, answer."""

    name = "console"

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def write(self, a: Answer) -> None:
        latency = a.latency_ms.get("capture_to_answer", 0.0)
        note = f"  (unchanged since #{a.reused_from})" if a.reused else ""
        self.stream.write(f"{a.source:<12} #{a.frame_index:<6} {clock(a.stream_time)} {latency:8.1f} ms  "
                          f"{a.answer}{note}\n")
        self.stream.flush()


def _check_writable(path: Path, what: str) -> None:
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write the {what} {path}: folder {path.parent} does not exist; create it first")


class JsonlSink(Sink):
    """One JSON object per line, flushed per line: complete lines even if the process is killed."""

    name = "jsonl"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_writable(self.path, "JSON Lines file")
        self._file = open(self.path, "w", encoding="utf-8")
        self.lines = 0

    def write(self, a: Answer) -> None:
        self._file.write(json.dumps(a.to_record(), ensure_ascii=False) + "\n")
        self._file.flush()
        self.lines += 1

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def summary(self) -> dict:
        return {"path": str(self.path), "lines": self.lines}


def annotate(frame: np.ndarray, a: Answer) -> np.ndarray:
    """The frame with the source, frame number and answer drawn on it (a copy)."""
    import cv2

    out = frame.copy()
    h, w = out.shape[:2]
    scale = max(0.35, min(1.0, w / 640))
    thick = 1 if scale < 0.7 else 2
    line_h = int(22 * scale) + 4
    char_w = cv2.getTextSize("m", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0]
    lines = textwrap.wrap(a.answer or "(no answer)", max(8, (w - 8) // max(1, char_w)))
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 1] + [lines[MAX_LINES - 1] + " ..."]
    header = f"{a.source} #{a.frame_index} {clock(a.stream_time)}" + ("  (reused)" if a.reused else "")
    band = line_h * (len(lines) + 1) + 4
    overlay = out.copy()
    cv2.rectangle(overlay, (0, h - band), (w, h), (0, 0, 0), -1)
    out = cv2.addWeighted(overlay, 0.6, out, 0.4, 0)
    y = h - band + line_h
    cv2.putText(out, header, (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.85, (180, 180, 180), 1, cv2.LINE_AA)
    for line in lines:
        y += line_h
        cv2.putText(out, line, (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out


class VideoSink(Sink):
    """Answered frames with their answers drawn on, one video per source (``out-<source>.mp4``
    when there are several). mp4v for .mp4/.m4v/.mov, MJPG for .avi/.mkv."""

    name = "video"
    needs_frames = True

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.codec = VIDEO_CODECS.get(self.path.suffix.lower())
        if self.codec is None:
            raise ConfigError(f"cannot write video {self.path}: unknown extension {self.path.suffix!r}; "
                              f"use one of {', '.join(VIDEO_CODECS)}")
        _check_writable(self.path, "video")
        self._writers: dict[str, tuple] = {}           # source -> (writer, temp path, final path)
        self._fps: dict[str, float] = {}
        self.frames: dict[str, int] = {}
        self.written: dict[str, str] = {}

    def path_for(self, source: str) -> Path:
        if len(self._fps) <= 1:
            return self.path
        return self.path.with_name(f"{self.path.stem}-{source}{self.path.suffix}")

    def start(self, sources: dict[str, dict], request_stop) -> None:
        self._fps = {name: float(info.get("fps") or 10.0) for name, info in sources.items()}

    def write(self, a: Answer) -> None:
        import cv2

        if a.frame is None:
            return
        if a.source not in self._writers:
            final = self.path_for(a.source)
            temp = final.with_name(f".{final.stem}.partial-{os.getpid()}{final.suffix}")
            h, w = a.frame.shape[:2]
            writer = cv2.VideoWriter(str(temp), cv2.VideoWriter_fourcc(*self.codec),
                                     self._fps.get(a.source, 10.0), (w, h))
            if not writer.isOpened():
                raise ConfigError(f"OpenCV cannot write {self.codec} video to {final}; try .avi (MJPG)")
            self._writers[a.source] = (writer, temp, final, (w, h))
            self.frames[a.source] = 0
        writer, _, _, size = self._writers[a.source]
        image = annotate(a.frame, a)
        if (image.shape[1], image.shape[0]) != size:        # a camera that changed resolution on reconnect
            image = cv2.resize(image, size)
        writer.write(image)
        self.frames[a.source] += 1

    def close(self) -> None:
        for source, (writer, temp, final, _) in list(self._writers.items()):
            writer.release()
            os.replace(temp, final)
            self.written[source] = str(final)
        self._writers.clear()

    def summary(self) -> dict:
        return {"files": self.written, "frames": self.frames}


class WindowSink(Sink):
    """A live window per source (needs a display and an OpenCV with GUI support); q or Esc stops."""

    name = "window"
    needs_frames = True

    def __init__(self):
        self._request_stop: Callable[[], None] = lambda: None

    @staticmethod
    def available() -> tuple[bool, str]:
        if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            return False, "no display (DISPLAY is not set)"
        return True, ""

    def start(self, sources, request_stop) -> None:
        self._request_stop = request_stop

    def write(self, a: Answer) -> None:
        import cv2

        if a.frame is None:
            return
        cv2.imshow(f"edgevl: {a.source}", annotate(a.frame, a))
        if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            self._request_stop()

    def close(self) -> None:
        try:
            import cv2

            cv2.destroyAllWindows()
        except Exception:       # headless OpenCV has no windows to destroy
            pass


class CallbackSink(Sink):
    """Calls ``fn(answer)`` for each answer (the Python API's way to consume a stream)."""

    name = "callback"

    def __init__(self, fn: Callable[[Answer], None], name: str = "callback", needs_frames: bool = False):
        self.fn, self.name, self.needs_frames = fn, name, needs_frames

    def write(self, a: Answer) -> None:
        self.fn(a)
