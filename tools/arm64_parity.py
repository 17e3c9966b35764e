"""Preprocessing parity between x86 and aarch64: the cases, and the tolerance check.

The x86 run computes every case and saves inputs and outputs; the emulated aarch64 run computes
the same cases from the same saved inputs and compares. Resampling is integer arithmetic on
coefficients computed in floating point, and aarch64 compilers fuse multiply-adds where x86
builds do not, so a resized pixel may differ by one grey level (measured: cv2.resize differed by
1 on ~32% of pixels); anything beyond +-1 on uint8 pixels is a real difference.

Imported by tools/arm64_check.py on both sides; numpy, Pillow, OpenCV and edgevl.preprocess only.
"""

from __future__ import annotations

import io

import numpy as np

UINT8_TOLERANCE = 1  # grey levels, on the resized uint8 image


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A camera-like RGB uint8 image: gradients, a few edges, sensor noise."""
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([xs * 255 // max(1, w - 1), ys * 255 // max(1, h - 1), (xs + ys) * 255 // max(1, h + w - 2)], -1)
    for _ in range(6):
        y0, x0 = int(rng.integers(h)), int(rng.integers(w))
        img[y0:y0 + h // 5, x0:x0 + w // 6] = rng.integers(0, 256, size=3)
    img = img + rng.integers(-12, 13, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encoded(image: np.ndarray, fmt: str) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def make_cases(scene_image: np.ndarray, bundle_spec: dict, seed: int = 0) -> list[dict]:
    """Cases as dicts: name, input (uint8/uint16 array, or encoded file bytes with ``file`` set),
    channels, spec. Built on x86 only; the aarch64 side reads them back from the saved file."""
    rng = np.random.default_rng(seed)
    photo = _smooth_image(rng, 480, 640)
    odd = _smooth_image(rng, 97, 131)
    base = dict(bundle_spec)
    clip = dict(base, size=[224, 224], resize_mode="shortest_edge_center_crop", interpolation="bicubic")
    cases = [
        {"name": "scene, bundle spec (no resize)", "input": scene_image, "channels": "rgb", "spec": base},
        {"name": "480x640 photo -> bundle size, bilinear", "input": photo, "channels": "bgr", "spec": base},
        {"name": "480x640 photo, CLIP centre crop 224, bicubic", "input": photo, "channels": "rgb", "spec": clip},
        {"name": "480x640 photo, longest edge pad 96, lanczos", "input": photo, "channels": "rgb",
         "spec": dict(base, size=[96, 96], resize_mode="longest_edge_pad", interpolation="lanczos",
                      pad_value=[114, 114, 114])},
        {"name": "97x131 -> 160x160 upscale, bicubic", "input": odd, "channels": "rgb",
         "spec": dict(base, size=[160, 160], interpolation="bicubic")},
        {"name": "97x131 -> bundle size, nearest", "input": odd, "channels": "rgb",
         "spec": dict(base, interpolation="nearest")},
        {"name": "grayscale 97x131", "input": odd[:, :, 1], "channels": "rgb", "spec": base},
        {"name": "RGBA 97x131 (alpha onto white)", "channels": "rgb", "spec": base,
         "input": np.concatenate([odd, rng.integers(0, 256, size=(97, 131, 1), dtype=np.uint8)], -1)},
        {"name": "uint16 97x131", "input": odd.astype(np.uint16) * 257, "channels": "rgb", "spec": base},
        {"name": "PNG file 480x640", "input": _encoded(photo, "PNG"), "file": ".png", "channels": "rgb", "spec": base},
        {"name": "JPEG file 480x640 (decode + resize)", "input": _encoded(photo, "JPEG"), "file": ".jpg",
         "channels": "rgb", "spec": base},
    ]
    # OpenCV resizes too (camera pipelines hand OpenCV frames around); the measured +-1 case.
    for interp in ("INTER_LINEAR", "INTER_AREA", "INTER_CUBIC"):
        cases.append({"name": f"cv2.resize 480x640 -> 224x224 {interp}", "input": photo, "cv2": interp,
                      "size": [224, 224]})
    return cases


def run_case(case: dict, tmp_dir, index: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (resized uint8 image, final float32 pixels or None for OpenCV-only cases)."""
    from pathlib import Path

    from edgevl.preprocess import normalise, resize_image, to_rgb_uint8

    if "cv2" in case:
        import cv2

        h, w = case["size"]
        return cv2.resize(case["input"], (w, h), interpolation=getattr(cv2, case["cv2"])), None
    image = case["input"]
    if case.get("file"):
        path = Path(tmp_dir) / f"case{index}{case['file']}"
        path.write_bytes(np.asarray(image, dtype=np.uint8).tobytes())
        image = str(path)
    resized = resize_image(to_rgb_uint8(image, case["channels"]), case["spec"])
    return resized, normalise(resized, case["spec"])


def compare_case(case: dict, x86_resized: np.ndarray, arm_resized: np.ndarray,
                 x86_pixels: np.ndarray | None, arm_pixels: np.ndarray | None) -> dict:
    """The tolerance check for one case; ``ok`` is False past +-1 grey level (or on shape change)."""
    out = {"case": case["name"]}
    if x86_resized.shape != arm_resized.shape:
        return dict(out, ok=False, reason=f"shape {arm_resized.shape} on arm64 vs {x86_resized.shape} on x86")
    diff = np.abs(x86_resized.astype(np.int32) - arm_resized.astype(np.int32))
    out.update(max_uint8_diff=int(diff.max(initial=0)), frac_pixels_differing=round(float((diff > 0).mean()), 5))
    ok = out["max_uint8_diff"] <= UINT8_TOLERANCE
    if x86_pixels is not None:
        # one grey level after rescale and the smallest std: what the uint8 tolerance becomes
        spec = case["spec"]
        bound = UINT8_TOLERANCE * float(spec.get("rescale", 1 / 255)) / float(min(spec["std"])) + 1e-6
        out["max_pixel_value_diff"] = float(np.abs(x86_pixels - arm_pixels).max(initial=0))
        out["pixel_value_bound"] = round(bound, 6)
        ok = ok and out["max_pixel_value_diff"] <= bound
    out["ok"] = bool(ok)
    if not ok:
        out["reason"] = f"differs by more than {UINT8_TOLERANCE} grey level"
    return out


def save_cases(cases: list[dict], results: list[tuple], path) -> None:
    """Inputs and x86 outputs into one .npz (case metadata goes into the JSON beside it)."""
    arrays = {}
    for i, (case, (resized, pixels)) in enumerate(zip(cases, results)):
        arrays[f"in{i}"] = case["input"]
        arrays[f"resized{i}"] = resized
        if pixels is not None:
            arrays[f"pixels{i}"] = pixels
    np.savez_compressed(path, **arrays)


def case_metadata(cases: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "input"} for c in cases]


def load_cases(meta: list[dict], npz) -> tuple[list[dict], list[tuple]]:
    cases, x86 = [], []
    for i, m in enumerate(meta):
        cases.append(dict(m, input=npz[f"in{i}"]))
        x86.append((npz[f"resized{i}"], npz[f"pixels{i}"] if f"pixels{i}" in npz.files else None))
    return cases, x86
