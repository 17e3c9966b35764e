"""The decoder lowered to ONNX Runtime's fused operators (GroupQueryAttention over a KV buffer
shared in place) against the portable decoder it was made from, on edgevl-tiny."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import batched_and_alone, needs_torch

pytestmark = needs_torch


def _lower(src, out, **kwargs):
    from edgevl.exporters.lower.onnxruntime_decoder import lower_decoder

    return lower_decoder(src, out, log=lambda *a: None, **kwargs)


@pytest.fixture(scope="module")
def lowered(tiny_bundle, tmp_path_factory):
    return _lower(tiny_bundle, tmp_path_factory.mktemp("lowered") / "tiny-lowered")


@pytest.fixture(scope="module")
def lowered_int8(tiny_bundle, tmp_path_factory):
    return _lower(tiny_bundle, tmp_path_factory.mktemp("lowered") / "tiny-lowered-int8", bits=8, block_size=32)


def portable_view(bundle):
    """The same bundle with the lowered artefact hidden: ONNX Runtime runs the portable decoder."""
    from edgevl.bundle import Bundle

    manifest = copy.deepcopy(bundle.manifest)
    manifest["parts"]["decoder"].pop("artifacts", None)
    return Bundle(bundle.path, manifest)


def held_out_scenes(n: int = 50):
    from edgevl.data.tasks import scene_qas
    from edgevl.data.world import make_scene, render

    scenes = [make_scene("test", 5000 + i, seed=777) for i in range(n)]
    return [render(s) for s in scenes], [scene_qas(s)[i % 5].question for i, s in enumerate(scenes)]


def greedy_tokens(bundle, images, questions) -> list[list[int]]:
    from edgevl.api import VLM

    with VLM(bundle, "onnxruntime") as vlm:
        return [vlm.generate(im, q, channels="rgb").tokens for im, q in zip(images, questions)]


# -- what ONNX Runtime's GroupQueryAttention does, which the lowering relies on ------------------
def test_ort_group_query_attention_shares_the_buffer_and_takes_rows_at_their_own_positions():
    """Packed q/k/v, do_rotary, query_seqlens: three rows at different past lengths take a
    4-token chunk; with present bound to the past's memory, the rotated new keys land at each
    row's own position in that memory and attention matches a numpy reference."""
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    h, kv, dh, cap = 4, 2, 16, 32
    inv_freq = (1.0 / 10000 ** (np.arange(0, dh, 2) / dh)).astype(np.float32)
    angles = np.arange(cap, dtype=np.float32)[:, None] * inv_freq
    cos, sin = np.cos(angles), np.sin(angles)
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "seqlens_k", "total", "cos", "sin",
                                                    "", "", "", "", "", "", "", "qlens"], ["out", "k", "v"],
                            domain="com.microsoft", num_heads=h, kv_num_heads=kv, do_rotary=1)
    f32 = TP.FLOAT
    graph = helper.make_graph(
        [node], "gqa",
        [helper.make_tensor_value_info("qkv", f32, ["B", "T", (h + 2 * kv) * dh]),
         helper.make_tensor_value_info("pk", f32, ["B", kv, "C", dh]),
         helper.make_tensor_value_info("pv", f32, ["B", kv, "C", dh]),
         helper.make_tensor_value_info("seqlens_k", TP.INT32, ["B"]),
         helper.make_tensor_value_info("total", TP.INT32, []),
         helper.make_tensor_value_info("qlens", TP.INT32, ["B"])],
        [helper.make_tensor_value_info(n, f32, None) for n in ("out", "k", "v")],
        [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    past_len, t, b = np.array([5, 0, 11]), 4, 3
    qkv = rng.standard_normal((b, t, (h + 2 * kv) * dh)).astype(np.float32)
    pk, pv = (rng.standard_normal((b, kv, cap, dh)).astype(np.float32) for _ in range(2))
    pk0, pv0 = pk.copy(), pv.copy()
    io = sess.io_binding()
    feeds = {"qkv": qkv, "pk": pk, "pv": pv, "seqlens_k": (past_len + t - 1).astype(np.int32),
             "total": np.array(past_len.max() + t, np.int32), "qlens": np.full(b, t, np.int32)}
    for name, arr in feeds.items():
        io.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
    io.bind_output("out", "cpu")
    io.bind_output("k", "cpu", 0, np.float32, pk.shape, pk.ctypes.data)
    io.bind_output("v", "cpu", 0, np.float32, pv.shape, pv.ctypes.data)
    sess.run_with_iobinding(io)
    out = io.get_outputs()[0].numpy()

    def rope(x, pos):
        c, s = np.concatenate([cos[pos]] * 2, -1), np.concatenate([sin[pos]] * 2, -1)
        return x * c + np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], -1) * s

    x = qkv.reshape(b, t, h + 2 * kv, dh).transpose(0, 2, 1, 3)
    for r in range(b):
        p = int(past_len[r])
        pos = p + np.arange(t)
        q, k, v = rope(x[r, :h], pos), rope(x[r, h:h + kv], pos), x[r, h + kv:]
        np.testing.assert_allclose(pk[r, :, p:p + t], k, atol=1e-5)        # rotated k, in place
        np.testing.assert_allclose(pv[r, :, p:p + t], v, atol=0)
        assert np.array_equal(pk[r, :, :p], pk0[r, :, :p]) and np.array_equal(pv[r, :, :p], pv0[r, :, :p])
        keys, values = pk[r, :, :p + t], pv[r, :, :p + t]
        for head in range(h):
            scores = q[head] @ keys[head // (h // kv)].T / np.sqrt(dh)
            scores[np.arange(p + t)[None, :] > pos[:, None]] = -np.inf
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            expected = (probs / probs.sum(-1, keepdims=True)) @ values[head // (h // kv)]
            np.testing.assert_allclose(out[r, :, head * dh:(head + 1) * dh], expected, atol=1e-5)


# -- the lowered graph -------------------------------------------------------------------------
def test_lowered_graph_is_a_few_fused_nodes_per_layer_with_the_portable_interface(lowered, tiny_bundle):
    import onnx

    from edgevl.exporters.onnx_export import io_spec
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    path = lowered.part_file("decoder", "onnxruntime")
    assert path.relative_to(lowered.path).as_posix() == "onnxruntime/decoder_lowered.onnx"
    assert lowered.parts["decoder"]["onnx"] == "decoder.onnx" and (lowered.path / "decoder.onnx").is_file()
    n_layers = lowered.manifest["decoder"]["n_layers"]
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    assert len(ops) <= 12 * n_layers + 16                     # 11 per layer + shared lengths + head
    assert "GatherElements" not in ops                        # the runner reads the new K/V from the buffers
    assert ops.count("GroupQueryAttention") == n_layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * n_layers
    assert not {"Softmax", "Where", "Transpose", "Trilu", "Cos", "Sin"} & set(ops)
    entry = lowered.parts["decoder"]["lowered"]["onnxruntime"]
    assert entry["from"] == "decoder.onnx" and entry["nodes"] == len(ops) and entry["parity"]["passed"]
    assert entry["portable_nodes"] > 5 * entry["nodes"]
    assert "GroupQueryAttention" in entry["ops"]

    # the graph's inputs are the portable decoder's; its outputs are logits and the shared buffers,
    # and the runner shows the portable interface (present_* read back from the buffers)
    p_in, p_out = io_spec(tiny_bundle / "decoder.onnx")
    l_in, l_out = io_spec(path)
    assert l_in == p_in and l_out[0] == p_out[0] and p_out[0]["name"] == "logits"
    assert [o["name"] for o in l_out[1:]] == ["cache_" + o["name"][len("present_"):] for o in p_out[1:]]
    with OnnxRuntimeRunner(tiny_bundle / "decoder.onnx") as portable, OnnxRuntimeRunner(path) as low:
        assert low.inputs == portable.inputs and low.outputs == portable.outputs


def test_lowered_matches_portable_through_prefill_and_batched_decode(lowered, tiny_bundle):
    """Prefill T=7, decode steps at batch 1, then three rows at different lengths decoding
    together past a cache doubling, then a batched 4-token chunk: logits and the new tokens'
    K/V within 1e-4 at every step, and the runner wrote each step's K/V into the cache itself.
    The cache arrays are (re)bound only when the rows or the arrays change (5 times in 48 steps):
    a step over the same views reuses the binding."""
    from edgevl.runtimes.kv_cache import KVCache, WrittenInPlace
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    spec = lowered.manifest["decoder"]
    rng = np.random.default_rng(3)
    caches = [KVCache(spec["n_layers"], spec["n_kv_heads"], spec["head_dim"], slots=3,
                      max_capacity=spec["max_position"]) for _ in range(2)]
    with OnnxRuntimeRunner(tiny_bundle / "embed.onnx") as embed, \
            OnnxRuntimeRunner(tiny_bundle / "decoder.onnx", threads=2) as portable, \
            OnnxRuntimeRunner(lowered.part_file("decoder", "onnxruntime"), threads=2) as low:
        binding, rebinds = low.activate()._in_place, []
        bind_changed = binding._bind_changed
        binding._bind_changed = lambda feeds: rebinds.append(1) or bind_changed(feeds)

        def step(rows: slice, t: int) -> None:
            ids = rng.integers(5, spec["vocab_size"], (rows.stop - rows.start, t))
            embeds = embed.infer({"input_ids": ids})["inputs_embeds"]
            outs = []
            for runner, cache in zip((portable, low), caches):
                cache.ensure(int(cache.length[rows].max()) + t)
                outs.append(runner.infer({"inputs_embeds": embeds, **cache.feeds(rows)}))
            ref, got = outs
            assert isinstance(got, WrittenInPlace) and got.target is caches[1].keys[0]
            assert sorted(got) == sorted(ref)
            for name in ref:
                assert got[name].shape == ref[name].shape
                np.testing.assert_allclose(got[name], ref[name], atol=1e-4, err_msg=name)
            lc, last = caches[1], spec["n_layers"] - 1
            for j, start in enumerate(lc.length[rows].tolist()):      # in the cache already, before write()
                row = rows.start + j
                np.testing.assert_allclose(lc.keys[0][row, :, start:start + t], ref["present_key.0"][j], atol=1e-4)
                np.testing.assert_allclose(lc.values[last][row, :, start:start + t], ref[f"present_value.{last}"][j],
                                           atol=1e-4)
            for cache, out in zip(caches, outs):
                cache.write(out, rows)

        step(slice(0, 1), 7)
        for _ in range(4):
            step(slice(0, 1), 1)
        step(slice(1, 2), 20)
        step(slice(2, 3), 33)
        assert caches[1].capacity == 64
        for _ in range(40):
            step(slice(0, 3), 1)
        assert caches[1].capacity == 128 and caches[1].length.tolist() == [51, 60, 73]
        step(slice(0, 3), 4)
    assert len(rebinds) == 5        # rows 0, 1, 2, 0-2, then 0-2 after the doubling
    n = int(caches[0].length.min())
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        np.testing.assert_allclose(b[:, :, :n], a[:, :, :n], atol=1e-4)


def test_lowered_is_correct_without_in_place_memory(lowered):
    """Strided or read-only cache arrays are copied (the caller's arrays stay untouched), and
    the graph run by plain session.run, with no binding at all, gives the same logits and the
    same new keys/values in the present buffers it returns."""
    import onnxruntime as ort

    from edgevl.runtimes.kv_cache import WrittenInPlace
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    spec = lowered.manifest["decoder"]
    rng = np.random.default_rng(5)
    shape = (2, spec["n_kv_heads"], 16, spec["head_dim"])
    feeds = {"inputs_embeds": rng.standard_normal((2, 3, spec["hidden_dim"])).astype(np.float32),
             "past_len": np.array([4, 9])}
    for i in range(spec["n_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{i}"] = rng.standard_normal(shape).astype(np.float32)
    feeds["past_key.2"] = feeds["past_value.2"].copy()
    path = lowered.part_file("decoder", "onnxruntime")
    with OnnxRuntimeRunner(path) as runner:
        expected = runner.infer({k: v.copy() for k, v in feeds.items()})
        strided = dict(feeds)
        big = np.zeros(shape[:2] + (32,) + shape[3:], np.float32)
        big[:, :, :16] = feeds["past_key.0"]
        strided["past_key.0"] = big[:, :, :16]                          # not C-contiguous
        frozen = feeds["past_value.1"].copy()
        frozen.flags.writeable = False
        strided["past_value.1"] = frozen
        strided["past_key.2"] = strided["past_value.2"] = feeds["past_value.2"]   # one array fed twice
        before = {k: np.array(v, copy=True) for k, v in strided.items()}
        got = runner.infer(strided)
        names = runner.output_names
    assert not isinstance(got, WrittenInPlace)                     # KVCache.write would store them
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6, err_msg=name)
    assert np.array_equal(big[:, :, :16], before["past_key.0"]) and np.array_equal(frozen, before["past_value.1"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph_names = [o.name for o in session.get_outputs()]
    plain = dict(zip(graph_names, session.run(graph_names, {k: v.copy() for k, v in feeds.items()})))
    np.testing.assert_allclose(plain["logits"], expected["logits"], atol=1e-6)
    for name in names[1:]:                                  # present_{kind}.{i}: rows at 4 and 9, 3 new
        buf = plain["cache_" + name[len("present_"):]]
        new = np.stack([buf[0, :, 4:7], buf[1, :, 9:12]])
        np.testing.assert_allclose(new, expected[name], atol=1e-6, err_msg=name)


def test_kv_cache_skips_only_its_own_arrays_written_in_place():
    from edgevl.runtimes.kv_cache import KVCache, WrittenInPlace

    cache, other = (KVCache(1, 2, 4, slots=2, capacity=8) for _ in range(2))
    present = {"present_key.0": np.ones((2, 2, 1, 4), np.float32), "present_value.0": np.ones((2, 2, 1, 4), np.float32)}
    cache.write(WrittenInPlace(present, cache.keys[0]), slice(0, 2))        # the runner wrote it: lengths only
    assert cache.length.tolist() == [1, 1] and not cache.keys[0].any()
    cache.write(WrittenInPlace(present, other.keys[0]), slice(0, 2))        # another cache's arrays: stored
    assert cache.length.tolist() == [2, 2] and cache.keys[0][:, :, 1].all() and not cache.keys[0][:, :, 0].any()


def test_a_decoder_with_biases_and_other_widths_lowers_to_the_same_numbers(tmp_path):
    """Llama variants the portable export already covers: q/k/v, o and MLP biases, a non-default
    RoPE base, 8 heads over 4 KV heads of 16, and an untied LM head."""
    import torch

    from edgevl.exporters.lower.onnxruntime_decoder import lower_onnx
    from edgevl.exporters.onnx_export import export_decoder
    from edgevl.models.decoder import Decoder, DecoderSpec
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    torch.manual_seed(0)
    spec = DecoderSpec(hidden_dim=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=16, mlp_dim=96, vocab_size=50,
                       rope_theta=500.0, rms_eps=1e-6, attention_bias=True, mlp_bias=True, tie_embeddings=False)
    decoder = Decoder(spec).eval()
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    export_decoder(decoder, tmp_path / "decoder.onnx")
    manifest_spec = {"n_layers": 2, "n_kv_heads": 4, "head_dim": 16, "hidden_dim": 64, "vocab_size": 50,
                     "max_position": 64}
    info = lower_onnx(tmp_path / "decoder.onnx", manifest_spec, tmp_path / "lowered.onnx")
    assert info["ops"]["Add"] == 1 + 4 * 2                               # the total length + 4 biases per layer

    rng = np.random.default_rng(0)
    feeds = {"inputs_embeds": rng.standard_normal((2, 3, 64)).astype(np.float32), "past_len": np.array([5, 0])}
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{i}"] = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    with OnnxRuntimeRunner(tmp_path / "decoder.onnx") as portable, OnnxRuntimeRunner(tmp_path / "lowered.onnx") as low:
        expected = portable.infer({k: v.copy() for k, v in feeds.items()})
        got = low.infer({k: v.copy() for k, v in feeds.items()})
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, err_msg=name)


# -- answers -----------------------------------------------------------------------------------
def test_greedy_answers_are_identical_to_the_portable_decoder_on_50_held_out_scenes(lowered, tiny_bundle):
    from edgevl.bundle import load_bundle

    images, questions = held_out_scenes(50)
    expected = greedy_tokens(load_bundle(tiny_bundle), images, questions)
    assert greedy_tokens(lowered, images, questions) == expected
    assert sum(map(len, expected)) > 100


def test_in_flight_batching_with_the_lowered_decoder_gives_the_tokens_of_each_request_alone(lowered):
    """Overlapping requests of different prompt lengths (scenes, and random-token prompts with
    0-1 images) through the scheduler: rows sit at different positions in one decode step."""
    import edgevl
    from edgevl.preprocess import preprocess
    from edgevl.runtimes.sampling import SamplingParams

    rng = np.random.default_rng(11)
    images, questions = held_out_scenes(6)
    with edgevl.load(lowered.path, backend="onnxruntime", batching=True, max_batch_size=4, verbose=False) as vlm:
        engine = vlm.engine
        assert engine.runners["decoder"].path.name == "decoder_lowered.onnx"
        seq = int(engine.prompt_spec["image_seq_len"])
        requests = []
        for i, (image, question) in enumerate(zip(images, questions)):
            requests.append((engine.encode_prompt(question), preprocess(image, engine.preprocess_spec, "rgb")))
            words = rng.integers(5, engine.dec["vocab_size"], int(rng.integers(3, 30)))
            n_images = i % 2
            ids = np.concatenate([np.full(seq * n_images, engine.image_token_id), words]).astype(np.int64)
            requests.append((ids, rng.normal(size=(1, 3, 64, 64)).astype(np.float32) if n_images else None))
        params = [SamplingParams(max_new_tokens=int(n)) for n in rng.integers(6, 24, len(requests))]
        batched, alone, stats = batched_and_alone(vlm, requests, params)
    assert batched == alone
    assert stats["counters"]["completed"] == len(requests)
    assert max(stats["histograms"]["decode_batch"]) > 1                 # rows really decoded together


def test_int8_lowered_answers_match_the_portable_int8_weight_only_decoder(lowered_int8):
    """The same MatMulNBits blocks in both graphs; what can differ is MatMulNBits' int8 rounding
    of its activations (accuracy level 4), which see float inputs that differ by ~1e-6. Measured
    here: 0 of 50 answers differ (logits cosine 0.999997)."""
    import onnx
    from onnx import numpy_helper

    assert lowered_int8.precision == "int8-wo"
    images, questions = held_out_scenes(50)
    expected = greedy_tokens(portable_view(lowered_int8), images, questions)
    got = greedy_tokens(lowered_int8, images, questions)
    differ = sum(a != b for a, b in zip(got, expected))
    assert differ <= 2, f"{differ} of 50 answers differ"

    def nbits(path):
        model = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return [[inits[i] for i in n.input[1:] if i] for n in model.graph.node if n.op_type == "MatMulNBits"]

    portable = nbits(lowered_int8.path / lowered_int8.parts["decoder"]["onnx"])
    low = nbits(lowered_int8.part_file("decoder", "onnxruntime"))
    assert len(low) == len(portable) and all(
        len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)) for a, b in zip(low, portable))


# -- what is refused ---------------------------------------------------------------------------
def test_lowering_refuses_what_it_cannot_read(tiny_bundle, lowered_int8, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgevl.bundle import Bundle, load_bundle
    from edgevl.errors import ExportError, QuantizationError
    from edgevl.exporters.lower.portable_decoder import read_portable_decoder

    src = load_bundle(tiny_bundle)
    qdq = Bundle(src.path, {**copy.deepcopy(src.manifest), "precision": "int8"})
    with pytest.raises(ExportError, match="FP32 or weight-only"):
        _lower(qdq, tmp_path / "a")
    with pytest.raises(QuantizationError, match="already int8-wo"):
        _lower(lowered_int8, tmp_path / "b", bits=4)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    w = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/proj/MatMul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    with pytest.raises(ExportError, match="exported by edgevl"):
        read_portable_decoder(tmp_path / "other.onnx", src.manifest["decoder"])


def test_relowering_a_weight_only_bundle_carries_its_blocks_and_replaces_the_artefact(lowered_int8, tmp_path):
    again = _lower(lowered_int8, tmp_path / "again", check=False)
    assert again.precision == "int8-wo"
    assert again.parts["decoder"]["lowered"]["onnxruntime"]["weights"] == ["MatMulNBits8"]
    assert [r for r in again.manifest["files"] if r.startswith("onnxruntime/")] == ["onnxruntime/decoder_lowered.onnx"]
    assert (again.path / "onnxruntime/decoder_lowered.onnx").read_bytes() == \
        lowered_int8.part_file("decoder", "onnxruntime").read_bytes()


def test_requantizing_a_lowered_bundle_drops_the_lowered_decoder(lowered, tmp_path):
    """A quantized bundle derived from a lowered FP32 one must not keep the FP32 lowered graph."""
    from edgevl.exporters.quantize.derive import derived_writer

    writer = derived_writer(lowered, tmp_path / "q", ["decoder"])
    try:
        decoder = writer.manifest["parts"]["decoder"]
        assert "artifacts" not in decoder and "lowered" not in decoder
        assert not (writer.tmp / "onnxruntime").exists()
    finally:
        writer.abort()


@pytest.fixture(scope="module")
def lowered_dynamic(tiny_bundle, tmp_path_factory):
    """edgevl-tiny with the composite ``int8`` recipe's dynamic-INT8 decoder (quantize_dynamic,
    per-channel int8 weights) as the part's ONNX and its lowering beside it."""
    from edgevl.bundle import load_bundle
    from edgevl.exporters.lower.onnxruntime_decoder import LOWERED_FILE, lower_onnx
    from edgevl.exporters.quantize.composite import _dynamic
    from edgevl.exporters.quantize.derive import derived_writer

    src = load_bundle(tiny_bundle)
    work = tmp_path_factory.mktemp("dyn")
    _dynamic(src.part_file("decoder"), work / "decoder-dyn.onnx", "QInt8", per_channel=True)
    writer = derived_writer(src, work / "tiny-dyn-lowered", ["decoder"])
    writer.copy_in(work / "decoder-dyn.onnx", src.parts["decoder"]["onnx"])
    info = lower_onnx(work / "decoder-dyn.onnx", src.manifest["decoder"], writer.file(LOWERED_FILE))
    writer.manifest["parts"]["decoder"]["artifacts"] = {"onnxruntime": LOWERED_FILE}
    writer.manifest["precision"] = "int8"
    return writer.commit(), info


def test_dynamic_int8_decoder_lowers_to_dynamic_quantize_matmul_with_its_own_weights(lowered_dynamic):
    """quantize_dynamic's MatMulInteger products become DynamicQuantizeMatMul with the same int8
    weights and scales, byte for byte; logits and new K/V match the portable dynamic graph
    (both quantize activations per call, so only float rounding order differs) through
    prefill, batched decode at different positions and a cache doubling; and greedy answers on
    50 held-out scenes match."""
    import onnx
    from onnx import numpy_helper

    from edgevl.exporters.lower.onnxruntime_decoder import parity_feeds
    from edgevl.runtimes.compare import Comparator
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    bundle, info = lowered_dynamic
    assert info["weights"] == ["DynamicQuantizeMatMul8"] and "MatMulInteger" not in info["ops"]
    n_products = 4 * bundle.manifest["decoder"]["n_layers"] + 1
    assert info["ops"]["DynamicQuantizeMatMul"] == n_products

    def weights(path, op):
        model = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return sorted((inits[n.input[1]].tobytes() for n in model.graph.node if n.op_type == op))

    assert weights(bundle.path / "decoder.onnx", "MatMulInteger") == \
        weights(bundle.part_file("decoder", "onnxruntime"), "DynamicQuantizeMatMul")
    with OnnxRuntimeRunner(bundle.path / "decoder.onnx", threads=2) as portable, \
            OnnxRuntimeRunner(bundle.part_file("decoder", "onnxruntime"), threads=2) as low:
        feeds = parity_feeds(bundle, portable)
        report = Comparator(atol=float("inf"), min_cosine=0.9999).compare("decoder", portable, low, feeds)
    assert report.passed, report.summary()

    images, questions = held_out_scenes(50)
    expected = greedy_tokens(portable_view(bundle), images, questions)
    got = greedy_tokens(bundle, images, questions)
    differ = sum(a != b for a, b in zip(got, expected))
    assert differ <= 2, f"{differ} of 50 answers differ"
