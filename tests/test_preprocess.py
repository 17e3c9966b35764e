"""Runtime preprocessing (numpy + Pillow) against the PyTorch reference, and bad images."""

import numpy as np
import pytest

from edgevl.errors import InputError
from edgevl.preprocess import preprocess, to_rgb_uint8

from conftest import needs_torch

SPEC = {"size": [64, 64], "resize_mode": "stretch", "interpolation": "bilinear", "rescale": 1 / 255,
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "channel_order": "RGB"}


@needs_torch
def test_runtime_pixels_match_pytorch_reference(tiny_torch):
    from edgevl.data.world import make_scene
    from edgevl.exporters.families.edgevl_tiny import TinyReference

    model, tok = tiny_torch
    ref = TinyReference(model, tok)
    rng = np.random.default_rng(0)
    images = [make_scene("test", 0).image(), rng.integers(0, 256, (100, 80, 3), dtype=np.uint8)]
    for im in images:
        expected = ref.pixels([im]).numpy()
        got = preprocess(im, SPEC, channels="rgb")
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_bgr_is_the_numpy_default():
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 255  # red
    as_rgb = preprocess(rgb, SPEC, channels="rgb")
    as_bgr = preprocess(rgb[..., ::-1].copy(), SPEC)
    np.testing.assert_array_equal(as_rgb, as_bgr)


def test_modes_are_converted():
    gray = np.full((64, 64), 128, np.uint8)
    assert np.array_equal(to_rgb_uint8(gray), np.full((64, 64, 3), 128, np.uint8))
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent -> white, like transformers' convert_to_rgb
    assert (to_rgb_uint8(rgba, "rgb") == 255).all()
    deep = np.full((8, 8, 3), 65535, np.uint16)
    assert (to_rgb_uint8(deep, "rgb") == 255).all()
    assert preprocess(np.zeros((300, 200, 3), np.uint8), SPEC).shape == (1, 3, 64, 64)


def test_pil_modes(tmp_path):
    from PIL import Image

    Image.new("L", (30, 20), 7).save(tmp_path / "g.png")
    Image.new("RGBA", (30, 20), (10, 20, 30, 255)).save(tmp_path / "a.png")
    Image.new("I;16", (30, 20), 65535).save(tmp_path / "d.png")
    assert to_rgb_uint8(tmp_path / "g.png").shape == (20, 30, 3)
    assert tuple(to_rgb_uint8(tmp_path / "a.png")[0, 0]) == (10, 20, 30)
    assert (to_rgb_uint8(tmp_path / "d.png") == 255).all()


def test_bad_images_are_rejected_with_the_expected_format(tmp_path):
    with pytest.raises(InputError, match="dtype float32; expected uint8"):
        to_rgb_uint8(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InputError, match=r"shape \(8, 8, 5\)"):
        to_rgb_uint8(np.zeros((8, 8, 5), np.uint8))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="broken.png cannot be decoded"):
        to_rgb_uint8(bad)
    with pytest.raises(InputError, match="does not exist"):
        to_rgb_uint8(tmp_path / "missing.jpg")
    with pytest.raises(InputError, match="unsupported image type"):
        to_rgb_uint8(12)
