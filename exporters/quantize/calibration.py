"""Calibration data: a source of images plus the bundle's own preprocessing (after ORT's reader
and NNCF's Dataset).

Sources: a folder of images, a video file (frames sampled evenly, OpenCV), the synthetic world
(``"world"``, ``"world:val"``, ``"world:train:7"``), or a list of arrays. Every source hands out
RGB uint8 images; ``PreprocessTransform`` turns them into exactly the pixels the bundle's vision
part takes at run time (edgevl.preprocess, from the manifest's spec), so calibration sees what
deployment sees. Sources never skip or pad silently: no images, an unreadable file, or fewer
samples than asked is a QuantizationError that says what was found and what to do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np

from edgevl.errors import InputError, QuantizationError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
# Prompts for decoder calibration when the source has no questions of its own (folders, videos).
DEFAULT_PROMPTS = ("describe the image.", "what is in the picture?", "how many objects are in the image?",
                   "what color is the largest object?", "where is the object?", "caption this image.")
HELD_OUT_SEED = 12345   # held-out scenes for reports: the world's test split, never calibration data


def evenly_spaced(total: int, n: int) -> list[int]:
    """``n`` indices spread over ``range(total)`` (first and last included when n > 1)."""
    if n >= total:
        return list(range(total))
    return [int(round(i * (total - 1) / max(1, n - 1))) for i in range(n)] if n > 1 else [total // 2]


class CalibrationSource(ABC):
    kind: str = "?"

    @abstractmethod
    def images(self, n: int) -> list[np.ndarray]:
        """Exactly ``n`` RGB uint8 images, or QuantizationError."""

    def prompts(self, n: int) -> list[str]:
        """``n`` prompts to pair with ``images(n)`` for decoder calibration."""
        return [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(n)]

    @abstractmethod
    def describe(self) -> str:
        """One line for the manifest: what the data was."""

    def _too_few(self, found: int, n: int, what: str) -> QuantizationError:
        return QuantizationError(f"calibration source {self.describe()} has {found} {what} but {n} samples were asked "
                                 f"for; lower --samples to at most {found} or add more data")


class ImageFolderSource(CalibrationSource):
    kind = "folder"

    def __init__(self, path: str | Path, recursive: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise QuantizationError(f"calibration folder {self.path} does not exist")
        pattern = "**/*" if recursive else "*"
        self.files = sorted(p for p in self.path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            others = sum(1 for p in self.path.glob(pattern) if p.is_file())
            raise QuantizationError(f"calibration folder {self.path} has no images ({others} other files; looked for "
                                    f"{' '.join(IMAGE_SUFFIXES)}); point --calib at a folder of images, a video, or 'world'")

    def describe(self) -> str:
        return f"folder {self.path} ({len(self.files)} images)"

    def images(self, n: int) -> list[np.ndarray]:
        from edgevl.preprocess import to_rgb_uint8

        if n > len(self.files):
            raise self._too_few(len(self.files), n, "images")
        out = []
        for i in evenly_spaced(len(self.files), n):
            try:
                out.append(to_rgb_uint8(self.files[i]))
            except InputError as e:
                raise QuantizationError(f"calibration image {self.files[i]} is unreadable ({e}); remove or replace it "
                                        "(calibration never skips images silently)") from e
        return out


class VideoSource(CalibrationSource):
    kind = "video"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise QuantizationError(f"calibration video {self.path} does not exist")

    def describe(self) -> str:
        return f"video {self.path}"

    def _capture(self):
        try:
            import cv2
        except ImportError as e:
            raise QuantizationError("reading a calibration video needs OpenCV: pip install edgevl[camera]") from e
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise QuantizationError(f"calibration video {self.path} cannot be opened by OpenCV (not a video, or a codec "
                                    "this OpenCV build lacks); convert it to MP4/H.264 or extract frames to a folder")
        return cv2, cap

    def count_frames(self) -> int:
        """Frames actually decodable (container frame counts lie for some files, so read them all)."""
        cv2, cap = self._capture()
        n = 0
        try:
            while cap.grab():
                n += 1
        finally:
            cap.release()
        return n

    def images(self, n: int) -> list[np.ndarray]:
        total = self.count_frames()
        if total == 0:
            raise QuantizationError(f"calibration video {self.path} has no decodable frames")
        if n > total:
            raise self._too_few(total, n, "frames")
        wanted = set(evenly_spaced(total, n))
        cv2, cap = self._capture()
        out, index = [], 0
        try:
            while len(out) < n and cap.grab():
                if index in wanted:
                    ok, frame = cap.retrieve()
                    if not ok or frame is None:
                        raise QuantizationError(f"frame {index} of calibration video {self.path} cannot be decoded")
                    out.append(np.ascontiguousarray(frame[:, :, ::-1]))      # OpenCV is BGR
                index += 1
        finally:
            cap.release()
        if len(out) < n:
            raise self._too_few(len(out), n, "decodable frames")
        return out


class WorldSource(CalibrationSource):
    """The synthetic world's scenes; its questions are the decoder's calibration prompts."""

    kind = "world"

    def __init__(self, split: str = "train", seed: int = 1):
        from edgevl.data.world import SPLITS

        if split not in SPLITS:
            raise QuantizationError(f"world split {split!r} does not exist; use one of {', '.join(SPLITS)}")
        self.split, self.seed = split, seed

    def describe(self) -> str:
        return f"world:{self.split}:{self.seed}"

    def scenes(self, n: int):
        from edgevl.data.world import make_scene

        return [make_scene(self.split, i, self.seed) for i in range(n)]

    def images(self, n: int) -> list[np.ndarray]:
        return [s.image() for s in self.scenes(n)]

    def prompts(self, n: int) -> list[str]:
        from edgevl.data.tasks import scene_qas

        # scene i is asked task i % 5, so prompts cover every task evenly
        return [scene_qas(s)[i % 5].question for i, s in enumerate(self.scenes(n))]


class ArraySource(CalibrationSource):
    """A list of image arrays (uint8/uint16, any layout edgevl.preprocess accepts)."""

    kind = "arrays"

    def __init__(self, arrays: Sequence[np.ndarray], channels: str = "rgb", name: str = "arrays"):
        self.arrays, self.channels, self.name = list(arrays), channels, name
        if not self.arrays:
            raise QuantizationError("calibration array list is empty; pass at least one image array")

    def describe(self) -> str:
        return f"{self.name} ({len(self.arrays)} images)"

    def images(self, n: int) -> list[np.ndarray]:
        from edgevl.preprocess import to_rgb_uint8

        if n > len(self.arrays):
            raise self._too_few(len(self.arrays), n, "images")
        out = []
        for i in evenly_spaced(len(self.arrays), n):
            try:
                out.append(to_rgb_uint8(self.arrays[i], self.channels))
            except InputError as e:
                raise QuantizationError(f"calibration array {i} is not an image ({e})") from e
        return out


def parse_source(spec) -> CalibrationSource:
    """A CLI/API calibration spec -> a source. Accepts a source, a list of arrays, 'world[:split[:seed]]',
    a folder, a video file, or a .npy/.npz file of images (N, H, W, 3)."""
    if isinstance(spec, CalibrationSource):
        return spec
    if isinstance(spec, (list, tuple)):
        return ArraySource(spec)
    text = str(spec)
    if text == "world" or text.startswith("world:"):
        fields = text.split(":")[1:]
        try:
            return WorldSource(fields[0] if fields else "train", int(fields[1]) if len(fields) > 1 else 1)
        except ValueError as e:
            raise QuantizationError(f"calibration source {text!r}: expected world[:split[:seed]] with an integer seed") from e
    path = Path(text)
    if path.is_dir():
        return ImageFolderSource(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".npy", ".npz"):
            data = np.load(path)
            arrays = data[data.files[0]] if suffix == ".npz" else data
            return ArraySource(list(arrays), name=f"arrays from {path}")
        if suffix in IMAGE_SUFFIXES:
            raise QuantizationError(f"calibration source {path} is a single image; put calibration images in a folder "
                                    "and pass the folder")
        return VideoSource(path)
    raise QuantizationError(f"calibration source {text!r} not found; pass a folder of images, a video file, a .npy "
                            "file of images, or 'world' (the synthetic scenes)")


class PreprocessTransform:
    """RGB uint8 image -> (1, 3, H, W) float32 pixels, with the bundle's own preprocessing spec."""

    def __init__(self, spec: dict):
        self.spec = spec

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from edgevl.preprocess import preprocess

        return preprocess([image], self.spec, channels="rgb")


def vision_feeds(source: CalibrationSource, preprocess_spec: dict, n: int) -> list[dict]:
    transform = PreprocessTransform(preprocess_spec)
    return [{"pixel_values": transform(im)} for im in source.images(n)]


def held_out_source() -> WorldSource:
    return WorldSource("test", HELD_OUT_SEED)


def make_reader(feeds: list[dict]):
    """ONNX Runtime CalibrationDataReader over a list of feed dicts (rewindable)."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self):
            self.feeds, self.i = feeds, 0

        def get_next(self):
            if self.i >= len(self.feeds):
                return None
            self.i += 1
            return self.feeds[self.i - 1]

        def rewind(self):
            self.i = 0

        def __len__(self):
            return len(self.feeds)

    return FeedReader()
