"""Image preprocessing from a bundle's spec, in numpy + Pillow (no torch).

The spec is the manifest's ``preprocess`` object::

    size          [height, width] the encoder takes
    resize_mode   "stretch"                     resize to size, aspect ratio not kept
                  "shortest_edge_center_crop"   CLIP-style: shortest edge to the crop size,
                                                then centre crop (``resize_shortest`` may differ)
                  "longest_edge_pad"            longest edge to size (short edge rounded, at least
                                                ``min_size``), pad to square with ``pad_value``
                  "longest_edge_even_then_stretch"  Idefics3/SmolVLM: longest edge to ``resize_longest``
                                                (short edge int() then rounded up to even, both capped
                                                at 4096), then a plain resize to size
    interpolation "nearest" | "bilinear" | "bicubic" | "lanczos" (Pillow's filters, as the
                  Hugging Face processors use)
    rescale       multiplier applied to 0..255 values (1/255)
    mean, std     per channel, after rescale
    channel_order "RGB" (what every supported encoder takes)

Inputs accepted: a file path, a PIL image, or a numpy array (H, W), (H, W, 1), (H, W, 3),
(H, W, 4) of uint8 or uint16. Numpy arrays are BGR by default, as OpenCV gives them; pass
``channels="rgb"`` for RGB arrays. Grayscale is replicated to three channels, alpha is
composited onto white (like transformers' ``convert_to_rgb``), 16-bit is scaled to 8-bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgevl.errors import InputError

_FILTERS = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}  # PIL.Image.Resampling values
SUPPORTED = "a file path, a PIL image, or a uint8/uint16 numpy array shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"


def to_rgb_uint8(image: Any, channels: str = "bgr") -> np.ndarray:
    """Any supported image -> RGB uint8 (H, W, 3). Raises InputError naming what was wrong."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file {path} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                return _pil_to_rgb(im)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"image file {path} cannot be decoded ({e}); expected a PNG, JPEG, BMP or other "
                             "image Pillow can read") from e
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, channels)
    raise InputError(f"unsupported image type {type(image).__name__}; expected {SUPPORTED}")


def _pil_to_rgb(im) -> np.ndarray:
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _array_to_rgb(np.asarray(im), "rgb")
    if im.mode == "RGB":
        return np.asarray(im)
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def _array_to_rgb(a: np.ndarray, channels: str) -> np.ndarray:
    if channels not in ("bgr", "rgb"):
        raise InputError(f"channels must be 'bgr' or 'rgb', got {channels!r}")
    if a.dtype == np.uint16 or (a.dtype in (np.int32, np.uint32) and a.max(initial=0) > 255):
        a = (a.astype(np.uint32) >> 8).astype(np.uint8) if a.max(initial=0) > 255 else a.astype(np.uint8)
    elif a.dtype != np.uint8:
        raise InputError(f"image array has dtype {a.dtype}; expected uint8 (or uint16), i.e. {SUPPORTED}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"image array has shape {a.shape}; expected {SUPPORTED}")
    if a.shape[2] == 4:
        rgb, alpha = a[:, :, :3].astype(np.float32), a[:, :, 3:].astype(np.float32) / 255.0
        a = np.rint(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if channels == "bgr":
        a = a[:, :, ::-1]
    return np.ascontiguousarray(a)


def _resize(rgb: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    from PIL import Image

    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    if interpolation not in _FILTERS:
        raise InputError(f"unknown interpolation {interpolation!r}; expected one of {sorted(_FILTERS)}")
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=_FILTERS[interpolation]))


def resize_image(rgb: np.ndarray, spec: dict) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> RGB uint8 at the spec's size, following its resize mode."""
    out_h, out_w = spec["size"]
    mode = spec.get("resize_mode", "stretch")
    interp = spec.get("interpolation", "bilinear")
    h, w = rgb.shape[:2]
    if mode == "stretch":
        return _resize(rgb, out_w, out_h, interp)
    if mode == "shortest_edge_center_crop":
        short = spec.get("resize_shortest", min(out_h, out_w))
        # transformers' get_resize_output_image_size: shortest edge -> short, long edge scaled, int()
        if h <= w:
            new_h, new_w = short, int(short * w / h)
        else:
            new_h, new_w = int(short * h / w), short
        resized = _resize(rgb, new_w, new_h, interp)
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
        if top < 0 or left < 0:
            pad = np.zeros((max(new_h, out_h), max(new_w, out_w), 3), np.uint8)
            pad[max(0, -top):max(0, -top) + new_h, max(0, -left):max(0, -left) + new_w] = resized
            resized, top, left = pad, max(0, top), max(0, left)
        return resized[top:top + out_h, left:left + out_w]
    if mode == "longest_edge_pad":
        scale = max(out_h, out_w) / max(h, w)
        floor = int(spec.get("min_size", 1))
        new_h, new_w = max(floor, round(h * scale)), max(floor, round(w * scale))
        resized = _resize(rgb, new_w, new_h, interp)
        fill = np.array(spec.get("pad_value", [0, 0, 0]), dtype=np.uint8)
        canvas = np.empty((out_h, out_w, 3), np.uint8)
        canvas[:] = fill
        top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
        canvas[top:top + new_h, left:left + new_w] = resized
        return canvas
    if mode == "longest_edge_even_then_stretch":
        new_h, new_w = _longest_edge_even(h, w, int(spec["resize_longest"]))
        return _resize(_resize(rgb, new_w, new_h, interp), out_w, out_h, interp)
    raise InputError(f"unknown resize_mode {mode!r} in the bundle's preprocess spec")


def _longest_edge_even(h: int, w: int, longest: int, cap: int = 4096) -> tuple[int, int]:
    """transformers' Idefics3/SmolVLM resize rule, float for float: longest edge to ``longest``,
    the other int(longest / aspect) rounded up to even; then both scaled below ``cap``."""
    aspect = w / h
    if w >= h:
        w, h = longest, int(longest / aspect)
        h += h % 2
    else:
        h, w = longest, int(longest * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > cap:
        w, h = cap, int(cap / aspect)
    elif h > w and h > cap:
        h, w = cap, int(cap * aspect)
    return max(h, 1), max(w, 1)


def normalise(rgb: np.ndarray, spec: dict) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (3, H, W), rescaled and normalised."""
    scale = np.float32(spec.get("rescale", 1.0 / 255.0))
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    x = rgb.astype(np.float32) * scale
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(images, spec: dict, channels: str = "bgr") -> np.ndarray:
    """One image or a list -> pixel batch (B, 3, H, W) float32 for the vision part."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise InputError("no image given; pass at least one image")
    return np.stack([normalise(resize_image(to_rgb_uint8(im, channels), spec), spec) for im in images])
