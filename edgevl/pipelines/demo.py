"""The stream step of ``make demo``: a sample video of held-out scenes, played like a camera,
answered live, then checked against the video's ground truth.

    python -m edgevl.pipelines.demo BUNDLE --out out/demo/stream
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_PROMPT = "describe the image."


def stream_demo(bundle: str | Path, out: str | Path, prompt: str = DEMO_PROMPT, scenes: int = 8,
                seconds_per_scene: float = 1.0, fps: float = 4.0, skip_unchanged: float | None = 3.0,
                backend: str | None = None, log=print) -> dict:
    """Make the sample, stream it through ``bundle`` with live console answers, score the answers.
    Returns {"report": metrics, "score": ..., "files": ...}."""
    from edgevl.pipelines.sample import make_sample_video, score
    from edgevl.pipelines.stream import run_stream

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    video_fps = 15.0
    sample = make_sample_video(out / "sample.avi", scenes=scenes, frames_per_scene=max(1, round(seconds_per_scene * video_fps)),
                               fps=video_fps)
    log(f"sample video {sample.path}: {sample.n_frames} frames, a new held-out scene every "
        f"{sample.frames_per_scene} frames; truth in {sample.truth_path.name}")
    files = {"jsonl": out / "answers.jsonl", "video": out / "annotated.mp4", "metrics": out / "metrics.json"}
    report = run_stream(bundle, [str(sample.path)], prompt, fps=fps, skip_unchanged=skip_unchanged,
                        backend=backend, **files)
    with open(files["jsonl"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    result = score(sample, records)
    if result["checked"]:
        log(f"answers matching the ground truth exactly: {result['correct']}/{result['checked']} "
            f"({result['accuracy']:.0%}); the model ran on {report.total['processed']} frames and reused "
            f"{report.total['skipped']} answers of unchanged frames")
    log("outputs: " + ", ".join(str(p) for p in files.values()))
    return {"report": report.metrics, "score": result, "files": {k: str(v) for k, v in files.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--out", default="out/demo/stream")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--backend", default=None)
    args = p.parse_args(argv)
    stream_demo(args.bundle, args.out, args.prompt, backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
