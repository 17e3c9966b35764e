"""`--precision int8 / int4`: each part's recipe chosen by timing candidates, recorded in the manifest."""

from __future__ import annotations

import pytest

from conftest import needs_openvino, needs_torch
from edgevl.errors import ConfigError


def _cand(name, ms, cosine):
    from pathlib import Path

    from edgevl.exporters.quantize.composite import Candidate

    c = Candidate(name, Path(name), "int8", name)
    c.timing, c.cosine = {"median_ms": ms}, cosine
    return c


def test_ranking_keeps_the_gate_and_orders_by_measured_time():
    from edgevl.exporters.quantize.composite import ranked

    cands = [_cand("fp32", 10.0, 1.0), _cand("fast-but-wrong", 3.0, 0.95), _cand("dyn", 6.0, 0.999),
             _cand("dyn-pc", 5.0, 0.9991)]
    assert [c.name for c in ranked(cands, 0.99)] == ["dyn-pc", "dyn", "fp32"]
    assert [c.name for c in ranked(cands, 0.9999)] == ["fp32"]


def test_bad_recipes_are_refused():
    from edgevl.exporters.build import check_request
    from edgevl.exporters.quantize.composite import CompositeRecipe

    with pytest.raises(ConfigError, match="bits must be 4 or 8"):
        CompositeRecipe(decoder_bits=3).validate("onnxruntime")
    with pytest.raises(ConfigError, match="unknown vision candidate"):
        CompositeRecipe(vision_candidates=("nncf-int8",)).validate("onnxruntime")
    with pytest.raises(ConfigError, match="int8-qdq"):
        CompositeRecipe().validate("tensorrt")
    with pytest.raises(ConfigError, match="int4 is not available for --target tensorrt"):
        check_request("tensorrt", "int4", __import__("pathlib").Path("/nonexistent/x"), False)


@pytest.fixture(scope="module")
def ort_int8(tiny_bundle, tmp_path_factory):
    from edgevl.exporters.quantize.composite import CompositeRecipe, composite_bundle

    out = tmp_path_factory.mktemp("composite") / "tiny-ort-int8"
    return composite_bundle(tiny_bundle, out, "onnxruntime", CompositeRecipe(rounds=3, held_out_images=2),
                            eval_scenes=40, log=lambda *a: None)


@needs_torch
def test_int8_onnxruntime_records_each_part_and_keeps_the_fastest_gated_candidate(ort_int8):
    m = ort_int8.manifest
    assert m["precision"] == "int8"
    q = m["quantization"]
    for part in ("vision", "decoder"):
        sel = q["selection"][part]
        gated = {k: c for k, c in sel["candidates"].items() if c["cosine"] >= sel["min_cosine"]}
        assert sel["chosen"] == min(gated, key=lambda k: gated[k]["median_ms"])
        assert m["parts"][part]["precision"] == sel["candidates"][sel["chosen"]]["precision"]
        assert q["parts"][part]["method"] == m["parts"][part]["method"]
        assert sel["measured_on"]["cores"] >= 1 and all(c["runs"] >= 3 for c in sel["candidates"].values())
    assert set(q["selection"]["vision"]["candidates"]) == {"fp32", "dynamic-int8", "dynamic-int8-per-channel",
                                                            "dynamic-uint8", "static-qdq"}
    assert set(q["selection"]["decoder"]["candidates"]) == {"weight-only", "fp32", "weight-only-lowered",
                                                             "fp32-lowered", "dynamic-int8", "dynamic-int8-lowered"}
    for c in q["selection"]["decoder"]["candidates"].values():      # ranked by a whole answer's cost
        assert c["median_ms"] == pytest.approx(c["prefill_ms"] + 32 * c["step_ms"], abs=0.02)
    import onnx

    graph_ops = {n.op_type for n in onnx.load(str(ort_int8.part_file("decoder"))).graph.node}
    chosen = q["selection"]["decoder"]["chosen"]
    assert ("MatMulNBits" in graph_ops) == chosen.startswith("weight-only")
    assert ("DynamicQuantizeLinear" in graph_ops or "MatMulInteger" in graph_ops) == chosen.startswith("dynamic-int8")
    assert ("MatMul" in graph_ops and not graph_ops & {"MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear"}) == \
        chosen.startswith("fp32")
    lowered = ort_int8.part_file("decoder", "onnxruntime")
    assert (lowered != ort_int8.part_file("decoder")) == chosen.endswith("-lowered")
    if chosen.endswith("-lowered"):
        ops = {n.op_type for n in onnx.load(str(lowered)).graph.node}
        assert "GroupQueryAttention" in ops and m["parts"]["decoder"]["lowered"]["onnxruntime"]["nodes"] > 0
        # the KV cache's type was measured too: int8 only when within the gate and a step costs less,
        # summed over the answer's own position and a long cache
        kv = q["decoder"]["tools"]["kv_cache"]
        rule = kv["cosine"] >= q["selection"]["decoder"]["min_cosine"] and \
            sum(t["int8"] for t in kv["step_ms"].values()) < sum(t["float32"] for t in kv["step_ms"].values())
        assert kv["kept"] == rule and kv["calibration_positions"] > 0
        assert (m["parts"]["decoder"].get("kv_cache") == {"onnxruntime": "int8"}) == kv["kept"]
        cache_types = {i.type.tensor_type.elem_type for i in onnx.load(str(lowered), load_external_data=False).graph.input
                       if i.name.startswith("past_key.")}
        assert cache_types == {onnx.TensorProto.INT8 if kv["kept"] else onnx.TensorProto.FLOAT}


