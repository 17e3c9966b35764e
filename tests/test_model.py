"""edgevl-tiny in PyTorch: cache semantics, determinism, tokenizer behaviour."""

import numpy as np
import pytest
import torch

from edgevl.data.tasks import vocabulary
from edgevl.models.config import TinyVLMConfig
from edgevl.models.decoder import KVCache
from edgevl.models.tokenizer import build_tokenizer
from edgevl.models.vlm import TinyVLM


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    tok = build_tokenizer(vocabulary())
    cfg = TinyVLMConfig(lm_vocab_size=tok.get_vocab_size())
    return TinyVLM(cfg).eval(), tok


def test_cached_and_uncached_logits_agree(random_model):
    model, _ = random_model
    torch.manual_seed(1)
    cfg = model.cfg
    embeds = torch.randn(2, 12, cfg.lm_hidden_dim)
    full, _, _ = model.decoder(embeds)
    cache = KVCache(model.decoder.spec, batch=2, capacity=32)
    pieces = []
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 12)):   # a prefill, two decode steps, a chunk
        logits, k, v = model.decoder(embeds[:, start:stop], cache.keys, cache.values, cache.length)
        cache.write(k, v)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def test_rows_at_different_positions_match_rows_alone(random_model):
    model, _ = random_model
    torch.manual_seed(2)
    cfg = model.cfg
    a, b = torch.randn(1, 7, cfg.lm_hidden_dim), torch.randn(1, 3, cfg.lm_hidden_dim)
    step = torch.randn(2, 1, cfg.lm_hidden_dim)
    alone = []
    for prompt, x in ((a, step[:1]), (b, step[1:])):
        cache = KVCache(model.decoder.spec, 1, 16)
        _, k, v = model.decoder(prompt, cache.keys, cache.values, cache.length)
        cache.write(k, v)
        logits, _, _ = model.decoder(x, cache.keys, cache.values, cache.length)
        alone.append(logits)
    # both in one batch: row 0 at position 7, row 1 at position 3
    cache = KVCache(model.decoder.spec, 2, 16)
    padded = torch.zeros(2, 7, cfg.lm_hidden_dim)
    padded[0], padded[1, :3] = a[0], b[0]
    _, k, v = model.decoder(padded, cache.keys, cache.values, cache.length)
    cache.write(k, v, n_valid=torch.tensor([7, 3]))
    together, _, _ = model.decoder(step, cache.keys, cache.values, cache.length)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=0)


def test_greedy_generation_is_deterministic_and_sampling_is_seeded(random_model):
    model, tok = random_model
    from edgevl.models.reference import encode_prompt, preprocess
    from edgevl.data.world import make_scene

    pixels = preprocess([make_scene("test", 0).image()], model.cfg)
    ids = torch.tensor([encode_prompt(tok, model.cfg, "describe the image.")])
    g1 = model.generate(pixels, ids, max_new_tokens=8)
    g2 = model.generate(pixels, ids, max_new_tokens=8)
    assert g1 == g2
    s1 = model.generate(pixels, ids, max_new_tokens=8, temperature=1.0, top_k=20,
                        generator=torch.Generator().manual_seed(5))
    s2 = model.generate(pixels, ids, max_new_tokens=8, temperature=1.0, top_k=20,
                        generator=torch.Generator().manual_seed(5))
    assert s1 == s2


def test_unknown_words_map_to_unk():
    tok = build_tokenizer(vocabulary())
    enc = tok.encode("what colour is the zebra?", add_special_tokens=False)
    assert enc.tokens == ["what", "<unk>", "is", "the", "<unk>", "?"]
    assert tok.token_to_id("<unk>") in enc.ids


def test_config_roundtrip(tmp_path):
    cfg = TinyVLMConfig(lm_vocab_size=60)
    cfg.save(tmp_path / "config.json")
    assert TinyVLMConfig.load(tmp_path / "config.json") == cfg
    assert cfg.image_seq_len == 16


def test_shipped_checkpoint_scores_at_least_093_on_200_held_out_scenes():
    """The embedded default, in PyTorch FP32, on 200 test scenes (1,000-scene result:
    benchmarks/results/eval_pytorch_1000.json)."""
    from edgevl.evaluate import evaluate
    from edgevl.models.checkpoint import load_checkpoint
    from edgevl.models.reference import TorchAnswerer

    model, tokenizer = load_checkpoint("edgevl-tiny")
    res = evaluate(TorchAnswerer(model, tokenizer), n=200, split="test")
    assert res["accuracy"] >= 0.93, res
    assert min(res["by_task"].values()) >= 0.90, res["by_task"]


def test_stacked_projections_compute_the_same_decoder(random_model):
    """The export layout (q/k/v and gate/up stacked) gives the unfused model's logits and cache."""
    from edgevl.models.decoder import fuse_projections

    model, _ = random_model
    fused = fuse_projections(model.decoder)
    assert not hasattr(fused.layers[0].self_attn, "q_proj") and hasattr(fused.layers[0].mlp, "gate_up_proj")
    assert fused.lm_head.weight is model.decoder.lm_head.weight          # shared, not copied
    torch.manual_seed(3)
    embeds = torch.randn(2, 9, model.cfg.lm_hidden_dim)
    caches = [KVCache(model.decoder.spec, 2, 16) for _ in range(2)]
    for start, stop in ((0, 8), (8, 9)):                                 # prefill, then one decode step
        outs = []
        for decoder, cache in zip((model.decoder, fused), caches):
            logits, k, v = decoder(embeds[:, start:stop], cache.keys, cache.values, cache.length)
            cache.write(k, v)
            outs.append(logits)
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(caches[1].keys[1], caches[0].keys[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(caches[1].values[1], caches[0].values[1], atol=1e-6, rtol=0)


def test_exported_decoder_reads_shapes_and_masks_once(random_model, tmp_path):
    """Per-layer shape reads and masks would each add nodes to every layer; the export computes
    them once per call, so a layer is 4 weight MatMuls and a fixed small set of other nodes."""
    import collections

    import onnx

    from edgevl.exporters.onnx_export import export_decoder

    model, _ = random_model
    path = export_decoder(model.decoder, tmp_path / "decoder.onnx")
    graph = onnx.load(str(path)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    layers = model.decoder.spec.n_layers
    assert layers >= 4
    for once in ("Shape", "Trilu", "Tile", "Not", "Cos", "Sin"):   # (batch, seq) and capacity: 3 Shape reads
        assert ops[once] <= 3, (once, ops[once])
    weights = {i.name for i in graph.initializer}
    weight_matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(weight_matmuls) == 4 * layers + 1                         # qkv, o, gate_up, down + LM head
