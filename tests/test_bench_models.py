"""The built-in random-weight benchmark models (benchmarks/models.py): ``llava-shaped``'s recipe
at full size (configs and processor only, no weights), and a tiny build of it through the same
code, exported by edgevl's LLaVA family, whose bundle's greedy tokens equal transformers'."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import has_module, needs_torch

pytestmark = [needs_torch, pytest.mark.skipif(not has_module("transformers"),
                                              reason="needs transformers: pip install edgevl[export]")]

# 2 layers, 64 wide; 224 px and patch 16 kept, so the tiny one has the full size's 196 image tokens.
# initializer_range 0.5 peaks the logits, so greedy tokens do not hinge on float noise (tests/hf_tiny.py)
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   initializer_range=0.5)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.5)
PROMPTS = ("describe the image.", "what color is the circle?")
N_TOKENS = 16


def image_tokens(config) -> int:
    """Image tokens per image from a LlavaConfig: one per patch, plus CLS unless "default" drops it."""
    grid = config.vision_config.image_size // config.vision_config.patch_size
    return grid * grid + (0 if config.vision_feature_select_strategy == "default" else 1)


def chat(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def test_llava_shaped_full_size_recipe():
    from edgevl.benchmarks import llava_shaped, smolvlm_shaped
    from edgevl.benchmarks.shaped import smollm2_text_config

    tok = llava_shaped.tokenizer()
    config = llava_shaped.make_config(tok)
    v = config.vision_config
    assert (v.model_type, v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size,
            v.image_size, v.patch_size, v.hidden_act) == ("clip_vision_model", 768, 12, 12, 3072, 224, 16, "quick_gelu")
    assert config.vision_feature_select_strategy == "default" and config.vision_feature_layer == -2
    assert config.projector_hidden_act == "gelu"
    assert image_tokens(config) == 196 == config.image_seq_length
    # the decoder is smolvlm-256m-shaped's, field for field (token ids included)
    smol_text = smollm2_text_config(smolvlm_shaped._tokenizer())
    assert config.text_config.to_dict() == smol_text.to_dict()
    text = config.text_config
    assert {k: getattr(text, k) for k in smolvlm_shaped.TEXT if k != "rope_theta"} == \
        {k: v for k, v in smolvlm_shaped.TEXT.items() if k != "rope_theta"}
    assert text.rope_parameters["rope_theta"] == smolvlm_shaped.TEXT["rope_theta"] == 100000.0
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (576, 30, 49280)     # SmolLM2-135M
    assert config.tie_word_embeddings and config.text_config.tie_word_embeddings
    # the processor expands <image> into as many tokens as the vision part yields features
    processor = llava_shaped.make_processor(tok, config)
    inputs = processor(text=[chat(processor, "describe the image.")], images=[[np.zeros((90, 160, 3), np.uint8)]],
                       return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert int((inputs["input_ids"] == config.image_token_index).sum()) == 196


def test_llava_shaped_is_a_built_in_bench_model(tmp_path, monkeypatch):
    from edgevl.benchmarks import llava_shaped
    from edgevl.benchmarks.models import BUILT_IN, LLAVA_SHAPED, resolve_model
    from edgevl.benchmarks.shaped import cached_checkpoint

    assert LLAVA_SHAPED == llava_shaped.NAME == "llava-shaped" and LLAVA_SHAPED in BUILT_IN
    builds = []

    def fake_build(out):
        builds.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(llava_shaped, "build", fake_build)
    bm = resolve_model(LLAVA_SHAPED, tmp_path)
    assert bm.checkpoint == tmp_path / "checkpoints" / f"llava-shaped-v{llava_shaped.BUILD_VERSION}"
    assert (bm.name, bm.kind, bm.measures_accuracy) == ("llava-shaped", "hf", False)
    assert resolve_model(LLAVA_SHAPED, tmp_path).checkpoint == bm.checkpoint and len(builds) == 1   # reused
    # the build version is in the cache key: a new recipe builds anew
    assert cached_checkpoint(tmp_path / "checkpoints", llava_shaped.NAME, 99, fake_build).name == "llava-shaped-v99"
    assert len(builds) == 2


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """(checkpoint, bundle): llava_shaped.build at 2 layers / 64 wide, exported to FP32 once."""
    from edgevl.benchmarks.llava_shaped import build
    from edgevl.exporters.export import export_model

    root = tmp_path_factory.mktemp("llava_shaped")
    ckpt = build(root / "checkpoint", vision=TINY_VISION, text=TINY_TEXT)
    export_model(ckpt, root / "bundle", log=lambda *a: None)
    return ckpt, root / "bundle"


def test_tiny_llava_shaped_exports_with_parity(tiny_llava):
    from edgevl.bundle import load_bundle

    ckpt, bundle = tiny_llava
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_feature_select_strategy"] == "default" and config["vision_feature_layer"] == -2
    assert config["text_config"]["num_hidden_layers"] == 2 and config["text_config"]["hidden_size"] == 64
    assert config["text_config"]["vocab_size"] == 49280
    manifest = load_bundle(bundle).manifest
    assert manifest["model"]["family"] == "llava" and manifest["prompt"]["image_seq_len"] == 196
    report = json.loads((bundle / "parity.json").read_text())
    assert {p["part"] for p in report["parts"]} == {"vision", "embed", "decoder"}
    assert all(p["passed"] for p in report["parts"]), report["parts"]
    assert len(report["greedy"]) == 3 and all(g["match"] and len(g["pytorch"]) >= 8 for g in report["greedy"])


def test_tiny_llava_shaped_bundle_tokens_equal_transformers_generate(tiny_llava):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import edgevl
    from edgevl.data.world import make_scene

    ckpt, bundle = tiny_llava
    net = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    eos = net.generation_config.eos_token_id
    images = [make_scene("test", 7, seed=99).image(), make_scene("test", 8, seed=99).image()]
    got = {}
    with edgevl.load(bundle, backend="onnxruntime", verbose=False) as model:
        for i, image in enumerate(images):
            for prompt in PROMPTS:
                inputs = processor(text=[chat(processor, prompt)], images=[[image]], return_tensors="pt")
                with torch.inference_mode():
                    out = net.generate(**inputs, max_new_tokens=N_TOKENS, do_sample=False)
                new = out[0, inputs["input_ids"].shape[1]:].tolist()
                expected = new[:new.index(eos)] if eos in new else new      # the bundle stops before EOS
                result = model.generate(image, prompt, channels="rgb", max_new_tokens=N_TOKENS)
                assert result.tokens == expected, (i, prompt)
                got[i, prompt] = tuple(result.tokens)
    assert all(len(t) >= 8 for t in got.values())
    assert any(got[0, p] != got[1, p] for p in PROMPTS)   # the image reaches the answer
