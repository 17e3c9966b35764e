"""`make demo`: the whole flow on the embedded edgevl-tiny, start to end, in a few minutes.

1. export edgevl-tiny to an FP32 ONNX bundle (parity vs PyTorch and exact greedy tokens are
   checked as part of export)
2. build an INT8 bundle (calibrated Q/DQ) for the best local target
3. run a camera-stream pipeline over a sample video of held-out scenes with the INT8 bundle,
   printing answers as they come, and score them against the video's ground truth
4. a benchmark and accuracy summary: PyTorch eager FP32 vs the FP32 and INT8 bundles, same
   machine, same questions, in one run; a speed-up is printed plainly only when the passes agree
   and the machine was not busy (edgevl.benchmarks.trust), and summary.json records the verdict
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from edgevl.benchmarks.stats import DEFAULT_SPREAD_LIMIT, Summary, summarize
from edgevl.benchmarks.trust import Trust, format_ratios, judge

PASSES = 5          # timed passes over the questions per variant: enough samples for a spread


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def best_local_target() -> tuple[str, str]:
    """(target, why) for the INT8 bundle on this machine."""
    from edgevl.runtimes.registry import installed_backends

    installed = installed_backends()
    if platform.machine().lower() in ("x86_64", "amd64") and "openvino" in installed:
        return "openvino", "x86 CPU with OpenVINO installed"
    return "onnxruntime", "ONNX Runtime runs Q/DQ INT8 on x86 and ARM CPUs"


def time_variants(variants: dict, questions, passes: int = PASSES) -> dict[str, list[float]]:
    """Mean ms/question of each pass over ``questions`` (one image + prompt -> greedy answer), per
    variant, after one warm-up call each. Variants take turns pass by pass, so load that comes and
    goes hits them alike; a pass is the same work every time, so its spread is noise, not the
    mix of short and long answers."""
    image, question = questions[0]
    for answer_one in variants.values():
        answer_one(image, question)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(passes):
        for name, answer_one in variants.items():
            t = time.perf_counter()
            for image, question in questions:
                answer_one(image, question)
            times[name].append((time.perf_counter() - t) * 1e3 / len(questions))
    return times


@dataclass(frozen=True)
class Timed:
    """One variant's ms/question and, for all but the baseline, its speed-up and whether to trust it."""

    name: str
    ms: Summary
    speedup: float | None = None
    trust: Trust | None = None

    def to_dict(self) -> dict:
        return {"variant": self.name, "ms_per_question": self.ms.to_dict(2),
                "speedup": None if self.speedup is None else round(self.speedup, 3),
                "speedup_trust": self.trust.to_dict() if self.trust else None}


def speed_rows(times: dict[str, list[float]], *, load_before: float | None, load_after: float | None,
               cores: int, spread_limit: float = DEFAULT_SPREAD_LIMIT, others_cores: float | None = None) -> list[Timed]:
    """Summaries of ``times`` (the first variant is the baseline) with each speed-up's verdict."""
    (base_name, base_times), *others = times.items()
    base = summarize(base_times, spread_limit)
    rows = [Timed(base_name, base)]
    for name, values in others:
        ms = summarize(values, spread_limit)
        trust = judge({base_name: base, name: ms}, load_before=load_before, load_after=load_after, cores=cores,
                      spread_limit=spread_limit, others_cores=others_cores)
        rows.append(Timed(name, ms, base.p50 / ms.p50 if ms.p50 else None, trust))
    return rows


def summary_lines(rows: list[Timed], accuracy: dict[str, dict] | None = None) -> list[str]:
    """The step-4 table; a speed-up that cannot be trusted is marked '!' (``speed_sentence`` says why)."""
    accuracy = accuracy or {}
    lines = [f"   {'variant':<22} {'ms/question':>11} {'(p10-p90)':>14} {'speed-up':>9} {'accuracy':>9}  by task"]
    for row in rows:
        acc = accuracy.get(row.name) or {}
        speed = "1.00x" if row.trust is None else "n/a" if row.speedup is None else f"{row.speedup:.2f}x"
        mark = "!" if row.trust is not None and not row.trust.ok else " "
        by_task = " ".join(f"{k}={v:.2f}" for k, v in (acc.get("by_task") or {}).items())
        score = f"{acc['accuracy']:>9.3f}" if "accuracy" in acc else f"{'-':>9}"
        lines.append(f"   {row.name:<22} {row.ms.p50:>11.1f} {f'({_ms(row.ms.p10)}-{_ms(row.ms.p90)})':>14} "
                     f"{speed:>8}{mark} {score}  {by_task}".rstrip())
    return lines


def _ms(value: float) -> str:
    return f"{value:.{0 if value >= 100 else 1 if value >= 10 else 2}f}"


