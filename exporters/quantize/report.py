"""The accuracy report every quantized bundle carries (``accuracy.json``, manifest ``reports``).

Two levels, both against the FP32 bundle the quantized one was derived from:

- per part, on held-out inputs (the world's test split, never calibration data): cosine and max
  abs diff of each output, the quantized part on each backend vs the FP32 part on ONNX Runtime;
  for the decoder also the top-1 agreement of its logits;
- end to end, exact-match accuracy by task on held-out scenes (edgevl.evaluate with the bundle's
  own ``VLM.answer``), FP32 and quantized on the same backend, plus the share of answers that
  are identical to FP32's. For edgevl-tiny the budget is the accuracy drop in points; for models
  without a task of their own (random-weight families) it is the disagreement with FP32 in points.

``edgevl eval BUNDLE --check-report`` re-runs the task evaluation with the report's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgevl.bundle import Bundle
from edgevl.runtimes.compare import diff_outputs

REPORT_FILE = "accuracy.json"
NO_BUDGET_SCENES = 8


def part_parity(reference: Bundle, candidate: Bundle, part: str, feeds: list[dict], backend: str,
                threads: int | None = None) -> dict:
    """Worst cosine / max abs diff per output over ``feeds``; decoder KV outputs summarised as one."""
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner
    from edgevl.runtimes.registry import get_runner_class

    ref = OnnxRuntimeRunner(reference.part_file(part), precision="fp32", threads=threads)
    cand = get_runner_class(backend)(candidate.part_file(part, backend), precision=candidate.precision,
                                     threads=threads)
    if part == "decoder" and candidate.kv_dtype(backend) == "int8":   # compared through the float interface
        from edgevl.exporters.lower.kv_int8 import FloatCacheView, read_kv_scales

        cand = FloatCacheView(cand, read_kv_scales(candidate.part_file(part, backend)))
    worst: dict = {}
    top1 = []
    try:
        for feeds_one in feeds:
            r, c = ref.infer(feeds_one), cand.infer(feeds_one)
            for d in diff_outputs(r, c):
                key = "present (worst layer)" if d.output.startswith("present_") else d.output
                w = worst.setdefault(key, {"cosine": 1.0, "max_abs": 0.0, "mean_abs": 0.0})
                w["cosine"] = min(w["cosine"], d.cosine)
                w["max_abs"] = max(w["max_abs"], d.max_abs)
                w["mean_abs"] = max(w["mean_abs"], d.mean_abs)
            if "logits" in r:
                top1.append(float(np.mean(r["logits"].argmax(-1) == c["logits"].argmax(-1))))
    finally:
        ref.close()
        cand.close()
    out = {"outputs": {k: {"cosine": round(v["cosine"], 7), "max_abs": float(f"{v['max_abs']:.4g}"),
                           "mean_abs": float(f"{v['mean_abs']:.4g}")} for k, v in worst.items()},
           "n_feeds": len(feeds)}
    if top1:
        out["top1_agreement"] = round(float(np.mean(top1)), 4)
    return out


def evaluate_bundle(bundle: Bundle, backend: str, n: int, split: str = "test", seed: int = 0,
                    threads: int | None = None) -> dict:
    """Exact-match evaluation through the bundle's runtime, every answer kept."""
    from edgevl.api import VLM
    from edgevl.evaluate import evaluate

    vlm = VLM(bundle, backend, threads=threads)
    try:
        return evaluate(vlm.answer, n=n, split=split, seed=seed, keep_answers=True)
    finally:
        vlm.close()


def compare_tasks(fp32: dict, quantized: dict) -> dict:
    same = [a["answer"] == b["answer"] for a, b in zip(fp32["answers"], quantized["answers"])]
    return {
        "fp32": {"accuracy": round(fp32["accuracy"], 4), "by_task": {k: round(v, 4) for k, v in fp32["by_task"].items()}},
        "quantized": {"accuracy": round(quantized["accuracy"], 4),
                      "by_task": {k: round(v, 4) for k, v in quantized["by_task"].items()}},
        "drop_points": round(100 * (fp32["accuracy"] - quantized["accuracy"]), 2),
        "by_task_drop_points": {k: round(100 * (fp32["by_task"][k] - quantized["by_task"].get(k, 0.0)), 2)
                                for k in fp32["by_task"]},
        "agreement": round(float(np.mean(same)) if same else 1.0, 4),
    }


def loss_points(task_cmp: dict, metric: str) -> float:
    if metric == "none":
        return 0.0
    return task_cmp["drop_points"] if metric == "accuracy" else round(100 * (1 - task_cmp["agreement"]), 2)


