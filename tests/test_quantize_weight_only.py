"""Decoder weight-only INT8 / INT4: MatMulNBits for ONNX Runtime, NNCF-compressed IR for OpenVINO."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import HAS_OPENVINO, needs_openvino


@pytest.fixture(scope="module", params=[8, 4], ids=["int8-wo", "int4-wo"])
def wo_bundle(request, tiny_bundle, tmp_path_factory):
    from edgevl.exporters.quantize.recipes import WeightOnlyRecipe
    from edgevl.exporters.quantize.weight_only import weight_only_bundle

    out = tmp_path_factory.mktemp("wo") / f"tiny-int{request.param}-wo"
    recipe = WeightOnlyRecipe(bits=request.param, block_size=32)
    return weight_only_bundle(tiny_bundle, out, recipe, eval_scenes=2, accept_loss=True, log=lambda *a: None)


def test_decoder_matmuls_become_matmulnbits(wo_bundle, tiny_bundle):
    import onnx

    bits = int(wo_bundle.precision[3])
    fp32 = onnx.load(str(tiny_bundle / "decoder.onnx"))
    inits = {t.name for t in fp32.graph.initializer}
    weight_matmuls = sum(n.op_type == "MatMul" and n.input[1] in inits for n in fp32.graph.node)
    model = onnx.load(str(wo_bundle.part_file("decoder")))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == weight_matmuls and all(n.domain == "com.microsoft" for n in nbits)
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["bits"] == bits and attrs["block_size"] == 32
    q = wo_bundle.manifest["quantization"]
    assert q["parts"]["decoder"]["onnxruntime"]["MatMulNBits"] == weight_matmuls
    assert wo_bundle.precision == f"int{bits}-wo"
    assert (wo_bundle.path / "decoder.onnx").stat().st_size < (tiny_bundle / "decoder.onnx").stat().st_size / (3 if bits == 8 else 5)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_weight_only_bundle_answers_with_finite_logits(wo_bundle, backend):
    if backend == "openvino" and not HAS_OPENVINO:
        pytest.skip("needs OpenVINO: pip install edgevl[openvino]")
    import edgevl
    from edgevl.data.world import make_scene
    from edgevl.exporters.quantize.decoder_feeds import held_out_feeds
    from edgevl.runtimes.registry import get_runner_class

    if backend == "openvino":
        assert wo_bundle.part_file("decoder", "openvino").suffix == ".xml"
    runner = get_runner_class(backend)(wo_bundle.part_file("decoder", backend), precision=wo_bundle.precision)
    feeds = held_out_feeds(wo_bundle, ["decoder"], n_images=1, decode_steps=1)["decoder"]
    for f in feeds:
        assert np.isfinite(runner.infer(f)["logits"]).all()
    runner.close()
    with edgevl.load(wo_bundle.path, backend=backend, verbose=False) as vlm:
        scene = make_scene("test", 0)
        answers = vlm.answer([scene.image()] * 2, ["how many shapes are there?", "describe the image."])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@needs_openvino
def test_openvino_artifact_is_weight_compressed(wo_bundle):
    import openvino as ov

    model = ov.Core().read_model(str(wo_bundle.part_file("decoder", "openvino")))
    low = {"i8", "u8", "i4", "u4"}
    compressed = [op for op in model.get_ops() if op.get_type_name() == "Constant"
                  and op.get_output_element_type(0).get_type_name() in low]
    assert compressed, "no low-bit constants in the NNCF IR"
    assert wo_bundle.manifest["quantization"]["artifacts"]["openvino"].startswith("parts.decoder.artifacts.openvino")


def test_report_covers_the_decoder_and_tasks(wo_bundle):
    report = wo_bundle.report("accuracy")
    logits = report["parts"]["decoder"]["onnxruntime"]["outputs"]["logits"]
    assert logits["cosine"] > 0.9
    assert report["tasks"]["n"] == 2 and "onnxruntime" in report["tasks"]["backends"]


def test_bad_recipe_is_refused():
    from edgevl.errors import ConfigError
    from edgevl.exporters.quantize.recipes import WeightOnlyRecipe

    with pytest.raises(ConfigError, match="bits must be 4 or 8"):
        WeightOnlyRecipe(bits=3).validate()
    with pytest.raises(ConfigError, match="power of two"):
        WeightOnlyRecipe(block_size=24).validate()


def test_block_size_defaults_to_128_for_onnxruntime_only_bundles(tmp_path):
    """ONNX Runtime's MatMulNBits pads a partial last block (edgevl-tiny's widths are 192 and 768),
    so ORT-only bundles get the faster blocks of 128; NNCF's groups must divide every width."""
    import json

    from edgevl.exporters.build import build_bundle
    from edgevl.exporters.quantize.recipes import default_block_size

    assert default_block_size(("onnxruntime",)) == 128
    assert default_block_size(("onnxruntime", "openvino")) == 32
    bundle = build_bundle("edgevl-tiny", "onnxruntime", "int4-wo", tmp_path / "int4", log=lambda *a: None,
                          progress=False, eval_scenes=50)
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    assert manifest["quantization"]["recipe"]["block_size"] == 128
    report = json.loads((bundle.path / "accuracy.json").read_text())
    assert report["tasks"]["backends"]["onnxruntime"]["drop_points"] <= 1.0
