"""`make demo`: the whole flow on the embedded edgevl-tiny, start to end, in a few minutes.

1. export edgevl-tiny to an FP32 ONNX bundle (parity vs PyTorch and exact greedy tokens are
   checked as part of export)
2. build an INT8 bundle (calibrated Q/DQ) for the best local target
3. run a camera-stream pipeline over a sample video of held-out scenes with the INT8 bundle,
   printing answers as they come, and score them against the video's ground truth
4. a benchmark and accuracy summary: PyTorch eager FP32 vs the FP32 and INT8 bundles, same
   machine, same questions, in one run
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def best_local_target() -> tuple[str, str]:
    """(target, why) for the INT8 bundle on this machine."""
    from edgevl.runtimes.registry import installed_backends

    installed = installed_backends()
    if platform.machine().lower() in ("x86_64", "amd64") and "openvino" in installed:
        return "openvino", "x86 CPU with OpenVINO installed"
    return "onnxruntime", "ONNX Runtime runs Q/DQ INT8 on x86 and ARM CPUs"


def time_questions(answer_one, questions, repeats: int = 1) -> list[float]:
    """Milliseconds per question (one image + prompt -> greedy answer), after one warm-up."""
    image, question = questions[0]
    answer_one(image, question)
    times = []
    for _ in range(repeats):
        for image, question in questions:
            t = time.perf_counter()
            answer_one(image, question)
            times.append((time.perf_counter() - t) * 1e3)
    return times


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
    from edgevl.benchmarks.machine import machine_info
    from edgevl.benchmarks.stats import summarize
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
    step(f"2. build an INT8 bundle for {target} ({why}), calibrated on synthetic scenes")
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
    rows = [("pytorch eager fp32", lambda img, q: torch_answerer([img], [q])[0], torch_answerer)]
    runtimes = []
    for name, bundle in (("fp32", fp32), ("int8", int8)):
        vlm = edgevl.load(bundle.path, backend=target, verbose=False)
        runtimes.append(vlm)
        rows.append((f"{target} {name}", lambda img, q, v=vlm: v.generate(img, q, channels="rgb").text, vlm.answer))
    print(f"   {'variant':<22} {'ms/question p50':>15} {'(p10-p90)':>14} {'speed-up':>9} {'accuracy':>9}  by task")
    base = None
    for name, one, answerer in rows:
        ms = summarize(time_questions(one, questions, repeats=3))
        base = base or ms.p50
        res = evaluate(answerer, n=args.scenes)
        by_task = " ".join(f"{k}={v:.2f}" for k, v in res["by_task"].items())
        print(f"   {name:<22} {ms.p50:>15.1f} {f'({ms.p10:.0f}-{ms.p90:.0f})':>14} {base / ms.p50:>8.2f}x "
              f"{res['accuracy']:>9.3f}  {by_task}")
    for vlm in runtimes:
        vlm.close()
    score = stream["score"]
    if score.get("checked"):
        print(f"   stream: {score['correct']}/{score['checked']} live answers matched the video's ground truth")
    print(f"\n   accuracy on {args.scenes} held-out scenes, {len(questions)} questions x 3 timed per variant on this "
          f"machine; full benchmarks: `edgevl bench` (README)")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; bundles and stream outputs under {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
