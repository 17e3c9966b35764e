"""INT8 PTQ of the tiny bundle: Q/DQ really on the vision part, INT8 really executed, the report,
the accuracy budget (fail with the report, or --accept-loss)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edgevl.errors import AccuracyBudgetExceeded
from conftest import HAS_OPENVINO, needs_openvino

SMALL = dict(samples=8, decoder_prompts=4, decode_steps=2, eval_scenes=3, sensitivity=False)


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, tmp_path_factory):
    from edgevl.exporters.quantize.ptq import quantize_bundle
    from edgevl.exporters.quantize.recipes import PTQRecipe

    out = tmp_path_factory.mktemp("ptq") / "tiny-int8"
    recipe = PTQRecipe(method="percentile", accept_loss=True, **SMALL)
    return quantize_bundle(tiny_bundle, "world", out, recipe, log=lambda *a: None, progress=False)


def vision_weight_ops(path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type in ("MatMul", "Conv", "Gemm") and any(i in inits for i in n.input))


def test_vision_part_carries_qdq_and_int8_weights(int8_bundle, tiny_bundle):
    from edgevl.exporters.quantize.qdq import count_qdq

    counts = count_qdq(int8_bundle.part_file("vision"))
    n_weight_ops = vision_weight_ops(tiny_bundle / "vision.onnx")
    assert counts["int8_weights"] == n_weight_ops           # every linear/conv weight is stored as int8
    assert counts["QuantizeLinear"] >= n_weight_ops // 2 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    q = int8_bundle.manifest["quantization"]
    assert q["parts"]["vision"]["int8_weights"] == n_weight_ops
    assert q["method"] == "percentile" and q["source"] == "world:train:1" and q["samples"] == 8
    assert "embed" in q["float_parts"] and "onnxruntime" in q["versions"]
    floats = {f["op"] for f in q["parts"]["vision"]["float_nodes"]}
    assert {"LayerNormalization", "Softmax"} <= floats
    assert int8_bundle.precision == "int8"
    assert (int8_bundle.path / "calibration" / "vision.json").is_file()


def test_onnxruntime_runs_the_vision_part_on_integer_kernels(int8_bundle, tmp_path):
    """ORT's optimised graph holds integer ops, and they compute what the Q/DQ graph means (no
    saturation on non-VNNI x86: the 7-bit weight range)."""
    import onnx
    import onnxruntime as ort

    path = str(int8_bundle.part_file("vision"))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    fused = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert ops & {"QLinearMatMul", "MatMulIntegerToFloat", "QLinearConv", "DynamicQuantizeMatMul", "MatMulInteger"}
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    simulated = ort.InferenceSession(path, plain, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(0, 1, (2, 3, 64, 64)).astype(np.float32)
    a, b = fused.run(None, {"pixel_values": x})[0], simulated.run(None, {"pixel_values": x})[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.01


@needs_openvino
def test_openvino_executes_the_vision_part_in_int8(int8_bundle):
    import openvino as ov

    from edgevl.exporters.quantize.openvino_int8 import int8_executed_ops, runtime_precisions

    compiled = ov.Core().compile_model(str(int8_bundle.part_file("vision")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    executed = int8_executed_ops(compiled)
    assert any(name.split(":")[0] in ("FullyConnected", "MatMul", "Convolution") for name in executed), \
        runtime_precisions(compiled)


def test_accuracy_report_and_manifest(int8_bundle):
    report = int8_bundle.report("accuracy")
    assert int8_bundle.manifest["reports"]["accuracy"] == "accuracy.json"
    vision = report["parts"]["vision"]["onnxruntime"]["outputs"]["image_embeds"]
    assert 0.9 < vision["cosine"] <= 1.0 and vision["max_abs"] > 0
    decoder = report["parts"]["decoder"]["onnxruntime"]
    assert "logits" in decoder["outputs"] and 0 <= decoder["top1_agreement"] <= 1
    tasks = report["tasks"]
    assert tasks["n"] == 3 and tasks["metric"] == "accuracy" and tasks["split"] == "val"
    backends = ["onnxruntime"] + (["openvino"] if HAS_OPENVINO else [])
    assert sorted(tasks["backends"]) == sorted(backends)
    for result in tasks["backends"].values():
        assert set(result["quantized"]["by_task"]) == {"count", "color", "shape", "position", "caption"}
        assert result["drop_points"] == pytest.approx(100 * (result["fp32"]["accuracy"] - result["quantized"]["accuracy"]), abs=0.01)
    assert report["budget"]["metric"] == "accuracy"


def test_check_report_reproduces_the_recorded_accuracy(int8_bundle):
    from edgevl.exporters.quantize.report import check_report

    lines = []
    assert check_report(int8_bundle.path, backend="onnxruntime", log=lines.append) == 0
    assert "reproduced" in lines[0]


def test_broken_budget_fails_with_report_and_writes_nothing(tiny_bundle, tmp_path, monkeypatch):
    """The control flow, independent of how good the checkpoint is: every evaluation reports a
    5-point loss against a 1-point budget."""
    from edgevl.exporters.quantize import report as report_module
    from edgevl.exporters.quantize.ptq import quantize_bundle
    from edgevl.exporters.quantize.recipes import PTQRecipe

    monkeypatch.setattr(report_module, "loss_points", lambda task_cmp, metric: 5.0)
    out = tmp_path / "bad"
    recipe = PTQRecipe(method="minmax", budget_points=1.0, eval_backends=("onnxruntime",), **SMALL)
    with pytest.raises(AccuracyBudgetExceeded, match="no bundle was written") as info:
        quantize_bundle(tiny_bundle, "world", out, recipe, log=lambda *a: None, progress=False)
    report = info.value.report
    assert report["budget"]["passed"] is False and report["budget"]["worst_loss"] == 5.0
    assert "vision" in report["parts"] and "tasks" in report
    assert not out.exists() and not list(tmp_path.glob(".bad*"))

    accepted = quantize_bundle(tiny_bundle, "world", out, dataclasses.replace(recipe, accept_loss=True),
                               log=lambda *a: None, progress=False)
    budget = accepted.report("accuracy")["budget"]
    assert budget["passed"] is False and budget["accepted_loss"] is True


def test_sensitivity_pass_moves_nodes_to_float_until_the_budget_holds(tiny_bundle, tmp_path, monkeypatch):
    """Losses shrink as nodes move to float (scripted); the pass stops once within budget."""
    from edgevl.exporters.quantize import report as report_module
    from edgevl.exporters.quantize.ptq import quantize_bundle
    from edgevl.exporters.quantize.recipes import PTQRecipe

    scripted = iter([3.0, 2.0, 0.5, 0.0])
    monkeypatch.setattr(report_module, "loss_points", lambda task_cmp, metric: next(scripted))
    recipe = PTQRecipe(method="minmax", samples=8, decoder_prompts=2, decode_steps=1, eval_scenes=1,
                       eval_backends=("onnxruntime",), parts=("vision",), sensitivity=True, max_float_nodes=5)
    bundle = quantize_bundle(tiny_bundle, "world", tmp_path / "q", recipe, log=lambda *a: None, progress=False)
    history = bundle.report("accuracy")["sensitivity"]
    assert [h["loss"]["onnxruntime"] for h in history] == [3.0, 2.0, 0.5]
    chosen = [f for f in bundle.manifest["quantization"]["parts"]["vision"]["float_nodes"]
              if f["reason"].startswith("sensitivity")]
    assert len(chosen) == 2 and all(f["op"] in ("MatMul", "Conv", "Gemm") for f in chosen)
    assert bundle.report("accuracy")["budget"]["passed"] is True


def test_quantizing_a_quantized_bundle_is_refused(int8_bundle, tmp_path):
    from edgevl.errors import QuantizationError
    from edgevl.exporters.quantize.ptq import quantize_bundle

    with pytest.raises(QuantizationError, match="starts from an FP32 bundle"):
        quantize_bundle(int8_bundle.path, "world", tmp_path / "again", log=lambda *a: None)


def test_cli_reports_errors_without_traceback(tiny_bundle, tmp_path, capsys):
    from edgevl.cli.main import main

    code = main(["quantize", str(tiny_bundle), "--calib", str(tmp_path / "nothing"), "--out", str(tmp_path / "q")])
    assert code == 2 and "calibration source" in capsys.readouterr().err
    code = main(["quantize", str(tiny_bundle), "--out", str(tmp_path / "q")])
    assert code == 2 and "--calib" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_manifest_float_nodes_are_listed_in_info(int8_bundle):
    from edgevl.bundle import describe

    text = describe(int8_bundle)
    assert "quantized   percentile" in text and "float layers:" in text
    assert json.dumps(int8_bundle.manifest["quantization"]["float_nodes"])
