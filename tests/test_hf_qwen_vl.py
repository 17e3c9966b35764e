"""Qwen2-VL and Qwen2.5-VL (exporters/families/qwen2_vl.py) on tiny random-weight checkpoints built
locally (tests/hf_tiny.py: patch 4, merge 2; 2.5 with window attention), exported for a
48x32 image (a 4x6 merged grid, so the height and width positions differ): the mRoPE decoder
against transformers' text model, export parity, the runtime against the HF processor and the
HF model's own greedy ``generate`` on ONNX Runtime and OpenVINO, in-flight batching, and what
is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import BACKENDS, batched_and_alone, has_module, needs_torch
from test_hf_families import PROMPTS, two_images

pytestmark = [needs_torch, pytest.mark.skipif(not has_module("transformers"),
                                              reason="needs transformers: pip install edgevl[export]")]

FAMILIES = ("qwen2_5_vl", "qwen2_vl")
SIZE = (48, 32)                  # W x H: --image-size 48x32
N_TOKENS = 16


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """family -> (bundle path, ExportableVLM), each exported once per module."""
    import hf_tiny

    from edgevl.exporters.export import export_model, load_exportable

    root = tmp_path_factory.mktemp("hf_qwen")
    cache = {}

    def get(family):
        if family not in cache:
            ckpt = hf_tiny.build(family, root)
            out = root / "bundles" / family
            export_model(ckpt, out, log=lambda *a: None, image_size=SIZE)
            cache[family] = (out, load_exportable(ckpt, SIZE))
        return cache[family]
    get.root = root
    return get


def test_mrope_decoder_equals_the_hf_text_model_prefill_and_cached_decode(qwen):
    """edgevl's Decoder with mrope_section on the HF weights = Qwen2.5-VL's own text model, on the
    3-D positions of a prompt with an image block, for the prefill and two cached decode steps."""
    import torch

    from edgevl.models.decoder import KVCache
    from edgevl.runtimes.mrope import MRoPEPositions

    _, vlm = qwen("qwen2_5_vl")
    hf = vlm.reference.model
    lm, head = hf.model.language_model, hf.lm_head
    ids = np.asarray(vlm.reference.input_ids(PROMPTS[0], 1), np.int64)
    positions, delta = MRoPEPositions(vlm.manifest_extra["mrope"]).prompt(ids)
    assert len(set(positions[1].tolist())) > 1 and not np.array_equal(positions[1], positions[2])   # a real 2-D grid
    torch.manual_seed(0)
    x = torch.randn(1, len(ids), vlm.decoder.spec.hidden_dim)
    steps = torch.randn(2, 1, 1, vlm.decoder.spec.hidden_dim)
    with torch.no_grad():
        out = lm(inputs_embeds=x, position_ids=torch.from_numpy(positions)[:, None], use_cache=True)
        want = [head(out.last_hidden_state)]
        hf_cache = out.past_key_values
        cache = KVCache(vlm.decoder.spec, 1, 64)
        logits, k, v = vlm.decoder(x, cache.keys, cache.values, cache.length,
                                   position_ids=torch.from_numpy(positions)[:, None])
        got = [logits]
        cache.write(k, v)
        for i, step in enumerate(steps):
            pos = torch.full((3, 1, 1), len(ids) + i + delta)
            out = lm(inputs_embeds=step, position_ids=pos, cache=hf_cache, use_cache=True)
            want.append(head(out.last_hidden_state))
            logits, k, v = vlm.decoder(step, cache.keys, cache.values, cache.length, position_ids=pos)
            got.append(logits)
            cache.write(k, v)
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) < 1e-4
    # 1-D positions are not the same thing: the check above can fail
    with torch.no_grad():
        plain, _, _ = vlm.decoder(x, None, None, None)
    assert float((plain - want[0]).abs().max()) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_export_parity_greedy_and_manifest(qwen, family):
    from edgevl.bundle import load_bundle

    bundle, vlm = qwen(family)
    report = json.loads((bundle / "parity.json").read_text())
    for part in report["parts"]:
        assert part["passed"] and all(o["max_abs"] <= 1e-4 for o in part["outputs"]), part
    assert len(report["greedy"]) == 3 and all(g["match"] and len(g["pytorch"]) >= 8 for g in report["greedy"])
    m = load_bundle(bundle).manifest
    assert m["decoder"]["variants"] == {"qkv_bias": True, "mrope_section": [2, 3, 3]}
    assert m["mrope"]["grid"] == [4, 6] and m["mrope"]["image_size"] == [48, 32]
    assert m["preprocess"]["size"] == [32, 48] and m["preprocess"]["fixed_size"]["image_size"] == [48, 32]
    assert m["prompt"]["image_seq_len"] == 24
    assert m["prompt"]["image_block"] == "<|vision_start|>" + "<|image_pad|>" * 24 + "<|vision_end|>"
    assert m["prompt"]["template"].startswith("<|im_start|>user\n{image}{prompt}")
    assert [i["name"] for i in m["parts"]["decoder"]["inputs"]][-1] == "position_ids"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_tokens_equal_hf_generate(qwen, family, backend):
    import edgevl

    bundle, vlm = qwen(family)
    got = {}
    with edgevl.load(bundle, backend=backend, verbose=False) as model:
        for i, image in enumerate(two_images()):
            for prompt in PROMPTS:
                tokens = model.generate(image, prompt, channels="rgb", max_new_tokens=N_TOKENS).tokens
                assert tokens == vlm.reference.generate([image], prompt, N_TOKENS), (family, backend, i, prompt)
                got[i, prompt] = tuple(tokens)
    assert any(got[0, p] != got[1, p] for p in PROMPTS)       # the image reaches the answer


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_ids_and_pixels_equal_processor(qwen, family):
    import edgevl
    from edgevl.exporters.families.qwen2_vl import flatten_patches

    bundle, vlm = qwen(family)
    ref = vlm.reference
    ip = ref.processor.image_processor
    with edgevl.load(bundle, backend="onnxruntime", verbose=False) as model:
        for prompt in PROMPTS + ("Is it RED, or blue?!  two  spaces, émoji ☺", ""):
            assert model.engine.encode_prompt(prompt, 1).tolist() == ref.input_ids(prompt, 1), prompt
        assert model.engine.encode_prompt(PROMPTS[0], 2).tolist() == ref.input_ids(PROMPTS[0], 2)
        rng = np.random.default_rng(0)
        images = two_images() + [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in ((64, 64), (97, 33))]
        for image in images:          # any image: the processor on it at the bundle's size
            ours = model.pixels([image], channels="rgb")
            np.testing.assert_allclose(ours, ref.pixels([image]).numpy(), rtol=0, atol=1e-5, err_msg=str(image.shape))
        # images the processor itself resizes to 32x48 (smart_resize): the processor, untouched, on the raw image
        for shape in ((30, 50), (34, 46), (32, 48)):
            image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            theirs = ip(images=[image], return_tensors="np")
            assert theirs["image_grid_thw"].tolist() == [[1, 8, 12]]
            ours = flatten_patches(model.pixels([image], channels="rgb"), ip.patch_size, ip.merge_size,
                                   ip.temporal_patch_size)
            np.testing.assert_allclose(ours, theirs["pixel_values"], rtol=0, atol=1e-5, err_msg=str(shape))


def test_in_flight_batching_is_exact_with_3d_positions(qwen):
    """Rows with different rope offsets (no image, one image, two images) and lengths, decoded
    together, give exactly their tokens alone: the offset travels with each row's cache slot."""
    import edgevl
    from edgevl.runtimes.sampling import SamplingParams

    bundle, _ = qwen("qwen2_5_vl")
    images = two_images()
    with edgevl.load(bundle, backend="onnxruntime", batching=True, max_batch_size=4, verbose=False) as vlm:
        engine = vlm.engine
        px = [vlm.pixels([im], channels="rgb") for im in images]
        requests = [(engine.encode_prompt(PROMPTS[0], 1), px[0]),
                    (engine.encode_prompt(PROMPTS[1], 0), None),
                    (engine.encode_prompt(PROMPTS[1], 2), np.concatenate(px)),
                    (engine.encode_prompt(PROMPTS[0], 1), px[1]),
                    (engine.encode_prompt("how many shapes are there?", 1), px[0])]
        params = [SamplingParams(max_new_tokens=n) for n in (12, 5, 9, 16, 7)]
        batched, alone, stats = batched_and_alone(vlm, requests, params)
    assert batched == alone and all(len(t) >= 5 for t in alone)
    assert max(stats["histograms"]["decode_batch"]) > 1


