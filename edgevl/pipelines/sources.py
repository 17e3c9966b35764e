"""Where frames come from: a webcam, a video file, an RTSP/HTTP stream, a GStreamer pipeline, an
image folder. OpenCV does the decoding (the ``camera`` extra); it is imported only when a source
opens, so ``import edgevl.pipelines`` works without it.

A ``Source`` is a small synchronous reader: ``open()`` (raises SourceError naming the source),
``read()`` (a BGR uint8 frame, ``None`` at a clean end of stream, an exception when the stream
dropped), ``seek(position)`` after a reopen, ``close()``. Threads, pacing, latest-frame-wins
and reconnection live in edgevl.pipelines.capture, written once for every kind of source.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevl.errors import ConfigError, SourceError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
_NAME = re.compile(r"^[A-Za-z_][\w.-]{0,63}$")


class SourceDropped(SourceError):
    """A stream that was delivering frames stopped before its end (the capture thread reconnects)."""


@dataclass
class Frame:
    """One captured frame. ``index`` counts the frames this source delivered (across reconnects
    and loops); ``position`` is the frame's number inside a file or folder (None for live sources);
    ``stream_time`` is seconds into the stream (media time for files, capture time for cameras)."""

    source: str
    index: int
    image: np.ndarray                 # (H, W, 3) uint8, BGR as OpenCV gives it
    captured_at: float                # wall clock (time.time()) for logs
    captured_mono: float              # time.perf_counter() at capture, for latencies
    stream_time: float
    position: int | None = None


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise ConfigError("camera and video sources need OpenCV: pip install 'edgevl[camera]' "
                          "(opencv-python-headless)") from e
    return cv2


class Source:
    """Base class. Subclasses set ``kind`` and ``live`` and implement ``_open``/``read``."""

    kind = "source"
    live = False                      # a camera or network stream: cannot be paused or rewound

    def __init__(self, name: str, target: str):
        self.name, self.target = name, target
        self.fps: float | None = None            # native frame rate when known
        self.frame_count: int | None = None      # frames in a file or folder when known
        self.position = 0                        # next frame's number inside a file or folder

    def describe(self) -> str:
        return f"{self.kind} source {self.name!r} ({self.target})"

    def open(self) -> "Source":
        try:
            self._open()
        except SourceError:
            raise
        except Exception as e:  # a backend library's own error: name the source, keep the cause
            raise SourceError(f"cannot open {self.describe()}: {e}") from e
        return self

    def _open(self) -> None:
        raise NotImplementedError

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def seek(self, position: int) -> None:
        """Continue at frame ``position`` (files and folders; live sources ignore it)."""

    def close(self) -> None:
        pass


class OpenCVSource(Source):
    """Anything cv2.VideoCapture opens; subclasses say how to reach it and what failure means."""

    api_name = "CAP_ANY"
    hint = "check that it exists and that OpenCV was built with the backend it needs"

    def __init__(self, name: str, target, label: str | None = None):
        super().__init__(name, label or str(target))
        self._target = target
        self._cap = None

    def _capture_params(self, cv2) -> list[int]:
        return []

    def _open(self) -> None:
        cv2 = _cv2()
        params = self._capture_params(cv2)
        api = getattr(cv2, self.api_name)
        cap = cv2.VideoCapture(self._target, api, params) if params else cv2.VideoCapture(self._target, api)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.describe()}: OpenCV could not open it; {self.hint}")
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else None
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count = count if count > 0 and not self.live else None
        self._cap = cap

    def read(self) -> np.ndarray | None:
        if self._cap is None:
            raise SourceDropped(f"{self.describe()} is not open")
        ok, frame = self._cap.read()
        if not ok or frame is None:
            if self.live:
                raise SourceDropped(f"{self.describe()} stopped delivering frames")
            return self._end_of_file()
        self.position += 1
        if frame.ndim == 2:
            frame = np.repeat(frame[:, :, None], 3, axis=2)
        return frame

    def _end_of_file(self) -> None:
        # A file that ends well before the length its header declares was truncated or is being
        # cut off (a network share going away): that is a drop, not an end. A frame or two of
        # slack, because container frame counts are estimates for some codecs.
        if self.frame_count and self.position < self.frame_count - max(2, self.frame_count // 100):
            raise SourceDropped(f"{self.describe()} ended at frame {self.position} of the {self.frame_count} "
                                "its header declares (truncated or unreadable)")
        return None

    def seek(self, position: int) -> None:
        if not self.live and self._cap is not None:
            self._cap.set(_cv2().CAP_PROP_POS_FRAMES, position)
        self.position = position

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class WebcamSource(OpenCVSource):
    kind, live = "webcam", True
    hint = "check the camera index (ls /dev/video*), that it is plugged in and not used by another program"

    def __init__(self, name: str, index: int | str):
        super().__init__(name, index, label=f"camera {index}")


class VideoFileSource(OpenCVSource):
    kind = "video file"
    hint = "check that the file is a video OpenCV's FFmpeg can decode (mp4, avi, mkv, ...)"

    def __init__(self, name: str, path: str | Path):
        super().__init__(name, str(path))

    def _open(self) -> None:
        if not Path(self._target).is_file():
            raise SourceError(f"cannot open {self.describe()}: no such file")
        super()._open()


class StreamURLSource(OpenCVSource):
    kind, live = "network stream", True
    api_name = "CAP_FFMPEG"
    hint = "check the URL, the network, and the camera's credentials; try it with ffplay"
    open_timeout_ms, read_timeout_ms = 10_000, 5_000    # a dead camera is reported, not waited on forever

    def _capture_params(self, cv2) -> list[int]:
        return [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.open_timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                self.read_timeout_ms]


class GStreamerSource(OpenCVSource):
    kind, live = "GStreamer pipeline", True
    api_name = "CAP_GSTREAMER"
    hint = ("check the pipeline with gst-launch-1.0, that it ends in 'appsink' with BGR output "
            "('... ! videoconvert ! video/x-raw,format=BGR ! appsink'), and that this OpenCV was built "
            "with GStreamer (pip's opencv-python is not; Jetson's system OpenCV is)")

    def _open(self) -> None:
        cv2 = _cv2()
        if not re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()):
            raise SourceError(f"cannot open {self.describe()}: this OpenCV ({cv2.__version__}) was built "
                              "without GStreamer; use the system OpenCV (e.g. JetPack's python3-opencv) "
                              "or a build with -D WITH_GSTREAMER=ON")
        super()._open()


class ImageFolderSource(Source):
    """The images of a folder in name order, at ``fps`` frames per second of stream time."""

    kind = "image folder"

    def __init__(self, name: str, folder: str | Path, fps: float = 5.0):
        super().__init__(name, str(folder))
        self.folder = Path(folder)
        self.fps = float(fps)
        self.files: list[Path] = []

    def _open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"cannot open {self.describe()}: not a directory")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise SourceError(f"cannot open {self.describe()}: it holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.frame_count = len(self.files)
        _cv2()

    def read(self) -> np.ndarray | None:
        if self.position >= len(self.files):
            return None
        path = self.files[self.position]
        image = _cv2().imread(str(path), _cv2().IMREAD_COLOR)
        if image is None:
            raise SourceDropped(f"{self.describe()}: cannot read {path.name} (deleted or not an image)")
        self.position += 1
        return image

    def seek(self, position: int) -> None:
        self.position = position


class ArraySource(Source):
    """Frames from memory (tests, benchmarks, frames produced by other code). ``live=True``
    makes it behave like a camera: played as captured, never held back, dropped when stale."""

    kind = "array"

    def __init__(self, name: str, frames, fps: float = 30.0, live: bool = False):
        super().__init__(name, f"{len(frames)} frames in memory")
        self.frames = list(frames)
        self.fps, self.live = float(fps), live
        self.frame_count = len(self.frames)

    def _open(self) -> None:
        pass

    def read(self) -> np.ndarray | None:
        if self.position >= len(self.frames):
            return None
        self.position += 1
        return self.frames[self.position - 1]

    def seek(self, position: int) -> None:
        self.position = position


def _default_name(kind: str, spec: str) -> str:
    if kind in ("video file", "image folder"):
        stem = Path(spec.rstrip("/")).stem or "source"
        return re.sub(r"[^\w.-]", "_", stem)
    return {"webcam": f"cam{spec}" if spec.isdigit() else Path(spec).name, "network stream": "stream",
            "GStreamer pipeline": "gst"}.get(kind, "source")


def parse_source(text: str, name: str | None = None, folder_fps: float = 5.0) -> Source:
    """A ``--source`` value -> a Source (not yet opened).

    ``0``, ``1``, ``/dev/video0``: webcam; ``rtsp://``, ``http(s)://``, ...: network stream;
    anything with `` ! `` (e.g. ``nvarguscamerasrc ! ... ! appsink``): GStreamer pipeline; a
    directory: image folder; a file: video file. ``NAME=SPEC`` names the source (``front=0``).
    """
    text = text.strip()
    if not text:
        raise ConfigError("empty --source; pass a camera index, video file, URL, GStreamer pipeline or folder")
    head, sep, rest = text.partition("=")
    if name is None and sep and _NAME.match(head) and not Path(text).exists() and rest:
        name, text = head, rest.strip()
    if text.isdigit() or re.fullmatch(r"/dev/video\d+", text):
        source: Source = WebcamSource("", int(text) if text.isdigit() else text)
        key = text if text.isdigit() else Path(text).name
    elif text.lower().startswith(URL_SCHEMES):
        source, key = StreamURLSource("", text), text
    elif "!" in text:
        source, key = GStreamerSource("", text), text
    elif Path(text).is_dir():
        source, key = ImageFolderSource("", text, fps=folder_fps), text
    elif Path(text).is_file():
        source, key = VideoFileSource("", text), text
    else:
        raise SourceError(f"source {text!r} is not a camera index, an existing video file or folder, a URL "
                          f"({', '.join(s[:-3] for s in URL_SCHEMES)}) or a GStreamer pipeline ('... ! appsink'); "
                          "check the path")
    source.name = name or _default_name(source.kind, key)
    return source


def unique_names(sources: list[Source]) -> None:
    """Make source names unique in place (``clip``, ``clip-2``, ...): they key metrics and outputs."""
    seen: dict[str, int] = {}
    for s in sources:
        base = s.name
        if base in seen:
            seen[base] += 1
            s.name = f"{base}-{seen[base]}"
        else:
            seen[base] = 1


def now() -> tuple[float, float]:
    """(wall clock, perf counter) taken together, for a frame's capture stamp."""
    return time.time(), time.perf_counter()
