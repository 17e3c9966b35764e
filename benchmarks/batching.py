"""Dynamic batching benchmark: throughput and latency of vision encoding and of generation on
edgevl-tiny at concurrency 1, 2, 4, 8, 16, in one run.

    python -m edgevl.benchmarks.batching --backend onnxruntime            # the committed run
    python -m edgevl.benchmarks.batching --duration 0.5 --out-dir /tmp/b  # a quick check

Clients are closed-loop threads: each sends one request, waits for its answer, sends the next.
Every concurrency level gets a fresh batcher/scheduler (same settings), a warm-up, then a timed
window; throughput counts only work finished inside the window (for generation, tokens by the
time each was emitted), latency percentiles cover requests started inside it. The same levels
run for each ``--max-wait-ms`` value, which is the trade-off the README explains: waiting
buys fuller batches at low load and costs up to that much latency per request.

Generation uses ``--ignore-eos`` by default (as vLLM's throughput benchmarks do): every request
makes exactly ``--max-new-tokens`` tokens, so tokens/s compares equal work at every level (the
placeholder checkpoint otherwise stops after a token or two). The direct rows are the same work
without the batcher (one request at a time on the engine): the overhead the batcher adds at
concurrency 1.

Results: ``<out-dir>/batching-<backend>.json`` and ``.md``, with the machine (CPU model and
flags, cores, load average before and after: this machine is shared) and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgevl.benchmarks.trust import Trust, judge
from edgevl.runtimes.engine import Engine

TARGETS = {"vision": ("images/s", 1.5), "generation": ("tokens/s", 3.0)}   # c8 / c1 on the 2-core CPU


class IgnoreEosEngine(Engine):
    """Masks the stop tokens' logits so every request makes exactly max_new_tokens tokens."""

    def _mask(self, logits):
        logits = logits.copy()
        logits[..., list(self.eos_ids)] = -np.inf
        return logits

    def prefill(self, cache, slot, embeds, ids=None):
        return self._mask(super().prefill(cache, slot, embeds, ids))

    def decode(self, cache, n, tokens):
        return self._mask(super().decode(cache, n, tokens))


def percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    a = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "mean": round(float(a.mean()), 3)}


def closed_loop(clients: int, warmup_s: float, duration_s: float, one_request) -> dict:
    """Run ``clients`` threads that call ``one_request(client, window)`` back to back.

    ``one_request`` returns (latency_ms, [(unit_time, n_units), ...]); ``window`` is the
    (start, end) of the timed window in time.perf_counter() seconds.
    """
    start = time.perf_counter() + 0.05
    window = (start + warmup_s, start + warmup_s + duration_s)
    latencies: list[float] = []
    units: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int):
        while time.perf_counter() < start:
            time.sleep(0.001)
        while time.perf_counter() < window[1]:
            began = time.perf_counter()
            try:
                latency_ms, done = one_request(c, window)
            except Exception as e:  # counted and reported; a benchmark must not hide failures
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                if began >= window[0]:
                    latencies.append(latency_ms)
                units.extend(n for t, n in done if window[0] <= t <= window[1])

    cpu: list[float] = []

    def cpu_meter():     # process CPU seconds over the window: a check that survives a busy machine
        for edge in window:
            time.sleep(max(0.0, edge - time.perf_counter()))
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu.append(usage.ru_utime + usage.ru_stime)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    threads.append(threading.Thread(target=cpu_meter, daemon=True))
    [t.start() for t in threads]
    [t.join() for t in threads]
    cpu_s = cpu[1] - cpu[0]
    return {"units": float(sum(units)), "throughput": round(sum(units) / duration_s, 2),
            "per_cpu_second": round(sum(units) / cpu_s, 2) if cpu_s > 0 else None,
            "latency_ms": percentiles(latencies), "requests": len(latencies), "errors": len(errors),
            "first_errors": errors[:3]}


