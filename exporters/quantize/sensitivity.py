"""The sensitivity pass: keep the worst nodes in float until the accuracy budget holds.

Ranking: for each quantized node of each part, re-quantize the part with that one node in float
(from the cached calibration ranges, so no re-calibration) and measure how much of the part's
output error (1 - cosine vs FP32 on calibration feeds) disappears. Greedy: move nodes to float
in that order, re-evaluating task accuracy after each, until the budget holds or
``max_float_nodes`` steps were taken (a step moves one node, or one module's nodes in big parts). Every step is recorded in the report's ``sensitivity`` list.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgevl.exporters.quantize.float_rules import FloatNode

RANK_FEEDS = 8
MAX_SINGLE_CANDIDATES = 64


def part_error(reference: Path, candidate: Path, feeds: list[dict]) -> float:
    """1 - worst cosine of the part's first output (image_embeds / logits) over ``feeds``."""
    from edgevl.runtimes.compare import diff_outputs
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(reference) as ref, OnnxRuntimeRunner(candidate, precision="int8") as cand:
        name = ref.output_names[0]
        worst = 1.0
        for f in feeds:
            worst = min(worst, diff_outputs({name: ref.infer(f)[name]}, {name: cand.infer(f)[name]})[0].cosine)
    return 1.0 - worst


def candidate_groups(nodes: list[str], limit: int = MAX_SINGLE_CANDIDATES) -> list[list[str]]:
    """One node per candidate while a part has few; beyond ``limit``, the nodes of one module
    (e.g. '/decoder/layers.3/mlp') move together, so ranking a 30-layer decoder costs ~60
    re-quantizations instead of ~300."""
    if len(nodes) <= limit:
        return [[n] for n in nodes]
    groups: dict[str, list[str]] = {}
    for n in nodes:
        groups.setdefault(n.rsplit("/", 2)[0], []).append(n)
    return list(groups.values())


def rank_nodes(plans: dict, recipe, feeds: dict, log=print) -> list[tuple[float, str, list[str]]]:
    """(share of the part's error removed by keeping the nodes float, part, nodes), best first."""
    ranking = []
    with tempfile.TemporaryDirectory(prefix="edgevl-sensitivity-") as tmp:
        for part, plan in plans.items():
            sample = feeds[part][:RANK_FEEDS]
            base = part_error(plan.source, plan.target, sample)
            if base <= 1e-9:
                continue
            groups = candidate_groups(plan.candidates)
            for nodes in groups:
                candidate = plan.build(recipe, extra_exclude=nodes, out=Path(tmp) / f"{part}.onnx")
                ranking.append(((base - part_error(plan.source, candidate, sample)) / base, part, nodes))
            log(f"  sensitivity: ranked {len(groups)} candidates of {part} (error 1-cos {base:.2e})")
    return sorted(ranking, key=lambda r: -r[0])


def keep_worst_float(plans: dict, recipe, feeds: dict, evaluator, staged, history: list, log=print,
                     rebuild=None) -> tuple[dict, dict]:
    """Move nodes to float one by one until the budget holds; -> (tasks, losses) of the last step."""
    tasks = losses = None
    for step, (gain, part, nodes) in enumerate(rank_nodes(plans, recipe, feeds, log)[:recipe.max_float_nodes], 1):
        plan = plans[part]
        for node in nodes:
            plan.chosen_float.append(FloatNode(node, plan.quantizable.get(node, "?"),
                                               f"sensitivity: float removes {gain:.0%} of the part's output error"))
        plan.build(recipe)
        if rebuild is not None:
            rebuild()
        tasks = evaluator.tasks(staged)
        losses = evaluator.losses(tasks)
        moved = [f"{part}:{n}" for n in nodes]
        history.append({"step": step, "moved_to_float": moved, "gain": round(gain, 4), "loss": losses})
        log(f"  sensitivity step {step}: {', '.join(moved)} -> float; loss "
            + ", ".join(f"{b} {v:+.2f}" for b, v in losses.items()))
        if max(losses.values()) <= recipe.budget_points:
            break
    if tasks is None:                      # nothing to move: report the unchanged state
        tasks = evaluator.tasks(staged)
        losses = evaluator.losses(tasks)
    return tasks, losses
