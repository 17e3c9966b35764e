"""Decoder variants (edgevl.models.decoder + exporters/families/hf_text): each HF text model a
family may end in, built tiny with random weights, mapped onto edgevl's one Decoder and checked
against the transformers model itself: full-sequence logits, prefill + token-by-token decode
through the fixed-capacity cache, the exported ONNX graph in ONNX Runtime, and refusals of what
the decoder does not compute, before any weight is read."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import has_module, needs_torch

pytestmark = [needs_torch, pytest.mark.skipif(not has_module("transformers"),
                                              reason="needs transformers: pip install edgevl[export]")]

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
              initializer_range=0.3)


def _configs():
    import transformers as tf

    gqa = dict(COMMON, intermediate_size=64, num_key_value_heads=2)
    return {
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**gqa), {}),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**gqa, tie_word_embeddings=True), {"qkv_bias": True}),
        "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**gqa, head_dim=16), {"qk_norm": True}),
        "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(**gqa, head_dim=8, hidden_activation="gelu_pytorch_tanh"),
                  {"activation": "gelu_tanh"}),
        "gemma3_text": (tf.Gemma3ForCausalLM,
                        tf.Gemma3TextConfig(**gqa, head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
                                            layer_types=["sliding_attention", "full_attention"],
                                            rope_parameters={"full_attention": {"rope_type": "default",
                                                                                "rope_theta": 100000.0},
                                                             "sliding_attention": {"rope_type": "default",
                                                                                   "rope_theta": 1000.0}}),
                        {"qk_norm": True, "sandwich_norms": True, "layer_types": ["sliding", "full"],
                         "sliding_window": 4, "rope_local_theta": 1000.0}),
        "opt": (tf.OPTForCausalLM, tf.OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
                                                word_embed_proj_dim=32, init_std=0.3),
                {"norm": "layer", "mlp": "plain", "activation": "relu", "learned_positions": 66}),
    }


def _text_model(model):
    return model.model.decoder if model.config.model_type == "opt" else model.model


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma", "gemma3_text", "opt"])
def pair(request):
    """(HF causal LM, edgevl Decoder sharing its weights, embed part, expected variant fields)."""
    import torch

    from edgevl.exporters.families.hf_text import embed_part, text_to_decoder

    cls, config, variants = _configs()[request.param]
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():     # random norm weights, so (1 + w) folding and LayerNorm biases are exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3) if p.ndim == 1 else None
    tm = _text_model(model)
    decoder = text_to_decoder(tm, model.lm_head, config, f"tiny {request.param}")
    return request.param, model, decoder, embed_part(tm), variants


def _ids(n=12, seed=1):
    import torch

    return torch.from_numpy(np.random.default_rng(seed).integers(3, 90, (1, n)))


def test_variant_fields_are_recorded(pair):
    name, _, decoder, _, variants = pair
    got = decoder.spec.variants()
    for key, value in variants.items():
        assert got[key] == value, (name, key, got)
    assert (got == {}) == (name == "llama")        # the Llama graph has no variant fields


def test_full_sequence_logits_equal_transformers(pair):
    import torch

    name, model, decoder, embed, _ = pair
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got, _, _ = decoder(embed(ids))
    assert float((got - want).abs().max()) < 1e-4, name


def test_prefill_then_decode_through_the_cache_equals_transformers(pair):
    """8 tokens prefilled, then 4 decoded one by one at their cache positions (past the
    sliding window of 4, so the window mask over cache slots is exercised)."""
    import torch

    from edgevl.models.decoder import KVCache

    name, model, decoder, embed, _ = pair
    ids = _ids(12, seed=2)
    with torch.no_grad():
        want = model(input_ids=ids).logits[0]
        cache = KVCache(decoder.spec, batch=1, capacity=16)
        logits, k, v = decoder(embed(ids[:, :8]), cache.keys, cache.values, cache.length.clone())
        cache.write(k, v)
        steps = [logits[0, -1]]
        for t in range(8, 12):
            logits, k, v = decoder(embed(ids[:, t:t + 1]), cache.keys, cache.values, cache.length.clone())
            cache.write(k, v)
            steps.append(logits[0, -1])
    got = torch.stack(steps[:-1])
    assert float((got - want[7:11]).abs().max()) < 1e-4, name


def test_exported_graph_equals_pytorch_in_onnxruntime(pair, tmp_path):
    """The fused export layout of each variant, in ONNX Runtime, on a batch of two rows at
    different cache positions."""
    import torch

    from edgevl.exporters.onnx_export import DecoderForExport, decoder_example, decoder_io_names, export_decoder
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    name, _, decoder, _, _ = pair
    path = export_decoder(decoder, tmp_path / "decoder.onnx")
    names_in, names_out = decoder_io_names(decoder.spec.n_layers)
    args = decoder_example(decoder, batch=2, seq=3, capacity=10)
    args = (args[0] * 50, torch.tensor([6, 2]), *[torch.randn_like(a) for a in args[2:]])
    with torch.no_grad():
        want = [o.numpy() for o in DecoderForExport(decoder)(*args)]
    with OnnxRuntimeRunner(path) as runner:
        got = runner.infer({n: a.numpy() for n, a in zip(names_in, args)})
    for n, w in zip(names_out, want):
        assert np.abs(got[n] - w).max() < 1e-4, (name, n)


@pytest.mark.parametrize("model_type, change, message", [
    ("gemma3_text", {"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ("opt", {"do_layer_norm_before": False}, "do_layer_norm_before=False"),
    ("opt", {"word_embed_proj_dim": 16}, "word_embed_proj_dim=16"),
    ("qwen2", {"hidden_act": "gelu"}, "activation 'gelu'"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                   "original_max_position_embeddings": 32}}, "RoPE type 'yarn'"),
])
def test_unsupported_settings_are_refused_from_the_config(model_type, change, message):
    from edgevl.errors import UnsupportedArchitecture
    from edgevl.exporters.families.hf_text import check_text_config

    _, config, _ = _configs()[model_type]
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(UnsupportedArchitecture, match=message.replace("(", r"\(")):
        check_text_config(config, "tiny")


def test_unknown_text_model_lists_the_supported_ones():
    import transformers as tf

    from edgevl.errors import UnsupportedArchitecture
    from edgevl.exporters.families.hf_text import check_text_config

    with pytest.raises(UnsupportedArchitecture, match="'gemma2'.*llama, qwen2, qwen3, gemma, gemma3_text, opt"):
        check_text_config(tf.Gemma2Config(**dict(COMMON, intermediate_size=64)), "tiny")


def test_impossible_combinations_are_refused_by_the_spec():
    from edgevl.errors import UnsupportedArchitecture
    from edgevl.models.decoder import DecoderSpec

    base = dict(hidden_dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=32, vocab_size=10)
    for bad, msg in ((dict(layer_types=("sliding", "full")), "without a sliding_window"),
                     (dict(layer_types=("full",)), "one of full/sliding per layer"),
                     (dict(norm="batch"), "norm='batch'"), (dict(activation="gelu"), "activation='gelu'")):
        with pytest.raises(UnsupportedArchitecture, match=msg):
            DecoderSpec(**base, **bad).validate()


def test_llama_graph_readers_refuse_variant_decoders():
    """exporters/lower reads Llama-shaped graphs by node names: a decoder with variants is refused by name."""
    from edgevl.errors import UnsupportedArchitecture
    from edgevl.models.decoder import require_llama_graph

    require_llama_graph({"n_layers": 2}, "lowering")                  # a Llama decoder: nothing to refuse
    with pytest.raises(UnsupportedArchitecture, match="lowering reads Llama-shaped.*norm=layer, mlp=plain"):
        require_llama_graph({"variants": {"norm": "layer", "mlp": "plain"}}, "lowering")