def vision_level(engine, pixels, clients, max_batch, max_wait_ms, warmup_s, duration_s) -> dict:
    from edgevl.runtimes.batcher import DynamicBatcher

    batcher = DynamicBatcher(engine.encode_images, max_batch_size=max_batch, max_wait_ms=max_wait_ms,
                             max_queue_size=4 * max(clients, max_batch), name="vision")

    def one(c, window):
        t = time.perf_counter()
        batcher.submit(pixels[c % len(pixels)]).result()
        end = time.perf_counter()
        return (end - t) * 1e3, [(end, 1)]

    try:
        row = closed_loop(clients, warmup_s, duration_s, one)
    finally:
        batcher.shutdown()
    hist = batcher.metrics.snapshot()["histograms"].get("batch_rows", {})
    row["mean_batch"] = round(sum(k * v for k, v in hist.items()) / max(1, sum(hist.values())), 2)
    return row


def generation_level(engine, requests, clients, max_batch, max_wait_ms, warmup_s, duration_s) -> dict:
    from edgevl.runtimes.scheduler import Scheduler

    scheduler = Scheduler(engine, max_batch_size=max_batch, max_wait_ms=max_wait_ms,
                          max_queue_size=4 * max(clients, max_batch))
    ttft: list[float] = []
    lock = threading.Lock()

    def one(c, window):
        ids, pixels, params = requests[c % len(requests)]
        times: list[float] = []
        t = time.perf_counter()
        scheduler.submit(ids, pixels, params, on_token=lambda _tok: times.append(time.perf_counter())).result()
        end = time.perf_counter()
        if times and t >= window[0]:
            with lock:
                ttft.append((times[0] - t) * 1e3)
        return (end - t) * 1e3, [(x, 1) for x in times]

    try:
        row = closed_loop(clients, warmup_s, duration_s, one)
    finally:
        scheduler.shutdown()
    hist = scheduler.metrics.snapshot()["histograms"].get("decode_batch", {})
    row["mean_batch"] = round(sum(k * v for k, v in hist.items()) / max(1, sum(hist.values())), 2)
    row["ttft_ms"] = percentiles(ttft)
    return row


def direct_vision(engine, pixels, warmup_s, duration_s) -> dict:
    def one(c, window):
        t = time.perf_counter()
        engine.encode_images(pixels[0])
        end = time.perf_counter()
        return (end - t) * 1e3, [(end, 1)]

    return closed_loop(1, warmup_s, duration_s, one)


def direct_generation(engine, requests, warmup_s, duration_s) -> dict:
    from edgevl.runtimes.generation import stream_tokens

    counter = iter(range(10 ** 9))

    def one(c, window):
        ids, pixels, params = requests[next(counter) % len(requests)]
        t = time.perf_counter()
        times = [time.perf_counter() for _ in stream_tokens(engine, ids, engine.encode_images(pixels), params)]
        return (time.perf_counter() - t) * 1e3, [(x, 1) for x in times]

    return closed_loop(1, warmup_s, duration_s, one)


def make_requests(engine, n: int, max_new_tokens: int):
    from edgevl.data.tasks import scene_qas
    from edgevl.data.world import make_scene, render
    from edgevl.preprocess import preprocess
    from edgevl.runtimes.sampling import SamplingParams

    out = []
    for i in range(n):
        scene = make_scene("test", i)
        pixels = preprocess(render(scene), engine.preprocess_spec, "rgb")
        ids = engine.encode_prompt(scene_qas(scene)[i % 5].question)
        out.append((ids, pixels, SamplingParams(max_new_tokens=max_new_tokens)))
    return out


def find_bundle(path: str | None, workdir: Path) -> Path:
    if path:
        return Path(path)
    from edgevl.exporters.export import export_model   # needs the export extra

    out = workdir / "edgevl-tiny-fp32"
    print(f"exporting edgevl-tiny to {out} (pass --bundle to reuse one)", file=sys.stderr)
    export_model("edgevl-tiny", out, log=lambda *a: None)
    return out


def speedups(rows: list[dict]) -> None:
    """Add each row's throughput (and work per CPU-second) relative to concurrency 1 with the
    same max_wait_ms. The CPU-normalised ratio is the one to trust on a busy machine."""
    for key, name in (("throughput", "speedup_vs_c1"), ("per_cpu_second", "cpu_speedup_vs_c1")):
        base = {r["max_wait_ms"]: r[key] for r in rows if r["concurrency"] == 1}
        for r in rows:
            b = base.get(r["max_wait_ms"])
            r[name] = round(r[key] / b, 2) if b and r[key] is not None else None


