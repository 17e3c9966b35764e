"""TensorRT optimization profiles computed from a real exported bundle's manifest (no GPU)."""

from __future__ import annotations

import pytest

from edgevl.bundle import load_bundle
from edgevl.errors import ConfigError
from edgevl.exporters.compile.trt_profiles import AxisRange, ProfileOptions, axis_ranges, compute_profiles


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return load_bundle(tiny_bundle).manifest


def test_default_profiles_follow_the_manifest(manifest):
    context = manifest["decoder"]["max_position"]
    image_tokens = manifest["prompt"]["image_seq_len"]
    size = manifest["preprocess"]["size"]
    profiles = compute_profiles(manifest)
    assert sorted(profiles) == ["decoder", "embed", "vision"]

    (vision,) = profiles["vision"]
    assert vision.shapes == {"pixel_values": ((1, 3, *size), (1, 3, *size), (8, 3, *size))}

    (embed,) = profiles["embed"]
    opt_seq = min(context, image_tokens + 32)
    assert embed.shapes == {"input_ids": ((1, 1), (1, opt_seq), (8, min(context, 1024)))}

    prefill, decode = profiles["decoder"]
    assert (prefill.name, decode.name) == ("prefill", "decode")
    n_layers, kv, dh, d = (manifest["decoder"][k] for k in ("n_layers", "n_kv_heads", "head_dim", "hidden_dim"))
    names = [t["name"] for t in manifest["parts"]["decoder"]["inputs"]]
    assert list(prefill.shapes) == names and len(names) == 2 + 2 * n_layers
    opt_cap = max(64, 1 << (opt_seq + 64 - 1).bit_length())
    assert prefill.shapes["inputs_embeds"] == ((1, 1, d), (1, opt_seq, d), (8, min(context, 1024), d))
    assert decode.shapes["inputs_embeds"] == ((1, 1, d), (1, 1, d), (8, 1, d))
    assert decode.shapes["past_len"] == ((1,), (1,), (8,))
    for prof in (prefill, decode):
        lo, opt, hi = prof.shapes[f"past_value.{n_layers - 1}"]
        assert (lo[2], opt[2], hi[2]) == (1, opt_cap, context)
        assert lo[1] == hi[1] == kv and lo[3] == hi[3] == dh


def test_flags_and_dims_override(manifest):
    opts = ProfileOptions(max_batch=4, opt_batch=2, max_seq=128, opt_seq=40, max_capacity=256, opt_capacity=128,
                          dims={"capacity": AxisRange(64, 128, 512)})
    prefill, decode = compute_profiles(manifest, opts, parts=["decoder"])["decoder"]
    assert prefill.shapes["inputs_embeds"][2][:2] == (4, 128) and prefill.shapes["inputs_embeds"][1][:2] == (1, 40)
    assert decode.shapes["past_len"] == ((1,), (2,), (4,))
    assert decode.shapes["past_key.0"][0][2] == 64 and decode.shapes["past_key.0"][2][2] == 512   # --dim wins


def test_single_decoder_profile(manifest):
    (single,) = compute_profiles(manifest, ProfileOptions(decoder_profiles="single"), ["decoder"])["decoder"]
    lo, opt, hi = single.shapes["inputs_embeds"]
    assert (lo[:2], opt[:2], hi[:2]) == ((1, 1), (1, 1), (8, min(manifest["decoder"]["max_position"], 1024)))


def test_bad_ranges_are_clear(manifest):
    context = manifest["decoder"]["max_position"]
    with pytest.raises(ConfigError, match="--max-seq .* exceeds the model's context"):
        axis_ranges(manifest, ProfileOptions(max_seq=context + 1))
    with pytest.raises(ConfigError, match=r"batch \(--opt-batch/--max-batch\).*1 <= min <= opt <= max"):
        axis_ranges(manifest, ProfileOptions(opt_batch=9, max_batch=8))
    with pytest.raises(ConfigError, match="no part"):
        compute_profiles(manifest, parts=["audio"])
    with pytest.raises(ConfigError, match="expected NAME=MIN:OPT:MAX"):
        AxisRange.parse("seq=1:2")
    assert AxisRange.parse("height=224:336:448") == ("height", AxisRange(224, 336, 448))


def test_unknown_dynamic_axis_asks_for_dim(manifest):
    import copy

    m = copy.deepcopy(manifest)
    m["parts"]["vision"]["inputs"][0]["shape"] = ["batch", 3, "height", "width"]
    with pytest.raises(ConfigError, match=r"'pixel_values' axis 2 is dynamic \('height'\).*--dim height=MIN:OPT:MAX"):
        compute_profiles(m, parts=["vision"])
    dims = {"height": AxisRange(224, 336, 448), "width": AxisRange(224, 336, 448)}
    (prof,) = compute_profiles(m, ProfileOptions(dims=dims), ["vision"])["vision"]
    assert prof.shapes["pixel_values"] == ((1, 3, 224, 224), (1, 3, 336, 336), (8, 3, 448, 448))