def test_refusals_name_what_is_not_supported(qwen):
    import edgevl
    from edgevl.errors import InputError, UnsupportedArchitecture
    from edgevl.exporters.export import load_exportable

    bundle, _ = qwen("qwen2_vl")
    ckpt = qwen.root / "qwen2_vl"
    with pytest.raises(UnsupportedArchitecture, match=r"--image-size 50x32 .*multiples of 8.*nearest is 48x32"):
        load_exportable(ckpt, (50, 32))
    with pytest.raises(UnsupportedArchitecture, match="--image-size is not supported for the internvl family"):
        import hf_tiny
        load_exportable(hf_tiny.build("internvl", qwen.root), (32, 32))
    with edgevl.load(bundle, backend="onnxruntime", verbose=False) as model:
        engine = model.engine
        with pytest.raises(InputError, match="video input is not supported"):
            ids = engine.tokenizer.encode("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>hi").ids
            engine.prefill(engine.new_cache(), 0, engine.merge(np.asarray(ids), None), np.asarray(ids))
        with pytest.raises(InputError, match=r"one image size, 48x32 .*--image-size"):
            engine.encode_images(np.zeros((1, 3, 64, 64), np.float32))
        ids = engine.encode_prompt(PROMPTS[0], 1)
        embeds = engine.merge(ids, engine.encode_images(model.pixels([two_images()[0]], channels="rgb")))
        with pytest.raises(InputError, match="3-D positions computed from the prompt's token ids"):
            engine.prefill(engine.new_cache(), 0, embeds)