def speed_sentence(rows: list[Timed]) -> str:
    """One sentence with the speed-ups: plain only when they can be trusted, else flagged with why."""
    measured = [(r.name, r.speedup, r.trust) for r in rows if r.trust is not None]
    marked = " ('!' in the table)" if any(not t.ok for _, _, t in measured) else ""
    return f"speed-up vs {rows[0].name}{marked}: {format_ratios(measured)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes for the accuracy summary")
    parser.add_argument("--stream-scenes", type=int, default=8, help="scenes in the sample video")
    parser.add_argument("--target", choices=["onnxruntime", "openvino"], default=None,
                        help="INT8 target (default: the best local one)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()

    import edgevl
    from edgevl.benchmarks.machine import OthersCpu, load_now, machine_info
    from edgevl.benchmarks.report import write_json
    from edgevl.data.tasks import scene_qas
    from edgevl.data.world import make_scene
    from edgevl.evaluate import evaluate
    from edgevl.exporters.build import build_bundle
    from edgevl.exporters.export import export_model
    from edgevl.models.checkpoint import load_checkpoint
    from edgevl.models.reference import TorchAnswerer
    from edgevl.pipelines.demo import stream_demo

    step("1. export edgevl-tiny -> FP32 ONNX bundle (parity vs PyTorch is part of export)")
    fp32 = export_model("edgevl-tiny", out / "edgevl-tiny-fp32", force=True)

    target, why = (args.target, "asked for") if args.target else best_local_target()
    step(f"2. build the int8 deployment for {target} ({why}): each part's INT8 candidates timed here, the "
         "fastest that keeps accuracy kept")
    int8 = build_bundle("edgevl-tiny", target, "int8", out / f"edgevl-tiny-{target}-int8", calib="world",
                        force=True, eval_scenes=100, progress=False)

    step("3. camera-stream pipeline over a sample video (INT8 bundle), answers as they come")
    stream = stream_demo(int8.path, out / "stream", scenes=args.stream_scenes, backend=target)

    machine = machine_info()
    step(f"4. benchmark and accuracy summary ({machine['cpu']}, {machine['usable_cores']} cores)")
    model, tokenizer = load_checkpoint("edgevl-tiny")
    torch_answerer = TorchAnswerer(model, tokenizer)
    questions = []
    for i in range(4):
        scene = make_scene("test", 1000 + i)
        questions += [(scene.image(), qa.question) for qa in scene_qas(scene)]
    variants = {"pytorch eager fp32": lambda img, q: torch_answerer([img], [q])[0]}
    answerers = {"pytorch eager fp32": torch_answerer}
    runtimes = []
    for name, bundle in (("fp32", fp32), ("int8", int8)):
        vlm = edgevl.load(bundle.path, backend=target, verbose=False)
        runtimes.append(vlm)
        variants[f"{target} {name}"] = lambda img, q, v=vlm: v.generate(img, q, channels="rgb").text
        answerers[f"{target} {name}"] = vlm.answer
    print(f"   timing {len(variants)} variants, {PASSES} interleaved passes over {len(questions)} questions, "
          f"then accuracy on {args.scenes} scenes", flush=True)
    # The timing runs in this process: other processes' CPU use is measured directly (the load
    # average would count this demo's own build steps as competition)
    with OthersCpu() as others:
        times = time_variants(variants, questions)
    if others.cores is None:            # no /proc/stat: fall back to the load average
        rows = speed_rows(times, load_before=load_now(), load_after=load_now(), cores=machine["usable_cores"])
    else:
        rows = speed_rows(times, load_before=None, load_after=None, cores=machine["usable_cores"],
                          others_cores=others.cores)
    accuracy = {name: evaluate(answerer, n=args.scenes) for name, answerer in answerers.items()}
    for vlm in runtimes:
        vlm.close()
    print("\n".join(summary_lines(rows, accuracy)))
    score = stream["score"]
    if score.get("checked"):
        print(f"   stream: {score['correct']}/{score['checked']} live answers matched the video's ground truth")
    verdict = sum((r.trust for r in rows if r.trust), Trust())
    summary = write_json({
        "machine": machine, "target": target, "questions": len(questions), "passes": PASSES,
        "speedup_verdict": verdict.to_dict(),        # all speed-ups together; each variant has its own too
        "variants": [dict(r.to_dict(), accuracy=accuracy[r.name]["accuracy"], accuracy_by_task=accuracy[r.name]["by_task"])
                     for r in rows],
        "accuracy_scenes": args.scenes, "stream_score": score}, out / "summary.json")
    print(f"\n   ms/question: a pass over the {len(questions)} questions, median (p10-p90) of {PASSES} passes; "
          f"accuracy on {args.scenes} held-out scenes; JSON {summary}; full benchmarks: `edgevl bench` (README)")
    print(f"   {speed_sentence(rows)}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; bundles and stream outputs under {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