@needs_torch
def test_int8_onnxruntime_keeps_accuracy_and_answers(ort_int8):
    import json

    import edgevl
    from edgevl.data.tasks import scene_qas
    from edgevl.data.world import make_scene

    report = json.loads((ort_int8.path / ort_int8.manifest["reports"]["accuracy"]).read_text())
    assert report["budget"]["passed"] and report["gate"]["passed"]
    assert report["tasks"]["backends"]["onnxruntime"]["drop_points"] <= 1.0
    scene = make_scene("test", 7)
    qas = scene_qas(scene)
    with edgevl.load(ort_int8.path, backend="onnxruntime", verbose=False) as vlm:
        answers = vlm.answer([scene.image()] * len(qas), [qa.question for qa in qas])
    assert answers == [qa.answer for qa in qas]


@needs_torch
@pytest.mark.slow
def test_int4_onnxruntime_times_two_block_sizes_and_records_the_chosen_ones_recipe(tiny_bundle, tmp_path):
    import onnx

    from edgevl.exporters.quantize.composite import CompositeRecipe, composite_bundle

    recipe = CompositeRecipe(decoder_bits=4, rounds=2, held_out_images=2, vision_candidates=("fp32",))
    bundle = composite_bundle(tiny_bundle, tmp_path / "ort-int4", "onnxruntime", recipe, eval_scenes=10,
                              accept_loss=True, log=lambda *a: None)
    q = bundle.manifest["quantization"]
    sel = q["selection"]["decoder"]
    four_bit = {"weight-only", "weight-only-lowered", "weight-only-b32", "weight-only-b32-lowered"}
    assert four_bit | {"dynamic-int8", "dynamic-int8-lowered"} <= set(sel["candidates"])
    gated = {k: c for k, c in sel["candidates"].items() if k in four_bit and c["cosine"] >= sel["min_cosine"]}
    best = min(gated, key=lambda k: gated[k]["median_ms"])
    block = 32 if "b32" in best else 128
    assert q["decoder"]["recipe"]["block_size"] == block
    blocks = {a.i for n in onnx.load(str(bundle.part_file("decoder", "onnxruntime"))).graph.node
              if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {block} and f"blocks of {block}," in bundle.manifest["parts"]["decoder"]["method"]

    # the int8 prefill graph is kept only when it keeps the int8 gate and saves >= 5% of an answer
    pre, cand = sel["candidates"]["dynamic-int8-lowered"], sel["candidates"][best]
    cost = pre["prefill_ms"] + 32 * cand["step_ms"]
    keep = best.endswith("-lowered") and pre["cosine"] >= 0.99 and cost <= 0.95 * cand["median_ms"]
    prefill = bundle.prefill_file("decoder", "onnxruntime")
    assert (prefill is not None) == keep == (sel["chosen"] == best + "+int8-prefill")
    assert sel["chosen"] == (best + "+int8-prefill" if keep else best)
    if keep:
        graph = onnx.load(str(prefill)).graph
        head = next(n for n in graph.node if "logits" in n.output)
        ops = {n.op_type for n in graph.node if n is not head}
        assert "DynamicQuantizeMatMul" in ops and "MatMulNBits" not in ops
        shared = q["decoder"]["tools"]["prefill_lm_head"]["kept"]
        assert head.op_type == ("MatMulNBits" if shared else "DynamicQuantizeMatMul")
        if not shared:
            assert sel["candidates"][sel["chosen"]]["median_ms"] == pytest.approx(cost, abs=0.02)


@needs_torch
@pytest.mark.slow
def test_int4_with_an_int8_prefill_graph_shares_one_int8_kv_cache(tiny_bundle, tmp_path, monkeypatch):
    """The 4-bit decode graph and the int8 prefill graph write one cache: both get the same
    int8 KV scales, and answers through both keep the accuracy budget."""
    import json

    import onnx

    from onnx import numpy_helper

    from edgevl.exporters.quantize import composite
    from edgevl.exporters.lower.kv_int8 import read_kv_scales

    monkeypatch.setattr(composite, "PREFILL_GAIN", -1.0)          # keep the prefill graph whatever it saves
    recipe = composite.CompositeRecipe(decoder_bits=4, rounds=2, held_out_images=2, vision_candidates=("fp32",),
                                       kv_cache="int8")
    bundle = composite.composite_bundle(tiny_bundle, tmp_path / "ort-int4-kv8", "onnxruntime", recipe,
                                        eval_scenes=20, log=lambda *a: None)
    prefill, decode = bundle.prefill_file("decoder", "onnxruntime"), bundle.part_file("decoder", "onnxruntime")
    assert prefill is not None and bundle.kv_dtype("onnxruntime") == "int8"
    for path in (prefill, decode):
        graph = onnx.load(str(path), load_external_data=False).graph
        assert {i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past_")
                and i.name != "past_len"} == {onnx.TensorProto.INT8}
    a, b = read_kv_scales(prefill), read_kv_scales(decode)
    assert all((a[k] == b[k]).all() for k in ("key", "value"))
    # the prompt graph's logits come from the 4-bit graph's LM head (one vocabulary-sized matrix, not two)
    swap = bundle.manifest["quantization"]["decoder"]["tools"]["prefill_lm_head"]
    assert swap["kept"] and swap["cosine"] >= swap["gate"] and swap["bytes_dropped"] > 0
    graphs = [onnx.load(str(p)).graph for p in (prefill, decode)]
    heads = [next(n for n in g.node if "logits" in n.output) for g in graphs]
    assert [h.op_type for h in heads] == ["MatMulNBits", "MatMulNBits"]
    weights = [{t.name: numpy_helper.to_array(t) for t in g.initializer} for g in graphs]
    assert all((weights[0][x] == weights[1][y]).all() for x, y in zip(heads[0].input[1:], heads[1].input[1:]) if y)
    assert not any(t.dims[-1] == bundle.manifest["decoder"]["vocab_size"] for t in graphs[0].initializer
                   if t.data_type == onnx.TensorProto.INT8)
    report = json.loads((bundle.path / bundle.manifest["reports"]["accuracy"]).read_text())
    assert report["budget"]["passed"] and report["tasks"]["backends"]["onnxruntime"]["drop_points"] <= 1.0


@needs_torch
@needs_openvino
@pytest.mark.slow
def test_int4_openvino_writes_ir_for_the_chosen_parts(tiny_bundle, tmp_path):
    import edgevl
    from edgevl.exporters.quantize.composite import CompositeRecipe, composite_bundle

    recipe = CompositeRecipe(decoder_bits=4, rounds=2, held_out_images=2, vision_candidates=("fp32", "nncf-int8-weights"))
    bundle = composite_bundle(tiny_bundle, tmp_path / "ov-int4", "openvino", recipe, eval_scenes=20,
                              accept_loss=True, log=lambda *a: None)
    assert bundle.precision == "int4"
    assert bundle.part_file("vision", "openvino").suffix == ".xml"
    assert bundle.part_file("decoder", "openvino").suffix == ".xml"
    assert "INT4" in bundle.manifest["parts"]["decoder"]["method"]
    assert set(bundle.manifest["quantization"]["selection"]["vision"]["candidates"]) == {"fp32", "nncf-int8-weights"}
    with edgevl.load(bundle.path, backend="openvino", verbose=False) as vlm:
        from edgevl.data.world import make_scene

        assert isinstance(vlm.answer([make_scene("test", 1).image()], ["what is in the picture?"])[0], str)


@needs_torch
def test_fp32_export_is_cached_by_checkpoint_content(tmp_path, monkeypatch):
    from edgevl.exporters.export_cache import cached_export

    monkeypatch.setenv("EDGEVL_CACHE", str(tmp_path / "cache"))
    logs = []
    first = cached_export("edgevl-tiny", tmp_path / "unused", log=logs.append)
    assert first.path.parent == tmp_path / "cache" / "exports" and not (tmp_path / "unused").exists()
    logs.clear()
    again = cached_export("edgevl-tiny", tmp_path / "unused", log=logs.append)
    assert again.path == first.path and any("reusing" in str(line) for line in logs)
    (first.path / first.manifest["parts"]["embed"]["onnx"]).write_bytes(b"tampered")
    logs.clear()
    redone = cached_export("edgevl-tiny", tmp_path / "unused", log=logs.append)
    assert any("failed verification" in str(line) for line in logs) and redone.path == first.path
    monkeypatch.setenv("EDGEVL_EXPORT_CACHE", "0")
    off = cached_export("edgevl-tiny", tmp_path / "off", log=lambda *a: None)
    assert off.path == tmp_path / "off"
