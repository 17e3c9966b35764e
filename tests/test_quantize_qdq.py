"""Q/DQ quantization of a tiny onnx.helper graph: node counts, int8 weights, what stays float."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgevl.exporters.quantize import qdq  # noqa: E402
from edgevl.exporters.quantize.float_rules import lm_head_node, rule_float_nodes  # noqa: E402

OPS = ("MatMul", "Gemm", "Conv")


def tiny_graph(path, dim=16, vocab=12):
    """x -> MatMul(W1) -> Relu -> MatMul(W2) -> LayerNorm -> MatMul(head) -> logits; + a Softmax output."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (dim, dim)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.2, (dim, dim)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.normal(0, 0.2, (dim, vocab)).astype(np.float32), "Whead"),
             numpy_helper.from_array(np.ones(dim, np.float32), "ln_scale"),
             numpy_helper.from_array(np.zeros(dim, np.float32), "ln_bias")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="fc2"),
             helper.make_node("LayerNormalization", ["h2", "ln_scale", "ln_bias"], ["n"], name="norm", axis=-1),
             helper.make_node("MatMul", ["n", "Whead"], ["logits"], name="lm_head"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", vocab]),
                               helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8                      # ONNX Runtime 1.31 rejects onnx 1.23's default IR 14
    onnx.save(model, str(path))
    return path


def feeds(n=16, dim=16):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(0, 1, (2, dim)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_qdq_counts_and_int8_weights(tmp_path, method):
    src = tiny_graph(tmp_path / "tiny.onnx")
    cache = qdq.calibrate(src, feeds(), tmp_path / "cal.json", method, OPS)
    out = qdq.quantize(src, tmp_path / "q.onnx", cache, method, OPS)
    model = onnx.load(str(out))
    counts = qdq.count_qdq(model)
    # activations: x, relu out, norm out (3 Q + 3 DQ); weights: W1, W2, Whead stored int8 (3 DQ)
    assert counts["QuantizeLinear"] == 3 and counts["DequantizeLinear"] == 6
    assert counts["int8_weights"] == 3 and counts["int8_ops"] == ["fc1", "fc2", "lm_head"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        zero = inits.get(node.input[2]) if len(node.input) > 2 else None
        assert zero is None or not zero.any()                          # symmetric: zero points 0
        scale = inits[node.input[1]]
        if inits.get(node.input[0]) is not None and inits[node.input[0]].ndim == 2:
            assert scale.shape == (inits[node.input[0]].shape[1],)        # per output channel
            assert np.abs(inits[node.input[0]]).max() <= 64                # 7-bit range (reduce_range)
    norm_inputs = next(n for n in model.graph.node if n.name == "norm").input
    assert not any("DequantizeLinear" in i or i.endswith("_DequantizeLinear_Output") for i in norm_inputs)
    assert model.ir_version <= qdq.MAX_IR_VERSION


def test_excluded_node_stays_float_and_outputs_stay_close(tmp_path):
    import onnxruntime as ort

    src = tiny_graph(tmp_path / "tiny.onnx")
    cache = qdq.calibrate(src, feeds(), tmp_path / "cal.json", "minmax", OPS)
    out = qdq.quantize(src, tmp_path / "q.onnx", cache, "minmax", OPS, exclude=["lm_head"])
    assert qdq.count_qdq(out)["int8_ops"] == ["fc1", "fc2"]
    x = feeds(1)[0]
    ref = ort.InferenceSession(str(src)).run(["logits"], x)[0]
    got = ort.InferenceSession(str(out)).run(["logits"], x)[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.99


def test_float_rules_find_norms_softmax_and_the_lm_head(tmp_path):
    model = onnx.load(str(tiny_graph(tmp_path / "tiny.onnx")))
    assert lm_head_node(model) == "lm_head"
    rules = {f.name: f.reason for f in rule_float_nodes(model, extra_patterns=("fc2",), lm_head_float=True)}
    assert set(rules) == {"norm", "softmax", "fc2", "lm_head"}
    assert "norm" in rules["norm"] and "softmax" in rules["softmax"]


def test_calibration_with_no_feeds_is_refused(tmp_path):
    from edgevl.errors import QuantizationError

    with pytest.raises(QuantizationError, match="no calibration feeds"):
        qdq.calibrate(tiny_graph(tmp_path / "tiny.onnx"), [], tmp_path / "c.json", "minmax", OPS)


def test_entropy_differs_from_minmax(tmp_path):
    """quantize_static's own entropy defaults collapse to min-max; ours must not."""
    import json

    src = tiny_graph(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(2)
    heavy = [{"x": (rng.standard_t(2, (8, 16))).astype(np.float32)} for _ in range(16)]   # heavy tails
    ranges = {}
    for method in ("minmax", "entropy"):
        qdq.calibrate(src, heavy, tmp_path / f"{method}.json", method, OPS)
        ranges[method] = json.loads((tmp_path / f"{method}.json").read_text())
    assert json.dumps(ranges["minmax"]["data"]["x"]) != json.dumps(ranges["entropy"]["data"]["x"])


def test_attention_inputs_keep_their_full_range_under_entropy(tmp_path):
    """Softmax probabilities feeding a MatMul are not clipped by the KL search."""
    import json

    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(0, 1, (8, 8)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="scores"),
             helper.make_node("Softmax", ["h"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "x"], ["y"], name="probs_x_values")]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "attn.onnx"))
    data = [{"x": (2 * rng.standard_t(3, (2, 8, 8))).astype(np.float32)} for _ in range(8)]
    cache = qdq.calibrate(tmp_path / "attn.onnx", data, tmp_path / "c.json", "entropy", OPS)
    before = json.loads(cache.read_text())["data"]["p"]["highest"]["data"]
    changed = qdq.keep_full_range_for_attention(tmp_path / "attn.onnx", cache)
    after = json.loads(cache.read_text())["data"]["p"]["highest"]["data"]
    assert set(changed) == {"p", "x"}
    assert after >= before and after >= 0.99          # the largest probabilities stay representable


def test_uint8_activations_fuse_every_weight_matmul_in_onnxruntime(tmp_path):
    """One activation feeding three projections (q/k/v after a norm): with uint8 activations
    ONNX Runtime's optimised graph runs all three on integer kernels."""
    import onnxruntime as ort

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(0, 0.2, (16, 16)).astype(np.float32), f"W{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"], name=f"proj{i}") for i in range(3)]
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [4, 16]) for i in range(3)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "qkv.onnx"))
    data = [{"x": rng.normal(0, 1, (4, 16)).astype(np.float32)} for _ in range(4)]
    cache = qdq.calibrate(tmp_path / "qkv.onnx", data, tmp_path / "c.json", "minmax", OPS)
    out = qdq.quantize(tmp_path / "qkv.onnx", tmp_path / "q.onnx", cache, "minmax", OPS, activations="uint8")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("MatMul") == 0 and ops.count("MatMulIntegerToFloat") == 3, ops
    ref = ort.InferenceSession(str(tmp_path / "qkv.onnx")).run(None, data[0])
    got = session.run(None, data[0])
    assert all(np.abs(r - g).max() < 0.05 * np.abs(r).max() for r, g in zip(ref, got))
