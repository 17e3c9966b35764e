"""Writing the QAT bundle through the normal export path, with PTQ's manifest conventions."""

from __future__ import annotations

from edgevl.bundle import Bundle, BundleWriter
from edgevl.exporters.quantize.recipes import QATRecipe

QAT_PARITY_ATOL = float("inf")    # integer kernels vs PyTorch fake quant differ by rounding steps: no abs bound,
QAT_MIN_COSINE = 0.99             # but a quantizer placed on the wrong tensor would break the cosine


def write_qat_bundle(vlm, fp32: Bundle, out, recipe: QATRecipe, history: list[dict], feeds: dict, force: bool,
                     log=print) -> Bundle:
    from edgevl.exporters.export import build_manifest, check_parts, sample_images
    from edgevl.exporters.onnx_export import export_decoder, export_embed, export_vision
    from edgevl.exporters.quantize.decoder_feeds import held_out_feeds
    from edgevl.exporters.quantize.derive import staged_bundle, tool_versions
    from edgevl.errors import QuantizationError
    from edgevl.exporters.quantize.ptq import backends_breaking_contract, installed_eval_backends
    from edgevl.exporters.quantize.qdq import count_qdq, fold_weight_quantizers
    from edgevl.exporters.quantize.report import REPORT_FILE, AccuracyEvaluator, budget_verdict, parts_report, summary_lines
    from edgevl.runtimes.compare import Comparator

    backends = installed_eval_backends(recipe.eval_backends)
    files = {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"}
    writer = BundleWriter(out, force=force)
    try:
        export_vision(vlm.vision, vlm.pixel_shape, writer.file(files["vision"]))
        export_embed(vlm.embed, writer.file(files["embed"]))
        export_decoder(vlm.decoder, writer.file(files["decoder"]), fuse=False)   # NNCF wraps q/k/v/gate/up
        folded = {part: fold_weight_quantizers(writer.file(files[part])) for part in ("vision", "decoder")}
        log(f"  int8 weights folded: {folded}")
        for part in ("vision", "decoder"):
            broken = backends_breaking_contract(fp32.part_file(part), writer.file(files[part]))
            if broken:
                raise QuantizationError(f"the QAT {part} part breaks the part contract: {'; '.join(broken)}")
        writer.copy_in(vlm.tokenizer_file, "tokenizer.json")
        for rel, src in vlm.extra_files.items():
            writer.copy_in(src, rel)
        writer.manifest.update(build_manifest(vlm, writer.tmp, files))
        parity = check_parts(vlm, writer.tmp, files, sample_images(3), QAT_PARITY_ATOL)
        for r in parity:
            r.min_cosine = QAT_MIN_COSINE
            log(f"  parity {r.summary()}")
            Comparator.require(r)
        writer.write_json("parity.json", {"atol": "informative (ONNX Runtime integer kernels vs PyTorch fake quant)",
                                          "parts": [r.to_dict() for r in parity]})
        writer.manifest["precision"] = "int8"
        staged = staged_bundle(writer)
        evaluator = AccuracyEvaluator(fp32, backends, recipe.eval_scenes, split=recipe.eval_split, threads=recipe.threads)
        tasks = evaluator.tasks(staged)
        held = held_out_feeds(fp32, ["vision", "decoder"], threads=recipe.threads)
        report = {"reference": {"bundle": "FP32 export of the same checkpoint (staged, not kept)", "precision": "fp32",
                                "backend": "onnxruntime"},
                  "held_out": {"source": "world:test:12345", "feeds": {p: len(f) for p, f in held.items()}},
                  "parts": parts_report(fp32, staged, ["vision", "decoder"], held, backends, recipe.threads),
                  "tasks": tasks,
                  "budget": budget_verdict(evaluator.losses(tasks), float("inf"), evaluator.metric, False),
                  "training": {"steps": len(history), "first_loss": history[0]["loss"] if history else None,
                               "last_loss": history[-1]["loss"] if history else None}}
        writer.write_json(REPORT_FILE, report)
        writer.write_json("qat_training.json", {"recipe": recipe.to_dict(), "steps": history})
        writer.manifest["reports"] = {"parity": "parity.json", "accuracy": REPORT_FILE, "training": "qat_training.json"}
        parts = {}
        for part in ("vision", "decoder"):
            c = count_qdq(writer.tmp / files[part])
            parts[part] = {"quantized_nodes": len(c["int8_ops"]), "QuantizeLinear": c["QuantizeLinear"],
                           "DequantizeLinear": c["DequantizeLinear"], "int8_weights": c["int8_weights"],
                           "float_nodes": []}
        writer.manifest["quantization"] = {
            "scheme": "int8 Q/DQ from quantization-aware training", "method": "qat",
            "tool": "nncf.quantize (torch, ModelType.TRANSFORMER) + fine-tuning + nncf.strip(NATIVE)",
            "weights": "int8 symmetric per-channel, 7-bit range (NNCF overflow_fix)",
            "activations": "int8 per-tensor (NNCF's choice of signedness per quantizer)",
            "source": f"world:train:{recipe.seed + 1} (calibration), world:train (fine-tuning)",
            "samples": recipe.calib_samples, "decoder_feeds": len(feeds["decoder"]), "steps": len(history),
            "parts": parts, "float_parts": ["embed"],
            "float_nodes": ["nncf TRANSFORMER preset: norms, softmax and residual adds are not quantized",
                            "decoder attention matmuls (see qat.fake_quantize: NNCF hook names vs traced shape math)",
                            "decoder LM head (OpenVINO 2026.4 mis-shapes an INT8 LM head's logits)"],
            "artifacts": {"onnxruntime": "parts.*.onnx (Q/DQ)", "openvino": "parts.*.onnx (Q/DQ)",
                          "tensorrt": "parts.*.onnx (Q/DQ, explicit quantization)"},
            "recipe": recipe.to_dict(), "versions": tool_versions()}
        for line in summary_lines(report):
            log(line)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
