"""The int8 KV cache of the ONNX Runtime-lowered decoder (exporters/lower/kv_int8.py): what ORT's
GroupQueryAttention does with a quantized cache, the calibrated scales, and the bundle end to end."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import batched_and_alone, needs_torch
from edgevl.errors import InputError


def _gqa(cache_int8: bool, b: int, heads: int, kv: int, dh: int, cap: int):
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h

    cache_t = T.INT8 if cache_int8 else T.FLOAT
    ins = ["q", "k", "v", "pk", "pv", "sl", "tot"]
    vi = [h.make_tensor_value_info("q", T.FLOAT, [b, 1, heads * dh]),
          h.make_tensor_value_info("k", T.FLOAT, [b, 1, kv * dh]), h.make_tensor_value_info("v", T.FLOAT, [b, 1, kv * dh]),
          h.make_tensor_value_info("pk", cache_t, [b, kv, cap, dh]), h.make_tensor_value_info("pv", cache_t, [b, kv, cap, dh]),
          h.make_tensor_value_info("sl", T.INT32, [b]), h.make_tensor_value_info("tot", T.INT32, [])]
    attrs = {}
    if cache_int8:
        attrs = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        ins += [""] * 5 + ["ks", "vs"]
        vi += [h.make_tensor_value_info(n, T.FLOAT, [kv * dh]) for n in ("ks", "vs")]
    node = h.make_node("GroupQueryAttention", ins, ["o", "presk", "presv"], domain="com.microsoft", num_heads=heads,
                       kv_num_heads=kv, **attrs)
    outs = [h.make_tensor_value_info(n, t, None) for n, t in (("o", T.FLOAT), ("presk", cache_t), ("presv", cache_t))]
    model = h.make_model(h.make_graph([node], "g", vi, outs),
                         opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_ort_group_query_attention_int8_cache_is_the_float_cache_dequantized_per_channel():
    """What the lowering relies on: scales are (kv_heads * head_dim) values, head-major; the cache
    holds round(x / scale); attention reads q * scale. Two rows at different positions."""
    b, heads, kv, dh, cap = 2, 6, 3, 16, 32
    rng = np.random.default_rng(0)
    ks, vs = (rng.uniform(0.01, 0.1, (kv, dh)).astype(np.float32) for _ in range(2))
    kq, vq = (rng.integers(-127, 128, (b, kv, cap, dh)).astype(np.int8) for _ in range(2))
    new_kq, new_vq = (rng.integers(-127, 128, (b, 1, kv, dh)) for _ in range(2))
    feeds = {"q": rng.standard_normal((b, 1, heads * dh)).astype(np.float32),
             "k": (new_kq * ks).astype(np.float32).reshape(b, 1, -1), "v": (new_vq * vs).astype(np.float32).reshape(b, 1, -1),
             "sl": np.array([5, 20], np.int32), "tot": np.array(21, np.int32)}
    as_float = {"pk": kq * ks[None, :, None, :], "pv": vq * vs[None, :, None, :]}
    ref = _gqa(False, b, heads, kv, dh, cap).run(None, {**feeds, **{k: v.astype(np.float32) for k, v in as_float.items()}})
    out, pk, pv = _gqa(True, b, heads, kv, dh, cap).run(None, {**feeds, "pk": kq, "pv": vq, "ks": ks.reshape(-1),
                                                              "vs": vs.reshape(-1)})
    np.testing.assert_allclose(out, ref[0], atol=1e-4)
    for row, pos in enumerate((5, 20)):                       # the new K/V stored exactly, at each row's position
        np.testing.assert_array_equal(pk[row, :, pos], new_kq[row, 0])
        np.testing.assert_array_equal(pv[row, :, pos], new_vq[row, 0])
    # a wrong layout would show: the same scales transposed per head give a different answer
    swapped = _gqa(True, b, heads, kv, dh, cap).run(None, {**feeds, "pk": kq, "pv": vq,
                                                           "ks": ks[::-1].reshape(-1), "vs": vs.reshape(-1)})[0]
    assert np.abs(swapped - ref[0]).max() > 1e-2


def test_key_scales_bound_every_rope_rotation_and_values_their_channel():
    from edgevl.exporters.lower.kv_int8 import KV_MARGIN, QMAX, kv_scales, quantize_cache

    rng = np.random.default_rng(1)
    layers, kv, dh, n = 2, 3, 8, 40
    k = rng.standard_normal((layers, kv, n, dh)).astype(np.float32) * rng.uniform(0.1, 5, (1, kv, 1, dh))
    v = rng.standard_normal((layers, kv, n, dh)).astype(np.float32)
    feed = {"past_len": np.array([n]), **{f"past_key.{i}": k[i][None] for i in range(layers)},
            **{f"past_value.{i}": v[i][None] for i in range(layers)}}
    scales = kv_scales([feed], layers, dh, head_floor=0.0)
    half = dh // 2
    pair = np.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2).max(axis=2)
    np.testing.assert_allclose(scales["key"], np.concatenate([pair, pair], -1) * KV_MARGIN / QMAX, rtol=1e-6)
    np.testing.assert_allclose(scales["value"], np.abs(v).max(axis=2) * KV_MARGIN / QMAX, rtol=1e-6)
    floored = kv_scales([feed], layers, dh, head_floor=0.5)["value"]     # no channel below half its head's largest
    np.testing.assert_allclose(floored, np.maximum(scales["value"], 0.5 * scales["value"].max(-1, keepdims=True)))
    assert scales["positions"] == n
    # any rotation of a pair (RoPE at any position) stays inside the range: no clipping
    for angle in np.linspace(0, 2 * np.pi, 13):
        c, s = np.cos(angle), np.sin(angle)
        rotated = np.concatenate([k[..., :half] * c - k[..., half:] * s, k[..., :half] * s + k[..., half:] * c], -1)
        q = quantize_cache(rotated[0][None], scales["key"][0])
        assert np.abs(q).max() <= QMAX / KV_MARGIN + 1
        err = np.abs(q * scales["key"][0][None, :, None, :] - rotated[0][None])
        assert (err <= scales["key"][0][None, :, None, :] / 2 + 1e-6).all()


def test_scales_need_cached_positions():
    from edgevl.errors import ExportError
    from edgevl.exporters.lower.kv_int8 import kv_scales

    empty = {"past_len": np.array([0]), "past_key.0": np.zeros((1, 1, 4, 8), np.float32),
             "past_value.0": np.zeros((1, 1, 4, 8), np.float32)}
    with pytest.raises(ExportError, match="no cached positions"):
        kv_scales([empty], 1, 8)


def test_an_int8_cache_refuses_float_keys_it_would_silently_truncate():
    from edgevl.runtimes.kv_cache import KVCache

    cache = KVCache(1, 2, 8, slots=1, capacity=16, dtype=np.int8)
    step = {"present_key.0": np.ones((1, 2, 1, 8), np.float32), "present_value.0": np.ones((1, 2, 1, 8), np.float32)}
    with pytest.raises(InputError, match="int8 cache works only with the graph"):
        cache.write(step, slice(0, 1))
    assert cache.length[0] == 0


# -- the bundle --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lowered_kv8(tiny_bundle, tmp_path_factory):
    from edgevl.exporters.lower.onnxruntime_decoder import lower_decoder

    return lower_decoder(tiny_bundle, tmp_path_factory.mktemp("lowered") / "tiny-lowered-kv8", kv_cache="int8",
                         log=lambda *a: None)


@needs_torch
def test_lowered_bundle_with_an_int8_cache_says_so_and_the_engine_makes_int8_caches(lowered_kv8):
    import onnx

    import edgevl
    from edgevl.bundle import load_bundle

    bundle = load_bundle(lowered_kv8.path)
    dec = bundle.manifest["parts"]["decoder"]
    assert dec["kv_cache"] == {"onnxruntime": "int8"} and bundle.kv_dtype("onnxruntime") == "int8"
    assert bundle.kv_dtype("openvino") == "float32"            # other backends run the portable graph
    entry = dec["lowered"]["onnxruntime"]
    assert entry["parity"]["passed"] and entry["parity"]["cosine"] >= 0.999
    assert entry["kv_cache"]["calibration_positions"] > 0
    graph = onnx.load(str(bundle.part_file("decoder", "onnxruntime")), load_external_data=False).graph
    past = [i for i in graph.input if i.name.startswith(("past_key.", "past_value."))]
    assert past and all(i.type.tensor_type.elem_type == onnx.TensorProto.INT8 for i in past)
    with edgevl.load(bundle.path, backend="onnxruntime", verbose=False) as vlm:
        cache = vlm.engine.new_cache(slots=1, capacity=64)
        assert cache.keys[0].dtype == np.int8      # a quarter of the float cache's bytes
        assert cache.nbytes == 2 * bundle.manifest["decoder"]["n_layers"] * cache.keys[0].size
        # a float cache fed to the int8 graph is refused with the fix, not cast
        runner = vlm.engine.runners["decoder"]
        wrong = vlm.engine.new_cache(slots=1, capacity=64)
        feeds = {"inputs_embeds": np.zeros((1, 1, bundle.manifest["decoder"]["hidden_dim"]), np.float32),
                 **wrong.feeds(slice(0, 1))}
        feeds["past_key.0"] = feeds["past_key.0"].astype(np.float32)
        with pytest.raises(InputError, match="keeps its KV cache as int8.*Engine.new_cache"):
            runner.infer(feeds)


def _held_out(n):
    from edgevl.data.tasks import scene_qas
    from edgevl.data.world import make_scene, render

    scenes = [make_scene("test", 5000 + i, seed=777) for i in range(n)]
    qas = [scene_qas(s)[i % 5] for i, s in enumerate(scenes)]
    return [render(s) for s in scenes], [qa.question for qa in qas], [qa.answer for qa in qas]


@needs_torch
def test_int8_cache_answers_like_the_float_cache_on_held_out_scenes(lowered_kv8, tiny_bundle):
    from edgevl.api import VLM
    from edgevl.bundle import load_bundle

    images, questions, truth = _held_out(40)

    def answers(bundle):
        with VLM(bundle, "onnxruntime") as vlm:
            return [vlm.generate(im, q, channels="rgb").text for im, q in zip(images, questions)]

    fp32, kv8 = answers(load_bundle(tiny_bundle)), answers(lowered_kv8)
    same = np.mean([a == b for a, b in zip(fp32, kv8)])
    right = np.mean([a.strip() == t for a, t in zip(kv8, truth)]) - np.mean([a.strip() == t for a, t in zip(fp32, truth)])
    assert same >= 0.95 and right >= -0.025, (same, right)


@needs_torch
def test_in_flight_batching_with_an_int8_cache_gives_the_tokens_of_each_request_alone(lowered_kv8):
    """Static per-channel scales make each row's cache independent of the others: rows at
    different positions decoded together give exactly their tokens alone (float weights)."""
    import edgevl
    from edgevl.preprocess import preprocess
    from edgevl.runtimes.sampling import SamplingParams

    images, questions, _ = _held_out(6)
    rng = np.random.default_rng(3)
    with edgevl.load(lowered_kv8.path, backend="onnxruntime", batching=True, max_batch_size=4, verbose=False) as vlm:
        engine = vlm.engine
        requests = [(engine.encode_prompt(q), preprocess(im, engine.preprocess_spec, "rgb"))
                    for im, q in zip(images, questions)]
        params = [SamplingParams(max_new_tokens=int(n)) for n in rng.integers(6, 20, len(requests))]
        batched, alone, stats = batched_and_alone(vlm, requests, params)
    assert batched == alone
    assert max(stats["histograms"]["decode_batch"]) > 1
