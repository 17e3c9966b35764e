"""Calibration sources, their errors, and realistic decoder feeds."""

from __future__ import annotations

import numpy as np
import pytest

from edgevl.errors import QuantizationError
from edgevl.exporters.quantize.calibration import (ArraySource, ImageFolderSource, PreprocessTransform, VideoSource,
                                                   WorldSource, evenly_spaced, parse_source)
from conftest import needs_cv2


def _write_pngs(folder, n, size=(20, 30)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((*size, 3), 10 * i, np.uint8)).save(folder / f"{i:02d}.png")


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(QuantizationError, match="has no images"):
        parse_source(tmp_path)


def test_unreadable_image_is_named_not_skipped(tmp_path):
    _write_pngs(tmp_path, 2)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    source = ImageFolderSource(tmp_path)
    with pytest.raises(QuantizationError, match="broken.png is unreadable"):
        source.images(3)


def test_too_few_samples_says_how_many_exist(tmp_path):
    _write_pngs(tmp_path, 3)
    with pytest.raises(QuantizationError, match="has 3 images but 5 samples"):
        parse_source(str(tmp_path)).images(5)


def test_folder_samples_evenly_and_returns_rgb(tmp_path):
    _write_pngs(tmp_path, 10)
    images = ImageFolderSource(tmp_path).images(3)
    assert [int(im[0, 0, 0]) for im in images] == [0, 40, 90]      # files 0, 4 (rounded), 9
    assert all(im.shape == (20, 30, 3) and im.dtype == np.uint8 for im in images)
    assert evenly_spaced(5, 5) == [0, 1, 2, 3, 4]


def test_bad_specs_are_refused_clearly(tmp_path):
    with pytest.raises(QuantizationError, match="not found"):
        parse_source(tmp_path / "missing")
    with pytest.raises(QuantizationError, match="split"):
        parse_source("world:nosuch")
    with pytest.raises(QuantizationError, match="empty"):
        parse_source([])
    with pytest.raises(QuantizationError, match="not an image"):
        ArraySource([np.zeros((4, 4, 3), np.float32)]).images(1)


def test_npy_arrays_and_world_source(tmp_path):
    arrays = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", arrays)
    images = parse_source(tmp_path / "imgs.npy").images(4)
    assert np.array_equal(images[2], arrays[2])
    world = parse_source("world:val:3")
    assert isinstance(world, WorldSource) and world.describe() == "world:val:3"
    prompts = world.prompts(5)
    assert len(set(prompts)) == 5 and all(p.endswith((".", "?")) for p in prompts)


def test_transform_is_the_bundles_preprocessing():
    from edgevl.preprocess import preprocess

    spec = {"size": [32, 32], "resize_mode": "stretch", "interpolation": "bilinear", "rescale": 1 / 255,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    image = np.random.default_rng(1).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    pixels = PreprocessTransform(spec)(image)
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, preprocess([image], spec, channels="rgb"))


@needs_cv2
def test_video_frames_sampled_evenly_as_rgb(tmp_path):
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(12):
        frame = np.zeros((24, 32, 3), np.uint8)
        frame[:, :, 0] = 20 * i            # blue channel in OpenCV's BGR order
        writer.write(frame)
    writer.release()
    source = parse_source(path)
    assert isinstance(source, VideoSource) and source.count_frames() == 12
    frames = source.images(4)
    blue = [int(round(f[:, :, 2].mean() / 20)) for f in frames]      # RGB: blue is the last channel
    assert blue == [0, 4, 7, 11] and all(f.shape == (24, 32, 3) for f in frames)
    with pytest.raises(QuantizationError, match="has 12 frames but 20 samples"):
        source.images(20)


@needs_cv2
def test_unreadable_video_is_refused(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(QuantizationError, match="cannot be opened"):
        parse_source(path).images(1)


def test_decoder_feeds_are_real_prefill_and_decode_steps(tiny_bundle):
    from edgevl.bundle import load_bundle
    from edgevl.exporters.quantize.decoder_feeds import collect_decoder_feeds

    bundle = load_bundle(tiny_bundle)
    world = WorldSource("train", 5)
    feeds = collect_decoder_feeds(bundle, world.images(2), ["describe the image.", "what is in the picture?"], 3)
    prefills = [f for f in feeds if f["inputs_embeds"].shape[1] > 1]
    decodes = [f for f in feeds if f["inputs_embeds"].shape[1] == 1]
    assert len(prefills) == 2 and decodes
    n_prompt = prefills[0]["inputs_embeds"].shape[1]
    assert int(prefills[0]["past_len"][0]) == 0 and not prefills[0]["past_key.0"].any()
    first_decode = feeds[1]
    assert int(first_decode["past_len"][0]) == n_prompt
    # the cache holds the prompt's real keys, and nothing past it
    assert np.abs(first_decode["past_key.0"][0, :, :n_prompt]).sum() > 0
    assert not first_decode["past_key.0"][0, :, n_prompt:].any()
    # the image slots (right after <bos>) hold image embeddings from the vision part: two image
    # tokens would share one token embedding, the image embeddings of two patches differ
    template = bundle.manifest["prompt"]["template"]
    assert template.startswith("<bos>{image}")
    assert not np.allclose(prefills[0]["inputs_embeds"][0, 1], prefills[0]["inputs_embeds"][0, 2])


def test_large_calibration_feeds_are_collected_one_per_call():
    """ORT holds every calibrated tensor of a collect_data call in memory: big feeds go singly."""
    import numpy as np

    from edgevl.exporters.quantize.qdq import memory_chunks

    small = [{"pixel_values": np.zeros((1, 3, 64, 64), np.float32)} for _ in range(20)]
    large = [{"pixel_values": np.zeros((1, 3, 512, 512), np.float32)} for _ in range(5)]
    assert [len(c) for c in memory_chunks(small)] == [8, 8, 4]
    assert [len(c) for c in memory_chunks(large)] == [1] * 5
    assert sum(memory_chunks(small), []) == small