def check_targets(results: dict) -> list[dict]:
    out = []
    for workload, (unit, target) in TARGETS.items():
        for r in results[workload]:
            if r["concurrency"] == 8:
                out.append({"workload": workload, "max_wait_ms": r["max_wait_ms"], "unit": unit,
                            "speedup_c8_vs_c1": r["speedup_vs_c1"], "target": target,
                            "cpu_normalised_speedup": r["cpu_speedup_vs_c1"],
                            "met": r["speedup_vs_c1"] is not None and r["speedup_vs_c1"] >= target})
    return out


def markdown(doc: dict) -> str:
    m, s = doc["machine"], doc["settings"]
    lines = [f"# Dynamic batching on edgevl-tiny ({s['backend']})", "",
             f"- machine: {m.get('cpu')} (model {m.get('cpu_model_number')}), {m.get('cores')} cores, "
             f"flags {', '.join(m.get('flags', []))}; load average before {doc['load_before']}, after "
             f"{doc['load_after']}",
             f"- libraries: " + ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items()),
             f"- settings: max_batch_size {s['max_batch_size']}, max_wait_ms {s['max_wait_ms']}, "
             f"{s['duration_s']} s timed per level after {s['warmup_s']} s warm-up, generation "
             f"{s['max_new_tokens']} new tokens per request (ignore_eos={s['ignore_eos']}), engine threads "
             f"{s['threads'] or 'backend default'}, options {s['options'] or '{}'}",
             f"- command: `{doc['command']}`", ""]
    for workload, unit, extra in (("vision", "images/s", ""), ("generation", "tokens/s", " | TTFT p50 | TTFT p99")):
        d = doc["direct"][workload]
        lines += [f"## {workload}", "",
                  f"Direct (no batcher, one request at a time): {d['throughput']} {unit} ({d['per_cpu_second']} per CPU-s), latency p50 "
                  f"{d['latency_ms']['p50']} ms, p99 {d['latency_ms']['p99']} ms.", "",
                  f"| max_wait_ms | concurrency | {unit} | x c1 | latency p50 ms | latency p99 ms{extra} | mean batch "
                  f"| {unit.split('/')[0]} per CPU-s | errors |",
                  "|---|---|---|---|---|---|" + ("---|---|" if extra else "") + "---|---|---|"]
        for r in doc["results"][workload]:
            ttft = f" | {r['ttft_ms']['p50']} | {r['ttft_ms']['p99']}" if extra else ""
            lines.append(f"| {r['max_wait_ms']} | {r['concurrency']} | {r['throughput']} | {r['speedup_vs_c1']} | "
                         f"{r['latency_ms']['p50']} | {r['latency_ms']['p99']}{ttft} | {r['mean_batch']} | "
                         f"{r['per_cpu_second']} | {r['errors']} |")
        lines.append("")
    lines += ["## Targets (concurrency 8 vs 1, same max_wait_ms)", ""]
    trust = Trust.from_dict(doc.get("ratios_trust"))
    if not trust.ok:
        lines += [f"Every x c1 ratio above: {trust.flag()}", ""]
    lines += [f"- {target_line(t, trust)}" for t in doc["targets"]]
    return "\n".join(lines) + "\n"


def target_line(t: dict, trust: Trust) -> str:
    return (f"{t['workload']} (max_wait_ms {t['max_wait_ms']}): {t['speedup_c8_vs_c1']}x {t['unit']} "
            f"(target >= {t['target']}x): {'met' if t['met'] else 'NOT met'}; per CPU-second "
            f"{t['cpu_normalised_speedup']}x  {trust.flag()}").rstrip()


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_options(items) -> dict:
    options = {}
    for item in items or []:
        key, _, value = item.partition("=")
        options[key] = {"0": False, "false": False, "1": True, "true": True}.get(value.lower(), value)
    return options


