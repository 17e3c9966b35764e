"""Hugging Face families (LLaVA, SmolVLM, Idefics3, DeepSeek-VL, InternVL, BLIP-2, Gemma 3) on tiny random-weight checkpoints
built locally (tests/hf_tiny.py): export parity, and the runtime on ONNX Runtime and OpenVINO
against the HF processor and the HF model's own greedy ``generate``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import BACKENDS, has_module, needs_torch
from edgevl.errors import InputError

pytestmark = [needs_torch, pytest.mark.skipif(not has_module("transformers"),
                                              reason="needs transformers: pip install edgevl[export]")]

FAMILIES = ("llava", "smolvlm", "idefics3", "deepseek_vl", "internvl", "blip2", "gemma3")
PROMPTS = ("describe the image.", "what color is the circle?")
N_TOKENS = 16


def two_images() -> list[np.ndarray]:
    """A square scene and a wide, cropped one, so every resize path (crop, pad, aspect) runs."""
    from edgevl.data.world import make_scene

    a = make_scene("test", 7, seed=99).image()
    b = np.ascontiguousarray(np.concatenate([make_scene("test", 8, seed=99).image()] * 2, axis=1)[5:50])
    return [a, b]


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_tiny")


@pytest.fixture(scope="session")
def exported(hf_root):
    """family -> (bundle path, ExportableVLM): each family exported once per session."""
    import hf_tiny

    from edgevl.exporters.export import export_model, load_exportable

    cache = {}

    def get(family):
        if family not in cache:
            ckpt = hf_tiny.build(family, hf_root)
            out = hf_root / "bundles" / family
            export_model(ckpt, out, log=lambda *a: None)
            cache[family] = (out, load_exportable(ckpt))
        return cache[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_export_parity_and_greedy(exported, family):
    bundle, _ = exported(family)
    report = json.loads((bundle / "parity.json").read_text())
    assert {p["part"] for p in report["parts"]} == {"vision", "embed", "decoder"}
    for part in report["parts"]:
        assert part["passed"], part
        assert all(o["max_abs"] <= 1e-4 for o in part["outputs"]), part
    greedy = report["greedy"]
    assert len(greedy) == 3 and all(g["match"] for g in greedy)
    assert all(len(g["pytorch"]) >= 8 for g in greedy)      # real generations, not an immediate stop


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_tokens_equal_hf_generate(exported, family, backend):
    import edgevl

    bundle, vlm = exported(family)
    images = two_images()
    got = {}
    with edgevl.load(bundle, backend=backend, verbose=False) as model:
        for i, image in enumerate(images):
            for prompt in PROMPTS:
                result = model.generate(image, prompt, channels="rgb", max_new_tokens=N_TOKENS)
                expected = vlm.reference.generate([image], prompt, N_TOKENS)
                assert result.tokens == expected, (family, backend, i, prompt)
                got[i, prompt] = tuple(result.tokens)
    assert any(got[0, p] != got[1, p] for p in PROMPTS)   # the image reaches the answer


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_prompt_ids_and_pixels_equal_processor(exported, family):
    import edgevl

    bundle, vlm = exported(family)
    ref = vlm.reference
    with edgevl.load(bundle, backend="onnxruntime", verbose=False) as model:
        for prompt in PROMPTS + ("Is it RED, or blue?!  two  spaces, émoji ☺", ""):
            assert model.engine.encode_prompt(prompt, 1).tolist() == ref.input_ids(prompt, 1), prompt
        # several images: the per-image text (block + what the chat template puts after each) repeats
        if vlm.prompt.get("max_images") != 1:          # BLIP-2 takes one image
            assert model.engine.encode_prompt(PROMPTS[0], 2).tolist() == ref.input_ids(PROMPTS[0], 2)
        else:                                          # a second image is refused by name, not run
            image = np.zeros((32, 32, 3), np.uint8)
            with pytest.raises(InputError, match="at most 1 per prompt"):
                model.generate([image, image], PROMPTS[0], channels="rgb")
            ids = model.engine.encode_prompt(PROMPTS[0], 1)
            with pytest.raises(InputError, match="at most 1 per prompt"):
                model.engine.check_images(np.concatenate([ids, ids]), model.pixels([image, image], channels="rgb"))
        rng = np.random.default_rng(0)
        shapes = [(64, 64), (40, 56), (97, 33), (20, 24), (33, 97)]
        images = two_images() + [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
        for image in images:
            ours = model.pixels([image], channels="rgb")
            theirs = ref.pixels([image]).numpy()
            assert ours.shape == theirs.shape, image.shape
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5, err_msg=str(image.shape))


def test_smolvlm_manifest_records_disabled_image_splitting(exported):
    from edgevl.bundle import load_bundle

    m = load_bundle(exported("smolvlm")[0]).manifest
    split = m["preprocess"]["image_splitting"]
    assert split["enabled"] is False and split["checkpoint_default"] is True and split["why"]
    assert m["prompt"]["image_block"].startswith("<fake_token_around_image><global-img><image>")
    assert m["prompt"]["image_block"].count("<image>") == m["prompt"]["image_seq_len"] == 16


def test_unsupported_architecture_lists_supported(hf_root):
    import hf_tiny

    from edgevl.errors import UnsupportedArchitecture
    from edgevl.exporters.export import export_model

    ckpt = hf_tiny.build("llama", hf_root)
    with pytest.raises(UnsupportedArchitecture) as e:
        export_model(ckpt, hf_root / "never", log=lambda *a: None)
    msg = str(e.value)
    assert "LlamaForCausalLM" in msg
    for name in ("LlavaForConditionalGeneration", "SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration",
                 "DeepseekVLForConditionalGeneration"):
        assert name in msg
    assert not (hf_root / "never").exists()


def test_unsupported_rope_type_is_refused(hf_root, tmp_path):
    import hf_tiny

    from edgevl.errors import UnsupportedArchitecture
    from edgevl.exporters.export import load_exportable

    ckpt = tmp_path / "llava-yarn"
    shutil.copytree(hf_tiny.build("llava", hf_root), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                                "original_max_position_embeddings": 256}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="yarn.*default, linear, llama3"):
        load_exportable(ckpt)


def test_non_llama_text_model_is_refused(hf_root, tmp_path):
    import hf_tiny

    from edgevl.errors import UnsupportedArchitecture
    from edgevl.exporters.export import load_exportable

    ckpt = tmp_path / "llava-mistral"
    shutil.copytree(hf_tiny.build("llava", hf_root), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["model_type"] = "mistral"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="'mistral'.*Llama-style"):
        load_exportable(ckpt)


def test_checkpoint_missing_weights_names_them(hf_root, tmp_path):
    import hf_tiny

    from edgevl.errors import CheckpointError
    from edgevl.exporters.export import export_model

    ckpt = tmp_path / "no-weights"
    shutil.copytree(hf_tiny.build("deepseek_vl", hf_root), ckpt)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"weights \(model\.safetensors.*tokenizer \(tokenizer\.json\)"):
        export_model(ckpt, tmp_path / "out", log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_tokenizer_as_transformers_builds_it_is_shipped(hf_root, tmp_path):
    """A special token named only in tokenizer_config.json (not among tokenizer.json's added tokens) is
    matched whole by transformers but split by the raw file: export ships the tokenizer as transformers
    runs it, proved on the processor's ids."""
    import hf_tiny
    from tokenizers import Tokenizer

    from edgevl.exporters.export import load_exportable
    from edgevl.prompting import render_prompt

    ckpt = tmp_path / "deepseek-image-token-in-config-only"
    shutil.copytree(hf_tiny.build("deepseek_vl", hf_root), ckpt)
    raw = json.loads((ckpt / "tokenizer.json").read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<image_placeholder>"]
    (ckpt / "tokenizer.json").write_text(json.dumps(raw))
    vlm = load_exportable(ckpt)
    assert vlm.tokenizer_file != ckpt / "tokenizer.json"
    shipped = Tokenizer.from_file(str(vlm.tokenizer_file))
    p, add = vlm.prompt, vlm.tokenizer["add_special_tokens"]
    for prompt in PROMPTS:
        ids = shipped.encode(render_prompt(p["template"], prompt, p["image_block"], 1), add_special_tokens=add).ids
        assert ids == vlm.reference.input_ids(prompt, 1) and ids.count(p["image_token_id"]) == p["image_seq_len"]


@pytest.mark.parametrize("family, variants", [
    ("internvl", {"qkv_bias": True}),
    ("blip2", {"norm": "layer", "mlp": "plain", "activation": "relu", "position_offset": 2}),
])
def test_decoder_variants_are_recorded_in_the_manifest(exported, family, variants):
    from edgevl.bundle import load_bundle

    m = load_bundle(exported(family)[0]).manifest
    assert {k: m["decoder"]["variants"][k] for k in variants} == variants
    if family == "internvl":
        split = m["preprocess"]["image_splitting"]
        assert split["enabled"] is False and split["checkpoint_default"] is True and "crop_to_patches" in split["why"]
        assert m["prompt"]["image_block"] == "<img>" + "<IMG_CONTEXT>" * 16 + "</img>\n"
    else:
        assert m["prompt"]["max_images"] == 1 and m["prompt"]["template"].startswith("{image}</s>")
        assert m["decoder"]["variants"]["learned_positions"] == m["decoder"]["max_position"] + 2


@pytest.mark.slow
def test_blip2_int8_build_runs_and_reports(exported, tmp_path):
    """The `int8` composite build of an OPT-decoder bundle: the portable decoder candidates are timed
    (exporters/lower reads Llama-shaped decoders only), the bundle's accuracy report is written, and
    its tokens run through the runtime."""
    import edgevl
    from edgevl.exporters.quantize.composite import CompositeRecipe, composite_bundle

    fp32, _ = exported("blip2")
    recipe = CompositeRecipe(rounds=1, answer_tokens=8, vision_candidates=("dynamic-uint8", "static-qdq"))
    bundle = composite_bundle(fp32, tmp_path / "int8", "onnxruntime", recipe, eval_scenes=4, log=lambda *a: None)
    m = bundle.manifest
    assert m["precision"] == "int8" and m["decoder"]["variants"]["mlp"] == "plain"
    report = json.loads((bundle.path / m["reports"]["accuracy"]).read_text())
    assert report["gate"]["passed"] and report["gate"]["image_embeds_cosine"] >= 0.99
    assert "onnxruntime" not in m["parts"]["decoder"].get("artifacts", {})     # no lowered decoder
    assert not list(bundle.path.rglob("*lowered*"))
    with edgevl.load(bundle.path, backend="onnxruntime", verbose=False) as model:
        result = model.generate(two_images()[0], PROMPTS[0], channels="rgb", max_new_tokens=8)
    assert len(result.tokens) >= 1


@pytest.mark.slow
def test_internvl_int8_build_runs_and_reports(exported, tmp_path):
    """The `int8` composite build of InternVL: its Qwen2 decoder (q/k/v bias) is lowerable, so the
    lowered candidates are timed beside the portable ones; the accuracy report passes its gate and
    the bundle answers through the runtime."""
    import edgevl
    from edgevl.exporters.quantize.composite import CompositeRecipe, composite_bundle

    fp32, _ = exported("internvl")
    recipe = CompositeRecipe(rounds=1, answer_tokens=8, vision_candidates=("dynamic-uint8", "static-qdq"),
                             kv_calib_prompts=2)
    bundle = composite_bundle(fp32, tmp_path / "int8", "onnxruntime", recipe, eval_scenes=4, log=lambda *a: None)
    m = bundle.manifest
    assert m["precision"] == "int8" and m["decoder"]["variants"]["qkv_bias"] is True
    candidates = m["quantization"]["selection"]["decoder"]["candidates"]
    assert any(name.endswith("-lowered") for name in candidates) and any("lowered" not in n for n in candidates)
    report = json.loads((bundle.path / m["reports"]["accuracy"]).read_text())
    assert report["gate"]["passed"] and report["gate"]["image_embeds_cosine"] >= 0.99
    with edgevl.load(bundle.path, backend="onnxruntime", verbose=False) as model:
        result = model.generate(two_images()[0], PROMPTS[0], channels="rgb", max_new_tokens=8)
    assert len(result.tokens) >= 1


def test_qwen2_decoder_with_qkv_bias_takes_the_lowered_onnxruntime_path(exported, tmp_path):
    """InternVL's Qwen2 decoder (q/k/v bias, the variant the lowering reads) lowers to ONNX
    Runtime's fused operators and still answers like transformers; a variant the lowering does
    not read (BLIP-2's OPT shape) is refused before anything is written."""
    import edgevl
    from edgevl.errors import UnsupportedArchitecture
    from edgevl.exporters.lower.onnxruntime_decoder import lower_decoder

    bundle, vlm = exported("internvl")
    lowered = lower_decoder(bundle, tmp_path / "internvl-lowered", log=lambda *a: None)
    entry = lowered.manifest["parts"]["decoder"]["lowered"]["onnxruntime"]
    assert entry["parity"]["passed"] and entry["nodes"] < entry["portable_nodes"]
    with edgevl.load(lowered.path, backend="onnxruntime", verbose=False) as model:
        assert model.engine.runners["decoder"].path.name == "decoder_lowered.onnx"
        for image in two_images():
            for prompt in PROMPTS:
                tokens = model.generate(image, prompt, channels="rgb", max_new_tokens=N_TOKENS).tokens
                assert tokens == vlm.reference.generate([image], prompt, N_TOKENS)
    with pytest.raises(UnsupportedArchitecture, match="norm=layer"):
        lower_decoder(exported("blip2")[0], tmp_path / "blip2-lowered", log=lambda *a: None)
    assert not (tmp_path / "blip2-lowered").exists()


def test_gemma3_bundle_attends_bidirectionally_over_its_one_image_block(exported):
    """The manifest records the variant and the graph its image_span input; the image block is the
    processor's; transformers' answers without the block's mask differ for some prompt (so the
    runtime tokens equal to generate() above exercise it); two images are refused by name."""
    import edgevl
    from edgevl.bundle import load_bundle

    bundle, vlm = exported("gemma3")
    m = load_bundle(bundle).manifest
    variants = m["decoder"]["variants"]
    assert variants["image_bidirectional"] is True and variants["layer_types"] == ["sliding", "full", "sliding"]
    assert variants["embed_scale"] == pytest.approx(8.0)                      # sqrt(hidden 64)
    assert {"name": "image_span", "dtype": "int64", "shape": ["batch", 2]} in m["parts"]["decoder"]["inputs"]
    assert m["prompt"]["image_block"] == "\n\n<start_of_image>" + "<image_soft_token>" * 16 + "<end_of_image>\n\n"
    assert m["prompt"]["max_images"] == 1 and m["preprocess"]["pan_and_scan"]["enabled"] is False
    from edgevl.exporters.compile.trt_profiles import compute_profiles
    for profile in compute_profiles(m, parts=["decoder"])["decoder"]:     # TensorRT: image_span follows the batch
        assert profile.shapes["image_span"] == tuple((*b, 2) for b in profile.shapes["past_len"]), profile.name
    ref = vlm.reference
    causal = []
    for image in two_images():
        for prompt in PROMPTS:
            inputs = ref.processor(text=ref.text(prompt), images=[image], return_tensors="pt", do_pan_and_scan=False)
            n = inputs["input_ids"].shape[1]
            inputs.pop("token_type_ids")                                         # HF then masks causally
            out = ref.model.generate(**inputs, max_new_tokens=N_TOKENS, do_sample=False)[0, n:].tolist()
            causal.append(out != ref.generate([image], prompt, N_TOKENS))
    assert any(causal)
    with edgevl.load(bundle, backend="onnxruntime", verbose=False) as model:
        with pytest.raises(InputError, match="at most 1 per prompt"):     # the manifest's max_images
            model.generate(two_images(), PROMPTS[0], channels="rgb", max_new_tokens=2)
    from edgevl.runtimes.image_span import prompt_spans
    with pytest.raises(InputError, match="one image block per prompt"):   # ids built by hand: two blocks
        prompt_spans(np.array([1, 9, 9, 2, 9, 9, 3]), 9, np.zeros(1, np.int64))


def test_gemma3_in_flight_batching_gives_each_request_its_tokens_alone(exported):
    """Rows at different positions (prompts of different lengths, one without an image) decoded
    together: the image span is fed per row at prefill and empty at decode, so nothing changes."""
    import edgevl
    from conftest import batched_and_alone
    from edgevl.runtimes.sampling import SamplingParams

    bundle, _ = exported("gemma3")
    images = two_images()
    with edgevl.load(bundle, backend="onnxruntime", batching=True, max_batch_size=4, verbose=False) as vlm:
        engine = vlm.engine
        requests = [(engine.encode_prompt(p, 1), vlm.pixels([im], "rgb")) for im in images for p in PROMPTS]
        requests.append((engine.encode_prompt("how many shapes are there?", 0), None))
        params = [SamplingParams(max_new_tokens=n) for n in (12, 6, 16, 9, 10)]
        batched, alone, stats = batched_and_alone(vlm, requests, params)
    assert batched == alone
    assert max(stats["histograms"]["decode_batch"]) > 1


def test_gemma3_pan_and_scan_is_refused_by_name(hf_root, tmp_path):
    import hf_tiny

    from edgevl.errors import UnsupportedArchitecture
    from edgevl.exporters.export import export_model

    ckpt = tmp_path / "gemma3-pan-and-scan"
    shutil.copytree(hf_tiny.build("gemma3", hf_root), ckpt)
    config = json.loads((ckpt / "processor_config.json").read_text())
    config["image_processor"]["do_pan_and_scan"] = True
    (ckpt / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="Gemma 3 pan-and-scan.*do_pan_and_scan"):
        export_model(ckpt, tmp_path / "out", log=lambda *a: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gemma3_int8_build_runs_and_reports(exported, tmp_path):
    """The `int8` composite build of the Gemma 3 bundle: calibration and the accuracy gate run the
    decoder through the runtime (image_span fed), the report is written, the tokens run."""
    import edgevl
    from edgevl.exporters.quantize.composite import CompositeRecipe, composite_bundle

    fp32, _ = exported("gemma3")
    recipe = CompositeRecipe(rounds=1, answer_tokens=8, vision_candidates=("dynamic-uint8", "static-qdq"))
    bundle = composite_bundle(fp32, tmp_path / "int8", "onnxruntime", recipe, eval_scenes=4, log=lambda *a: None)
    m = bundle.manifest
    assert m["precision"] == "int8" and m["decoder"]["variants"]["image_bidirectional"] is True
    report = json.loads((bundle.path / m["reports"]["accuracy"]).read_text())
    assert report["gate"]["passed"] and report["gate"]["image_embeds_cosine"] >= 0.99
    with edgevl.load(bundle.path, backend="onnxruntime", verbose=False) as model:
        result = model.generate(two_images()[0], PROMPTS[0], channels="rgb", max_new_tokens=8)
    assert len(result.tokens) >= 1
