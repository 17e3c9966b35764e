"""`edgevl quantize`: an FP32 bundle -> an INT8 Q/DQ bundle, within an accuracy budget.

Steps: calibration feeds per part (vision: the source's images through the bundle's
preprocessing; decoder: real prompts with real image embeddings, prefill and decode steps with
real KV caches, see decoder_feeds.py) -> one range calibration per part (ONNX Runtime, cached
in the bundle under ``calibration/``) -> Q/DQ per part with the float rule (float_rules.py) ->
the LM head rule -> accuracy vs FP32 on held-out scenes on every installed backend -> if the
budget is broken, the sensitivity pass keeps the worst nodes in float -> accuracy.json +
manifest ``quantization`` -> commit, or AccuracyBudgetExceeded carrying the report (nothing is
written) unless ``accept_loss``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgevl.bundle import Bundle
from edgevl.errors import AccuracyBudgetExceeded, QuantizationError
from edgevl.exporters.quantize import qdq
from edgevl.exporters.quantize.float_rules import FloatNode, lm_head_node, rule_float_nodes
from edgevl.exporters.quantize.recipes import PTQRecipe


@dataclass
class PartPlan:
    """What is quantized in one part and what stays float (rule + LM head + sensitivity)."""

    part: str
    source: Path                      # the FP32 ONNX
    target: Path                      # the quantized ONNX inside the bundle being written
    cache: Path                       # ORT's calibration range cache (shipped in the bundle)
    quantizable: dict[str, str]       # node name -> op type
    rule_float: list[FloatNode]
    chosen_float: list[FloatNode] = field(default_factory=list)

    @property
    def float_nodes(self) -> list[FloatNode]:
        return self.rule_float + self.chosen_float

    @property
    def excluded(self) -> list[str]:
        return [f.name for f in self.float_nodes]

    @property
    def candidates(self) -> list[str]:
        excluded = set(self.excluded)
        return [n for n in self.quantizable if n not in excluded]

    def build(self, recipe: PTQRecipe, extra_exclude=(), out: Path | None = None) -> Path:
        return qdq.quantize(self.source, out or self.target, self.cache, recipe.method, recipe.op_types,
                            exclude=self.excluded + list(extra_exclude), per_channel=recipe.per_channel,
                            reduce_range=recipe.reduce_range, activations=recipe.activations)


def installed_eval_backends(wanted) -> tuple[str, ...]:
    from edgevl.runtimes.registry import is_installed

    found = tuple(b for b in wanted if is_installed(b))
    if not found:
        raise QuantizationError(f"none of the evaluation backends {tuple(wanted)} is installed; install onnxruntime")
    return found


def plan_parts(src: Bundle, writer, recipe: PTQRecipe, feeds: dict, log) -> dict[str, PartPlan]:
    import onnx

    plans = {}
    for part in recipe.parts:
        source = src.part_file(part)
        t = time.perf_counter()
        cache = qdq.calibrate(source, feeds[part], writer.file(f"calibration/{part}.json"), recipe.method,
                              recipe.op_types, recipe.percentile, recipe.entropy_bins)
        if recipe.method != "minmax":
            qdq.keep_full_range_for_attention(source, cache)
        model = onnx.load(str(source), load_external_data=False)
        plans[part] = PartPlan(part, source, writer.file(src.parts[part]["onnx"]), cache,
                               {n.name: n.op_type for n in model.graph.node if n.op_type in recipe.op_types},
                               rule_float_nodes(model, recipe.float_rule.extra_float,
                                                lm_head_float=recipe.float_rule.lm_head == "float",
                                                attention_float=part == "decoder"
                                                and recipe.float_rule.decoder_attention == "float"))
        log(f"  calibrated {part:<8} {recipe.method} on {len(feeds[part])} feeds in {time.perf_counter() - t:.1f} s")
    return plans


def top1_agreement(reference: Path, candidate: Path, feeds: list[dict]) -> float:
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(reference) as ref, OnnxRuntimeRunner(candidate, precision="int8") as cand:
        hits = [np.mean(ref.infer(f)["logits"].argmax(-1) == cand.infer(f)["logits"].argmax(-1)) for f in feeds]
    return float(np.mean(hits))


def decide_lm_head(plan: PartPlan, recipe: PTQRecipe, feeds: list[dict], log) -> dict:
    """The "auto" LM head rule: keep it float if quantizing it costs top-1 agreement."""
    import onnx

    head = lm_head_node(onnx.load(str(plan.source), load_external_data=False))
    if recipe.float_rule.lm_head != "auto" or head is None or head in plan.excluded:
        return {"rule": recipe.float_rule.lm_head, "node": head}
    with tempfile.TemporaryDirectory(prefix="edgevl-lmhead-") as tmp:
        with_head = plan.build(recipe, out=Path(tmp) / "with.onnx")
        without = plan.build(recipe, extra_exclude=[head], out=Path(tmp) / "without.onnx")
        a_with, a_without = top1_agreement(plan.source, with_head, feeds), top1_agreement(plan.source, without, feeds)
        broken = backends_breaking_contract(plan.source, with_head)
    hurts = a_with < a_without - recipe.float_rule.lm_head_tolerance
    reason = None
    if broken:
        reason = (f"LM head: with it in INT8, {'; '.join(broken)} (the part contract says logits (B, V)), so it "
                  "stays float")
    elif hurts:
        reason = (f"LM head: top-1 agreement {a_with:.3f} quantized vs {a_without:.3f} float "
                  f"(tolerance {recipe.float_rule.lm_head_tolerance})")
    if reason:
        plan.chosen_float.append(FloatNode(head, plan.quantizable.get(head, "MatMul"), reason))
    log(f"  LM head {head}: top-1 agreement {a_with:.3f} int8 vs {a_without:.3f} float"
        f"{'; ' + '; '.join(broken) if broken else ''} -> {'float' if reason else 'int8'}")
    return {"rule": "auto", "node": head, "top1_int8": round(a_with, 4), "top1_float": round(a_without, 4),
            "backend_problems": broken, "kept_float": bool(reason)}


def backends_breaking_contract(reference: Path, candidate: Path) -> list[str]:
    """Backends whose compiled candidate has outputs of another rank than the FP32 part.

    Found this way: OpenVINO 2026.4's CPU plugin compiles the Q/DQ decoder with an INT8 LM head
    (DequantizeLinear -> MatMul -> last-token Gather) to logits of shape [1, B, V] instead of
    [B, V]; the FP32 graph and the graph with a float LM head compile to [B, V]."""
    from edgevl.runtimes.registry import is_installed

    problems = []
    if is_installed("openvino"):
        import openvino as ov

        core = ov.Core()
        want = {o.get_any_name(): o.get_partial_shape().rank.get_length() for o in core.read_model(str(reference)).outputs}
        compiled = core.compile_model(str(candidate), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        for out in compiled.outputs:
            name, rank = out.get_any_name(), out.get_partial_shape().rank.get_length()
            if name in want and rank != want[name]:
                problems.append(f"OpenVINO {ov.__version__} compiles output {name!r} to shape {out.get_partial_shape()}")
    return problems


def quantization_manifest(recipe: PTQRecipe, source_desc: str, plans: dict, feeds: dict, lm_head: dict,
                          extra_artifacts: dict | None = None) -> dict:
    from edgevl.exporters.quantize.derive import tool_versions

    parts = {}
    for part, plan in plans.items():
        counts = qdq.count_qdq(plan.target)
        parts[part] = {"quantized_nodes": len(counts["int8_ops"]), "QuantizeLinear": counts["QuantizeLinear"],
                       "DequantizeLinear": counts["DequantizeLinear"], "int8_weights": counts["int8_weights"],
                       "float_nodes": [f.to_dict() for f in plan.float_nodes],
                       "calibration": str(plan.cache.relative_to(plan.cache.parents[1]))}
    artifacts = {"onnxruntime": "parts.*.onnx (Q/DQ)", "openvino": "parts.*.onnx (Q/DQ)"}
    if recipe.activations == "int8":
        artifacts["tensorrt"] = "parts.*.onnx (Q/DQ, explicit quantization)"
    artifacts.update(extra_artifacts or {})
    return {
        "scheme": "int8 static Q/DQ",
        "method": recipe.method,
        "tool": "onnxruntime.quantization.quantize_static (QuantFormat.QDQ)",
        "weights": "int8 symmetric per-channel" + (", 7-bit range (reduce_range)" if recipe.reduce_range else ""),
        "activations": ("int8 symmetric per-tensor" if recipe.activations == "int8"
                        else "uint8 asymmetric per-tensor (ONNX Runtime x86; not TensorRT)"),
        "op_types": list(recipe.op_types),
        "source": source_desc,
        "samples": recipe.samples,
        "decoder_feeds": len(feeds.get("decoder", [])),
        "parts": parts,
        "float_parts": ["embed"],
        "float_nodes": [f"{part}:{f.name}" for part, plan in plans.items() for f in plan.float_nodes],
        "lm_head": lm_head,
        "artifacts": artifacts,
        "recipe": recipe.to_dict(),
        "versions": tool_versions(),
    }


def quantize_bundle(bundle, calib, out, recipe: PTQRecipe = PTQRecipe(), force: bool = False,
                    threads: int | None = None, log=print, progress: bool = True, after_qdq=None) -> Bundle:
    """Write an INT8 Q/DQ bundle at ``out``. ``after_qdq(writer, feeds, plans)`` may add backend
    artefacts (the OpenVINO IR of `edgevl build`) before evaluation; it returns manifest notes."""
    from edgevl.exporters.quantize import sensitivity
    from edgevl.exporters.quantize.calibration import parse_source
    from edgevl.exporters.quantize.decoder_feeds import held_out_feeds, part_feeds
    from edgevl.exporters.quantize.derive import as_bundle, derived_writer, require_fp32, staged_bundle
    from edgevl.exporters.quantize.report import REPORT_FILE, AccuracyEvaluator, budget_verdict, parts_report, summary_lines

    recipe.validate()
    t0 = time.perf_counter()
    src = as_bundle(bundle)
    require_fp32(src, "quantize")
    missing = [p for p in recipe.parts if p not in src.parts]
    if missing:
        raise QuantizationError(f"{src.path} has no part(s) {missing}; it has {sorted(src.parts)}")
    source = parse_source(calib)
    backends = installed_eval_backends(recipe.eval_backends)
    log(f"quantize: {src.path} -> {out} (int8 Q/DQ, {recipe.method}, calibration {source.describe()})")
    writer = derived_writer(src, out, recipe.parts, force=force)
    try:
        feeds = part_feeds(src, source, recipe.parts, recipe.samples, recipe.decoder_prompts, recipe.decode_steps,
                           threads=threads, progress=progress)
        plans = plan_parts(src, writer, recipe, feeds, log)
        lm_head = {"rule": recipe.float_rule.lm_head}
        if "decoder" in plans:
            lm_head = decide_lm_head(plans["decoder"], recipe, feeds["decoder"][:16], log)
        for plan in plans.values():
            plan.build(recipe)
        notes = after_qdq(writer, feeds, plans) if after_qdq else {}
        writer.manifest["precision"] = "int8"
        staged = staged_bundle(writer)
        evaluator = AccuracyEvaluator.for_bundle(src, backends, recipe.eval_scenes, recipe.eval_split, recipe.seed,
                                                 threads, recipe.budget_metric, log)
        tasks = evaluator.tasks(staged)
        losses = evaluator.losses(tasks)
        log(f"  loss vs fp32 ({evaluator.metric}, {evaluator.n} {recipe.eval_split} scenes): "
            + ", ".join(f"{b} {v:+.2f} points" for b, v in losses.items()))
        history = [{"step": 0, "moved_to_float": None, "loss": losses}]
        if max(losses.values()) > recipe.budget_points and recipe.sensitivity:
            rebuild = (lambda: notes.update(after_qdq(writer, feeds, plans))) if after_qdq else None
            tasks, losses = sensitivity.keep_worst_float(plans, recipe, feeds, evaluator, staged, history, log, rebuild)
        verdict = budget_verdict(losses, recipe.budget_points, evaluator.metric, recipe.accept_loss)
        held = held_out_feeds(src, recipe.parts, threads=threads)
        report = {"reference": {"bundle": str(src.path), "precision": "fp32", "backend": "onnxruntime"},
                  "held_out": {"source": "world:test:12345", "feeds": {p: len(f) for p, f in held.items()}},
                  "parts": parts_report(src, staged, recipe.parts, held, backends, threads),
                  "tasks": tasks, "budget": verdict, "sensitivity": history}
        writer.write_json(REPORT_FILE, report)
        writer.manifest.setdefault("reports", {})["accuracy"] = REPORT_FILE
        writer.manifest["quantization"] = quantization_manifest(recipe, source.describe(), plans, feeds, lm_head,
                                                                notes.get("artifacts"))
        if notes.get("openvino"):
            writer.manifest["quantization"]["openvino_ir"] = notes["openvino"]
        for line in summary_lines(report):
            log(line)
        if not verdict["passed"] and not recipe.accept_loss:
            raise AccuracyBudgetExceeded(
                f"INT8 ({recipe.method}) loses {verdict['worst_loss']:.2f} points of {verdict['metric']} vs FP32 "
                f"(budget {recipe.budget_points} points; per backend {verdict['loss']}); no bundle was written. "
                "Try another --method, more --samples, a larger --budget, or --accept-loss to write it anyway",
                report)
        result = writer.commit()
    except BaseException:
        writer.abort()
        raise
    log(f"quantize: wrote {result.path} in {time.perf_counter() - t0:.1f} s")
    return result