def run_backend(args, backend: str, bundle, argv, load_at_start: float | None = None) -> dict:
    from edgevl.benchmarks.machine import machine_info

    levels = [int(x) for x in args.concurrency.split(",")]
    waits = [float(x) for x in args.max_wait_ms.split(",")]
    workloads = args.workloads.split(",")
    options = parse_options(args.option)
    load_before = [round(x, 2) for x in os.getloadavg()]
    load_at_start = load_before[0] if load_at_start is None else load_at_start
    engine_cls = IgnoreEosEngine if args.ignore_eos else Engine
    engine = engine_cls(bundle, backend, threads=args.threads, options=options).activate()
    requests = make_requests(engine, 16, args.max_new_tokens)
    pixels = [px for _, px, _ in requests]
    results: dict = {"vision": [], "generation": []}
    direct = {}
    if "vision" in workloads:
        direct["vision"] = direct_vision(engine, pixels, args.warmup, args.duration)
    if "generation" in workloads:
        direct["generation"] = direct_generation(engine, requests, args.warmup, args.duration)
    for wait in waits:
        for c in levels:
            for workload in workloads:
                run = vision_level if workload == "vision" else generation_level
                data = pixels if workload == "vision" else requests
                row = run(engine, data, c, args.max_batch_size, wait, args.warmup, args.duration)
                row.update(concurrency=c, max_wait_ms=wait)
                results[workload].append(row)
                print(f"{backend} {workload:10s} max_wait {wait:4g} ms  c={c:2d}  {row['throughput']:9.1f}/s  "
                      f"p50 {row['latency_ms']['p50']} ms  p99 {row['latency_ms']['p99']} ms  "
                      f"batch {row['mean_batch']}  per-CPU-s {row['per_cpu_second']}  errors {row['errors']}", file=sys.stderr)
    engine.close()
    for workload in workloads:
        speedups(results[workload])
    return {
        "benchmark": "batching", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m edgevl.benchmarks.batching", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(), "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {"backend": backend, "concurrency": levels, "max_wait_ms": waits,
                     "max_batch_size": args.max_batch_size, "duration_s": args.duration, "warmup_s": args.warmup,
                     "max_new_tokens": args.max_new_tokens, "ignore_eos": args.ignore_eos, "threads": args.threads,
                     "options": options, "bundle_precision": bundle.precision},
        "direct": direct, "results": results,
        "targets": check_targets(results) if set(workloads) == set(TARGETS) and 1 in levels and 8 in levels else [],
        # throughput ratios of timed windows: no spread to check; the load after measuring counts the
        # clients' own threads, so the load at the process's start (before any level ran) is what counts
        "ratios_trust": judge({}, load_before=load_at_start, load_after=None).to_dict(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="an edgevl-tiny bundle (default: export one to a temp dir)")
    p.add_argument("--backend", default="onnxruntime,openvino", help="comma list; one result file each")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--max-wait-ms", default="0,5", help="comma list: each value sweeps all levels")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--duration", type=float, default=5.0, help="timed seconds per level")
    p.add_argument("--warmup", type=float, default=1.0, help="untimed seconds per level")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--threads", type=int, default=None,
                   help="backend threads for every part (default: what edgevl.load(batching=True) uses, "
                        "edgevl.api.batching_threads())")
    p.add_argument("--option", action="append", help="runner option key=value (e.g. spinning=0)")
    p.add_argument("--workloads", default="vision,generation")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if args.threads is None:
        from edgevl.api import batching_threads

        args.threads = batching_threads()

    from edgevl.bundle import load_bundle
    from edgevl.runtimes.registry import is_installed

    out = Path(args.out_dir)
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgevl-batching-") as tmp:
        bundle = load_bundle(find_bundle(args.bundle, Path(tmp)))
        for backend in args.backend.split(","):
            if not is_installed(backend):
                print(f"skipping backend {backend}: not installed", file=sys.stderr)
                continue
            doc = run_backend(args, backend, bundle, argv, load_at_start)
            atomic_write(out / f"batching-{backend}.json", json.dumps(doc, indent=1) + "\n")
            if set(doc["direct"]) == {"vision", "generation"}:
                atomic_write(out / f"batching-{backend}.md", markdown(doc))
            for t in doc["targets"]:
                print(f"{backend} target {target_line(t, Trust.from_dict(doc['ratios_trust']))}", file=sys.stderr)
            print(f"wrote {out}/batching-{backend}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
