"""Gemma 3 (exporters/families/gemma3.py): the decoder's ``image_bidirectional`` variant against
transformers' own Gemma 3 masks, then the family on a tiny random-weight checkpoint
(tests/hf_tiny.py) the way tests/test_hf_families.py checks every family."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import has_module, needs_torch

pytestmark = [needs_torch, pytest.mark.skipif(not has_module("transformers"),
                                              reason="needs transformers: pip install edgevl[export]")]

SPAN = (3, 10)      # an image block of 7 tokens, longer than the sliding window of 4


@pytest.fixture(scope="module")
def text_pair():
    """(HF Gemma 3 text model, edgevl Decoder with image_bidirectional sharing its weights, embed part)."""
    import dataclasses

    import torch
    import transformers as tf

    from edgevl.exporters.families.hf_text import embed_part, text_to_decoder
    from edgevl.models.decoder import Decoder

    config = tf.Gemma3TextConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, head_dim=8, query_pre_attn_scalar=12,
                                 sliding_window=4, max_position_embeddings=64, initializer_range=0.3,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(0)
    model = tf.Gemma3ForCausalLM(config).eval()
    plain = text_to_decoder(model.model, model.lm_head, config, "tiny gemma3")
    spec = dataclasses.replace(plain.spec, image_bidirectional=True)
    with torch.device("meta"):
        decoder = Decoder(spec)
    decoder.load_state_dict(plain.state_dict(), assign=True)
    decoder.rotary, decoder.rotary_local = plain.rotary, plain.rotary_local
    return model, decoder.eval(), embed_part(model.model)


def _hf_logits(model, ids, span):
    """transformers' logits with the image block marked as the Gemma 3 model marks it (token_type_ids)."""
    import torch
    from transformers.models.gemma3.modeling_gemma3 import (create_masks_for_vision_model,
                                                            get_block_sequence_ids_for_mask)

    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, span[0]:span[1]] = 1
    embeds = model.model.embed_tokens(ids)
    masks = create_masks_for_vision_model(model.config, embeds, None, None, None,
                                          get_block_sequence_ids_for_mask(token_type_ids))
    return model(inputs_embeds=embeds, attention_mask=masks).logits


def test_image_block_prefill_and_cached_decode_equal_transformers(text_pair):
    """12 tokens with an image block at 3..9, over full and sliding layers: the whole sequence in
    one call, then a prefill of 10 and two decode steps through the cache with empty spans."""
    import torch

    from edgevl.models.decoder import KVCache

    model, decoder, embed = text_pair
    ids = torch.from_numpy(np.random.default_rng(1).integers(3, 90, (1, 12)))
    span = torch.tensor([SPAN])
    with torch.no_grad():
        want = _hf_logits(model, ids, SPAN)[0]
        causal = model(input_ids=ids).logits[0]
        assert float((want - causal).abs().max()) > 1e-2          # the block changes the answer
        got, _, _ = decoder(embed(ids), image_span=span)
        assert float((got[0] - want).abs().max()) < 1e-4
        cache = KVCache(decoder.spec, batch=1, capacity=16)
        logits, k, v = decoder(embed(ids[:, :10]), cache.keys, cache.values, cache.length.clone(), image_span=span)
        cache.write(k, v)
        steps = [logits[0, -1]]
        for t in (10, 11):
            logits, k, v = decoder(embed(ids[:, t:t + 1]), cache.keys, cache.values, cache.length.clone(),
                                   image_span=torch.tensor([[t, t]]))
            cache.write(k, v)
            steps.append(logits[0, -1])
    assert float((torch.stack(steps) - want[9:12]).abs().max()) < 1e-4


def test_empty_span_is_the_causal_decoder_and_the_span_is_required(text_pair):
    import torch

    model, decoder, embed = text_pair
    ids = torch.from_numpy(np.random.default_rng(2).integers(3, 90, (1, 9)))
    with torch.no_grad():
        got, _, _ = decoder(embed(ids), image_span=torch.tensor([[5, 5]]))
        assert float((got[0] - model(input_ids=ids).logits[0]).abs().max()) < 1e-4
        with pytest.raises(ValueError, match="pass image_span"):
            decoder(embed(ids))
    assert decoder.spec.variants()["image_bidirectional"] is True