def test_tensorrt_profiles_cover_the_position_input(qwen):
    """position_ids (3, batch, seq) gets the decoder's own batch/seq ranges in both TensorRT profiles."""
    from edgevl.bundle import load_bundle
    from edgevl.exporters.compile.trt_profiles import compute_profiles

    m = load_bundle(qwen("qwen2_5_vl")[0]).manifest
    profiles = {p.name: p.shapes for p in compute_profiles(m, parts=["decoder"])["decoder"]}
    for name, shapes in profiles.items():
        lo, opt, hi = shapes["position_ids"]
        embeds = shapes["inputs_embeds"]
        assert lo == (3, *embeds[0][:2]) and opt == (3, *embeds[1][:2]) and hi == (3, *embeds[2][:2]), name
    assert profiles["decode"]["position_ids"][2][2] == 1


def test_default_image_size_comes_from_the_processor(qwen):
    from edgevl.exporters.export import load_exportable

    vlm = load_exportable(qwen.root / "qwen2_5_vl")
    # a 448x448 view clamped into the tiny processor's 16*16 .. 64*64 pixels, on its 8-pixel grid
    assert vlm.pixel_shape == (3, 64, 64) and vlm.image_seq_len == 64
    assert vlm.manifest_extra["mrope"]["grid"] == [8, 8]


@pytest.mark.slow
def test_int8_build_runs_and_reports(qwen, tmp_path):
    """The int8 composite build of a Qwen2.5-VL bundle (portable decoder: the lowering does not read
    mRoPE), with its accuracy report, answering through the runtime."""
    import edgevl
    from edgevl.exporters.quantize.composite import CompositeRecipe, composite_bundle

    fp32, _ = qwen("qwen2_5_vl")
    recipe = CompositeRecipe(rounds=1, answer_tokens=8, vision_candidates=("dynamic-uint8", "static-qdq"))
    bundle = composite_bundle(fp32, tmp_path / "int8", "onnxruntime", recipe, eval_scenes=4, log=lambda *a: None)
    m = bundle.manifest
    assert m["precision"] == "int8" and m["decoder"]["variants"]["mrope_section"] == [2, 3, 3] and m["mrope"]
    report = json.loads((bundle.path / m["reports"]["accuracy"]).read_text())
    assert report["gate"]["passed"] and report["gate"]["image_embeds_cosine"] >= 0.99
    assert "onnxruntime" not in m["parts"]["decoder"].get("artifacts", {})
    with edgevl.load(bundle.path, backend="onnxruntime", verbose=False) as model:
        result = model.generate(two_images()[0], PROMPTS[0], channels="rgb", max_new_tokens=8)
    assert len(result.tokens) >= 1


def test_a_part_written_as_one_file_per_tensor_is_gathered_into_one_data_file(tmp_path):
    """torch writes a graph past protobuf's 2 GB (Qwen2.5-VL-3B's vision tower) with one external file
    per tensor; the export gathers them into the part's one .data file, with the same results."""
    import onnx
    import onnxruntime as ort
    import torch

    from edgevl.exporters.onnx_export import _finalize

    path = tmp_path / "vision.onnx"
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    torch.onnx.export(module, (torch.randn(2, 64),), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    scattered = sorted(p.name for p in tmp_path.iterdir() if p.name != "vision.onnx")
    assert len(scattered) == 4
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    want = module(torch.from_numpy(x)).detach().numpy()
    _finalize(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx", "vision.onnx.data"]
    got = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