@dataclass
class AccuracyEvaluator:
    """Evaluates candidates against one FP32 bundle; FP32 results are computed once per backend."""

    reference: Bundle
    backends: tuple[str, ...]
    n: int
    split: str = "test"
    seed: int = 0
    threads: int | None = None
    budget_metric: str = "auto"
    _fp32: dict = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """accuracy for edgevl-tiny (it has tasks); for other families "none" unless asked: a model
        without a task of its own (e.g. random weights) has no accuracy to keep, and answer
        agreement over long free-form generations is too strict a default budget."""
        if self.budget_metric != "auto":
            return self.budget_metric
        return "accuracy" if self.reference.manifest["model"].get("family") == "edgevl-tiny" else "none"

    @classmethod
    def for_bundle(cls, reference: Bundle, backends, n: int, split: str = "val", seed: int = 0, threads=None,
                   budget_metric: str = "auto", log=print) -> "AccuracyEvaluator":
        """The evaluator a quantizer uses; without a budget to enforce, a few scenes suffice."""
        evaluator = cls(reference, tuple(backends), n, split, seed, threads, budget_metric)
        if evaluator.metric == "none" and n > NO_BUDGET_SCENES:
            evaluator.n = NO_BUDGET_SCENES
            log(f"  {reference.manifest['model'].get('family')}: no task accuracy to budget (pass budget_metric="
                f"'agreement' to enforce answer agreement); reporting {NO_BUDGET_SCENES} scenes")
        return evaluator

    def fp32(self, backend: str) -> dict:
        if backend not in self._fp32:
            self._fp32[backend] = evaluate_bundle(self.reference, backend, self.n, self.split, self.seed, self.threads)
        return self._fp32[backend]

    def tasks(self, candidate: Bundle) -> dict:
        per_backend = {b: compare_tasks(self.fp32(b), evaluate_bundle(candidate, b, self.n, self.split, self.seed,
                                                                       self.threads))
                       for b in self.backends}
        return {"n": self.n, "split": self.split, "seed": self.seed, "metric": self.metric, "backends": per_backend}

    def losses(self, tasks: dict) -> dict:
        return {b: loss_points(c, tasks["metric"]) for b, c in tasks["backends"].items()}


def budget_verdict(losses: dict, budget_points: float, metric: str, accept_loss: bool) -> dict:
    if metric == "none":
        return {"metric": "none", "points": None, "loss": losses, "worst_loss": 0.0, "passed": True,
                "accepted_loss": False, "reason": "no task accuracy for this model family; budget not enforced"}
    worst = max(losses.values()) if losses else 0.0
    return {"metric": metric, "points": budget_points, "loss": losses, "worst_loss": worst,
            "passed": worst <= budget_points, "accepted_loss": bool(accept_loss and worst > budget_points)}


def parts_report(reference: Bundle, candidate: Bundle, parts, held_out: dict, backends, threads=None) -> dict:
    return {part: {b: part_parity(reference, candidate, part, held_out[part], b, threads) for b in backends}
            for part in parts if part in held_out}


def summary_lines(report: dict) -> list[str]:
    lines = []
    for part, per_backend in report.get("parts", {}).items():
        for backend, r in per_backend.items():
            main = next(iter(r["outputs"].items()))
            extra = f", top-1 agreement {r['top1_agreement']:.3f}" if "top1_agreement" in r else ""
            lines.append(f"  {part:<8} {backend:<12} {main[0]}: cosine {main[1]['cosine']:.5f}, "
                         f"max abs diff {main[1]['max_abs']:.3g}{extra}")
    tasks = report.get("tasks")
    if tasks:
        for backend, c in tasks["backends"].items():
            lines.append(f"  accuracy {backend:<12} fp32 {100 * c['fp32']['accuracy']:.1f}%  quantized "
                         f"{100 * c['quantized']['accuracy']:.1f}%  drop {c['drop_points']:+.2f} points, "
                         f"{100 * c['agreement']:.1f}% answers identical ({tasks['n']} scenes)")
    return lines


def check_report(bundle_path, backend: str | None = None, threads: int | None = None, log=print) -> int:
    """`edgevl eval BUNDLE --check-report`: evaluate again with the report's settings; 0 if every
    backend reproduces the recorded quantized accuracy exactly, 1 otherwise."""
    from edgevl.bundle import load_bundle
    from edgevl.errors import BundleError
    from edgevl.runtimes.registry import is_installed

    if not bundle_path:
        raise BundleError("--check-report needs a bundle directory")
    bundle = load_bundle(bundle_path)
    report = bundle.report("accuracy")
    if not report or not report.get("tasks"):
        why = (report or {}).get("tasks_skipped", "quantized bundles of edgevl-tiny have one")
        raise BundleError(f"{bundle.path} has no accuracy report with task results ({why})")
    tasks = report["tasks"]
    recorded = tasks["backends"]
    backends = [backend] if backend else [b for b in recorded if is_installed(b)]
    status = 0
    for b in backends:
        if b not in recorded:
            raise BundleError(f"the report has no results for backend {b!r}; it has {sorted(recorded)}")
        got = evaluate_bundle(bundle, b, tasks["n"], tasks["split"], tasks.get("seed", 0), threads)
        want = recorded[b]["quantized"]["accuracy"]
        same = round(got["accuracy"], 4) == want
        status |= 0 if same else 1
        log(f"{b}: accuracy {100 * got['accuracy']:.2f}% on {tasks['n']} {tasks['split']} scenes; report says "
            f"{100 * want:.2f}% -> {'reproduced' if same else 'DIFFERENT'}")
    return status
