"""Camera-stream benchmark: sustained answers per second and capture-to-answer latency for 1
and N simulated cameras on edgevl-tiny (INT8 when the quantizing builder is installed, else FP32;
the result says which).

Each camera is a looping sample video of the synthetic world (a different one per camera, so a
batch never holds identical frames) played at ``--source-fps`` like a live camera: latest frame
wins, so a model slower than the cameras drops frames instead of queueing them, and latency
stays bounded. Cameras must offer more frames than the model can answer, or the sources and not
the model set the rate: the result flags runs where that happened.

Runs: 1 source on the plain engine (what a one-camera deployment uses); N sources through the
dynamic batcher + in-flight scheduler (``batching=True``); and, as a reference, N sources with
batching off (they take turns on one engine). Only answers completed inside the timed window
(after ``--warmup`` seconds) count.

    nice -n 19 python -m edgevl.benchmarks.streams                       # the real run (lead)
    nice -n 19 python -m edgevl.benchmarks.streams --seconds 3 --warmup 1 --out /tmp/streams-check
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from edgevl.benchmarks.trust import Trust, judge

DEFAULT_PROMPT = "describe the image."       # a ~20-token caption: decode-heavy, where batching pays
TARGET_RATIO = 2.0                           # N sources' total answers/s vs one source's


def build_or_reuse_bundle(work: Path, precision: str, target: str, rebuild: bool, log) -> tuple[Path, str, str]:
    """(bundle path, precision actually built, how it was made)."""
    from edgevl.bundle import load_bundle
    from edgevl.errors import BundleError

    builder = None
    if precision in ("auto", "int8"):
        try:
            builder = getattr(importlib.import_module("edgevl.exporters.build"), "build_bundle", None)
        except ModuleNotFoundError as e:
            if e.name != "edgevl.exporters.build":
                raise
        if builder is None and precision == "int8":
            raise SystemExit("--precision int8 needs edgevl.exporters.build.build_bundle (the quantization issue); "
                             "use --precision fp32 or --bundle DIR")
    from edgevl.benchmarks.models import checkpoint_hash
    from edgevl.models.checkpoint import EMBEDDED_DIR

    chosen = "int8" if builder is not None else "fp32"
    out = work / f"edgevl-tiny-{chosen}-{target}"
    stamp = work / f"{out.name}.checkpoint"        # which checkpoint the cached bundle was built from
    current = checkpoint_hash(EMBEDDED_DIR)
    if out.is_dir() and not rebuild and stamp.is_file() and stamp.read_text().strip() == current:
        try:
            load_bundle(out)
            return out, chosen, f"reused {out}"
        except BundleError:
            pass
    stamp.unlink(missing_ok=True)
    t = time.perf_counter()
    if builder is not None:
        log(f"building an INT8 bundle of edgevl-tiny for {target} (edgevl.exporters.build.build_bundle)")
        result = builder("edgevl-tiny", target=target, precision="int8", out=str(out), force=True)
        out = Path(getattr(result, "path", out))
        how = "edgevl.exporters.build.build_bundle(precision='int8')"
    else:
        log("edgevl.exporters.build is not installed: benchmarking the FP32 bundle (export_model)")
        from edgevl.exporters.export import export_model

        export_model("edgevl-tiny", out, force=True, log=lambda *a: None)
        how = "edgevl.exporters.export.export_model (FP32; no quantizing builder installed)"
    stamp.write_text(current + "\n")
    return out, chosen, f"{how} in {time.perf_counter() - t:.0f} s"


def make_cameras(work: Path, n: int, fps: float) -> list[Path]:
    from edgevl.pipelines.sample import make_sample_video

    paths = []
    for i in range(n):
        path = work / f"camera{i}-{fps:g}fps.avi"
        if not path.is_file():
            make_sample_video(path, scenes=8, frames_per_scene=int(fps) // 4 or 1, fps=fps, size=256,
                              first_scene=8 * i)
        paths.append(path)
    return paths


def run_case(bundle: Path, cameras: list[Path], batching: bool, args) -> dict:
    import edgevl
    from edgevl.benchmarks.stats import summarize
    from edgevl.pipelines import CallbackSink, VideoFileSource, run_stream
    from edgevl.pipelines.sample import load_sample, frame_image

    from edgevl.benchmarks.batching import parse_options

    vlm = edgevl.load(bundle, backend=args.backend, threads=args.threads, batching=batching,
                      options=parse_options(args.option),
                      max_batch_size=args.max_batch, max_wait_ms=args.max_wait_ms, verbose=False)
    try:
        warm = frame_image(load_sample(cameras[0]).scenes[0], 256)
        for _ in range(3):
            vlm.generate(warm, args.prompt)
        done: list[tuple[str, float, float]] = []          # (source, answered at (wall), latency ms)
        sink = CallbackSink(lambda a: done.append(
            (a.source, a.captured_at + a.latency_ms["capture_to_answer"] / 1e3, a.latency_ms["capture_to_answer"])))
        sources = [VideoFileSource(f"cam{i}", p) for i, p in enumerate(cameras)]
        t0, cpu0 = time.time(), time.process_time()
        report = run_stream(vlm, sources, args.prompt, loop=True, playback_fps=args.source_fps, console=False,
                            duration=args.warmup + args.seconds, sinks=[sink])
        cpu_s = time.process_time() - cpu0
        scheduler_stats = vlm.scheduler.stats() if getattr(vlm, "scheduler", None) is not None else None
        backend = vlm.backend
    finally:
        vlm.close()
    lo, hi = t0 + args.warmup, t0 + args.warmup + args.seconds
    window = [d for d in done if lo <= d[1] < hi]
    latencies = [d[2] for d in window]
    lat = summarize(latencies) if latencies else None
    per_source = {s.name: round(sum(1 for d in window if d[0] == s.name) / args.seconds, 3) for s in sources}
    total = len(window) / args.seconds
    offered = len(cameras) * args.source_fps
    return {
        "sources": len(cameras), "batching": batching, "backend": backend,
        "answers_per_s": round(total, 3), "answers_per_s_per_source": per_source,
        "latency_ms": lat.to_dict(2) if lat else None,
        "answers_in_window": len(window), "offered_frames_per_s": offered,
        # CPU seconds this process spent per answer (all answers of the run): comparable across
        # runs even on a busy machine, where answers/s mostly measures the share of CPU we got
        "cpu_ms_per_answer": round(1e3 * cpu_s / len(done), 2) if done else None,
        "source_limited": total >= 0.9 * offered,
        "pipeline": {k: report.total[k] for k in ("captured", "processed", "dropped", "failed")},
        "health_ok": report.ok, "scheduler": scheduler_stats,
        "errors": [e["message"] for e in report.metrics["health"]["events"] if e["level"] == "error"][:5],
    }


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# Camera streams: edgevl-tiny {doc['bundle']['precision'].upper()}", "",
             f"{m.get('cpu')} ({m.get('usable_cores')} cores; flags {', '.join(m.get('flags', []))}), "
             f"{doc['runs'][0]['backend'] if doc['runs'] else '?'}; prompt {doc['settings']['prompt']!r}; "
             f"cameras at {doc['settings']['source_fps']:g} fps each; {doc['settings']['threads']} thread(s) per model "
             f"part; image batcher wait {doc['settings']['max_wait_ms']:g} ms; {doc['settings']['seconds']:g} s timed "
             f"after {doc['settings']['warmup']:g} s warm-up; bundle: {doc['bundle']['how']}.", "",
             "| sources | batching | answers/s (total) | per source | latency p50 ms | latency p99 ms | CPU ms/answer | note |",
             "|---:|:---|---:|:---|---:|---:|---:|:---|"]
    for r in doc["runs"]:
        lat = r["latency_ms"] or {}
        per = ", ".join(f"{v:g}" for v in r["answers_per_s_per_source"].values())
        note = "sources limited the rate" if r["source_limited"] else ("" if r["health_ok"] else "errors, see JSON")
        lines.append(f"| {r['sources']} | {'on' if r['batching'] else 'off'} | {r['answers_per_s']:.2f} | {per} | "
                     f"{lat.get('p50', float('nan')):.1f} | {lat.get('p99', float('nan')):.1f} | "
                     f"{r['cpu_ms_per_answer'] if r['cpu_ms_per_answer'] is not None else '-'} | {note} |")
    v = doc["verdict"]
    flag = Trust.from_dict(v.get("trust")).flag()
    lines += ["", f"{v['sources']} sources (batched) vs 1 source: **{v['ratio']:.2f}x** total answers/s "
              f"(target >= {TARGET_RATIO:g}x: {'met' if v['met'] else 'NOT met'}). {flag}".rstrip() if v["ratio"] is not None
              else "ratio not available (a run had no answers)"]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".partial") as f:
        f.write(text)
    os.replace(f.name, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=None, help="an existing bundle (default: build edgevl-tiny INT8, else FP32)")
    p.add_argument("--precision", choices=("auto", "int8", "fp32"), default="auto")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--threads", type=int, default=None, help="per model part (default: the pipeline's, half the cores)")
    p.add_argument("--sources", type=int, default=4, help="the multi-camera case (default 4)")
    p.add_argument("--source-fps", type=float, default=120.0,
                   help="each camera's frame rate (default 120: above what one camera gets answered here)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed window per run (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="untimed seconds at the start of each run")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="image batcher wait (default: the pipeline's, 0)")
    p.add_argument("--option", action="append", help="runner option key=value (e.g. spinning=0)")
    p.add_argument("--no-reference", action="store_true", help="skip the N-sources-without-batching run")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "edgevl-bench-streams"))
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", default="streams")
    args = p.parse_args(argv)

    from edgevl.benchmarks.machine import load_now, machine_info
    from edgevl.pipelines.stream import default_threads

    load_before = load_now()        # before any of this run's own work: what others were doing
    args.threads = args.threads or default_threads()

    def log(msg):
        print(f"[streams] {msg}", file=sys.stderr, flush=True)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.bundle:
        from edgevl.bundle import load_bundle

        bundle, precision, how = Path(args.bundle), load_bundle(args.bundle).precision, f"given: {args.bundle}"
    else:
        bundle, precision, how = build_or_reuse_bundle(work, args.precision, args.backend, args.rebuild, log)
    cameras = make_cameras(work, args.sources, args.source_fps)
    scheduler = importlib.util.find_spec("edgevl.runtimes.scheduler") is not None
    cases = [([cameras[0]], False), (cameras, scheduler)]
    if scheduler and not args.no_reference:
        cases.append((cameras, False))
    runs = []
    for cams, batching in cases:
        log(f"{len(cams)} source(s), batching {'on' if batching else 'off'}: {args.warmup + args.seconds:g} s")
        runs.append(run_case(bundle, cams, batching, args))
        r = runs[-1]
        log(f"  {r['answers_per_s']:.2f} answers/s, latency p50 {(r['latency_ms'] or {}).get('p50')} ms "
            f"p99 {(r['latency_ms'] or {}).get('p99')} ms, {r['cpu_ms_per_answer']} CPU ms per answer")
        time.sleep(1.0)               # let ONNX Runtime's spinning threads settle between runs
    one, many = runs[0]["answers_per_s"], runs[1]["answers_per_s"]
    ratio = many / one if one else None
    doc = {
        "benchmark": "streams", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
        "bundle": {"model": "edgevl-tiny", "precision": precision, "path": str(bundle), "how": how},
        "settings": {k: getattr(args, k) for k in ("backend", "threads", "sources", "source_fps", "seconds",
                                                   "warmup", "prompt", "max_batch", "max_wait_ms", "option")},
        "runs": runs,
        "verdict": {"sources": args.sources, "ratio": round(ratio, 3) if ratio else None,
                    "target": TARGET_RATIO, "met": bool(ratio and ratio >= TARGET_RATIO),
                    "batching_available": scheduler,
                    # one timed window per run: no spread to check; the load after measuring counts this
                    # run's own pipeline threads (they may outnumber the cores), so only the start's load
                    "trust": judge({}, load_before=load_before, load_after=None).to_dict()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / f"{args.name}.json", json.dumps(doc, indent=2) + "\n")
    _atomic_write(out / f"{args.name}.md", markdown(doc))
    print(markdown(doc))
    log(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
