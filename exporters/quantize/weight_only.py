"""Decoder weight-only INT8 / INT4 (block-wise): decode on edge devices is memory-bound, so
shrinking the weights read per token is what speeds it up; activations stay float.

Per backend, the tool made for it:

- ONNX Runtime: ``MatMulNBitsQuantizer`` (onnxruntime.quantization.matmul_nbits_quantizer,
  ORT 1.31: bits 2/4/8, symmetric blocks of ``block_size`` input channels) replaces each MatMul
  with a constant weight by ``com.microsoft.MatMulNBits``. That ONNX is the part's ``onnx``.
- OpenVINO: ``nncf.compress_weights`` on the OpenVINO model (INT8_SYM per output channel, or
  INT4_SYM with ``group_size`` = block size; NNCF keeps the embedding-like first/last layers in
  int8 in INT4 mode, its ``backup_mode``), saved as IR: ``parts.decoder.artifacts.openvino``.
  OpenVINO 2026.4 does read ORT's MatMulNBits too (its ONNX frontend turns it into a
  decompression subgraph; checked on edgevl-tiny), but NNCF's IR is OpenVINO's native form and
  what its CPU plugin's compressed-weight kernels are tuned for.

The manifest's ``quantization.artifacts`` says which file is for which backend.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgevl.bundle import Bundle
from edgevl.errors import AccuracyBudgetExceeded, QuantizationError
from edgevl.exporters.quantize.qdq import clamp_ir_version, has_external_data, quiet
from edgevl.exporters.quantize.recipes import WeightOnlyRecipe

OPENVINO_DIR = "openvino"


def matmul_nbits(src: Path, out: Path, recipe: WeightOnlyRecipe) -> dict:
    """ORT weight-only: MatMul(x, W const) -> MatMulNBits with ``recipe.bits``-bit blocks."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgevl.exporters.quantize.float_rules import lm_head_node

    model = onnx.load(str(src))
    head = lm_head_node(model)
    exclude = [head] if head and not recipe.include_lm_head else []
    with quiet():
        quantizer = MatMulNBitsQuantizer(model, bits=recipe.bits, block_size=recipe.block_size,
                                         is_symmetric=recipe.symmetric, accuracy_level=recipe.accuracy_level,
                                         nodes_to_exclude=exclude, quant_format=QuantFormat.QOperator,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
    quantizer.model.save_model_to_file(str(out), has_external_data(src))
    clamp_ir_version(out)
    nodes = onnx.load(str(out), load_external_data=False).graph.node
    n_nbits = sum(n.op_type == "MatMulNBits" for n in nodes)
    if n_nbits == 0:
        raise QuantizationError(f"{src.name}: no MatMul with a constant weight was found to quantize weight-only")
    return {"MatMulNBits": n_nbits, "float_matmuls": sum(n.op_type == "MatMul" for n in nodes),
            "excluded": exclude}


def nncf_compress_openvino(src: Path, out_xml: Path, recipe: WeightOnlyRecipe) -> dict:
    """OpenVINO weight-only: nncf.compress_weights on the OpenVINO model, saved as IR."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(src))
    if recipe.bits == 8:
        mode, kwargs = nncf.CompressWeightsMode.INT8_SYM if recipe.symmetric else nncf.CompressWeightsMode.INT8_ASYM, {}
    else:
        mode = nncf.CompressWeightsMode.INT4_SYM if recipe.symmetric else nncf.CompressWeightsMode.INT4_ASYM
        kwargs = {"group_size": recipe.block_size, "ratio": 1.0}
    with quiet():
        compressed = nncf.compress_weights(model, mode=mode, **kwargs)
    ov.save_model(compressed, str(out_xml), compress_to_fp16=False)
    return {"mode": str(mode.value), **{k: v for k, v in kwargs.items()}, "tool": "nncf.compress_weights"}


def weight_only_bundle(bundle, out, recipe: WeightOnlyRecipe = WeightOnlyRecipe(), force: bool = False,
                       budget_points: float = 1.0, accept_loss: bool = False, eval_scenes: int = 200,
                       eval_split: str = "val", threads: int | None = None, log=print) -> Bundle:
    """Write a weight-only bundle (precision ``int8-wo`` / ``int4-wo``) with its accuracy report."""
    from edgevl.exporters.quantize.decoder_feeds import held_out_feeds
    from edgevl.exporters.quantize.derive import as_bundle, derived_writer, require_fp32, staged_bundle, tool_versions
    from edgevl.exporters.quantize.ptq import installed_eval_backends
    from edgevl.exporters.quantize.report import (REPORT_FILE, AccuracyEvaluator, budget_verdict, parts_report,
                                                  summary_lines)
    from edgevl.runtimes.registry import is_installed

    recipe.validate()
    t0 = time.perf_counter()
    src = as_bundle(bundle)
    require_fp32(src, "weight-only quantization")
    if "decoder" not in src.parts:
        raise QuantizationError(f"{src.path} has no decoder part; weight-only quantization is for the decoder")
    backends = installed_eval_backends(recipe.backends)
    log(f"weight-only: {src.path} -> {out} ({recipe.precision}, block {recipe.block_size})")
    writer = derived_writer(src, out, ["decoder"], force=force)
    try:
        rel = src.parts["decoder"]["onnx"]
        ort_info = matmul_nbits(src.part_file("decoder"), writer.file(rel), recipe)
        log(f"  onnxruntime: {ort_info['MatMulNBits']} MatMulNBits ({recipe.bits}-bit), "
            f"{ort_info['float_matmuls']} MatMuls stay float (activation x activation)")
        artifacts = {"onnxruntime": f"parts.decoder.onnx ({rel}: com.microsoft.MatMulNBits)"}
        ov_info = None
        if "openvino" in recipe.backends and is_installed("openvino"):
            ir = f"{OPENVINO_DIR}/decoder.xml"
            ov_info = nncf_compress_openvino(src.part_file("decoder"), writer.file(ir), recipe)
            writer.manifest["parts"]["decoder"]["artifacts"] = {"openvino": ir}
            artifacts["openvino"] = f"parts.decoder.artifacts.openvino ({ir}: NNCF {ov_info['mode']})"
            log(f"  openvino: {ir} ({ov_info['mode']})")
        writer.manifest["precision"] = recipe.precision
        staged = staged_bundle(writer)
        evaluator = AccuracyEvaluator.for_bundle(src, backends, eval_scenes, eval_split, 0, threads, log=log)
        tasks = evaluator.tasks(staged)
        verdict = budget_verdict(evaluator.losses(tasks), budget_points, evaluator.metric, accept_loss)
        held = held_out_feeds(src, ["decoder"], threads=threads)
        report = {"reference": {"bundle": str(src.path), "precision": "fp32", "backend": "onnxruntime"},
                  "held_out": {"source": "world:test:12345", "feeds": {p: len(f) for p, f in held.items()}},
                  "parts": parts_report(src, staged, ["decoder"], held, backends, threads),
                  "tasks": tasks, "budget": verdict}
        writer.write_json(REPORT_FILE, report)
        writer.manifest.setdefault("reports", {})["accuracy"] = REPORT_FILE
        writer.manifest["quantization"] = {
            "scheme": f"weight-only int{recipe.bits}, block-wise", "method": "rtn (round to nearest)",
            "parts": {"decoder": {"onnxruntime": ort_info, **({"openvino": ov_info} if ov_info else {})}},
            "float_parts": [p for p in src.parts if p != "decoder"], "float_nodes": [], "activations": "float",
            "artifacts": artifacts, "recipe": recipe.to_dict(), "versions": tool_versions()}
        for line in summary_lines(report):
            log(line)
        if not verdict["passed"] and not accept_loss:
            raise AccuracyBudgetExceeded(
                f"{recipe.precision} loses {verdict['worst_loss']:.2f} points of {verdict['metric']} vs FP32 (budget "
                f"{budget_points}; per backend {verdict['loss']}); no bundle was written. Try a smaller block size, "
                "int8-wo, or --accept-loss", report)
        result = writer.commit()
    except BaseException:
        writer.abort()
        raise
    log(f"weight-only: wrote {result.path} in {time.perf_counter() - t0:.1f} s")
    return result
