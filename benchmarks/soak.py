"""Soak run: minutes of mixed concurrent traffic through ``edgevl.load(..., batching=True)``,
checking that memory stays flat and that no request gets stuck.

    python -m edgevl.benchmarks.soak --duration 180                      # the committed run
    python -m edgevl.benchmarks.soak --duration 20 --out-dir /tmp/soak   # a quick check

Each client thread picks, at random (seeded), one of: generate (greedy or sampled, with or
without an image), stream and read to the end, stream and stop early (cancels the request
mid-generation), encode images, submit with a short deadline, submit then cancel, or a bad
request (wrong number of images: must be refused with InputError). Every request is tracked
from start to end.

Pass criteria (exit code 1 if any fails):
- RSS growth: the highest RSS in the last third of the run minus the highest RSS in the first
  third after warm-up stays within ``--rss-bound-mb`` (default 48 MB; the KV cache of 8 slots
  at full context is ~8 MB, metrics keep fixed-size windows, so steady traffic should not grow);
- no stuck request: none was outstanding longer than ``--stuck-after-s``, and after shutdown
  every request the clients started has ended;
- the scheduler's books balance: accepted = completed + failed + cancelled.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np

from edgevl.benchmarks.batching import atomic_write, find_bundle
from edgevl.errors import DeadlineExceeded, InputError, QueueFull

ACTIONS = ("generate", "generate_text_only", "generate_sampled", "stream_full", "stream_cancel", "encode",
           "deadline", "cancel", "bad_request")
# CancelledError covers RequestCancelled (a generation stopped mid-way) and future.cancel() while queued
EXPECTED_ERRORS = (DeadlineExceeded, CancelledError, QueueFull)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class Tracker:
    """Every request from start to end: outstanding ones and their ages, outcomes by kind."""

    def __init__(self):
        self.lock = threading.Lock()
        self.outstanding: dict[int, tuple[str, float]] = {}
        self.outcomes: Counter = Counter()
        self.unexpected: list[str] = []
        self.next_id = 0

    def start(self, action: str) -> int:
        with self.lock:
            self.next_id += 1
            self.outstanding[self.next_id] = (action, time.monotonic())
            return self.next_id

    def end(self, rid: int, outcome: str, unexpected: str | None = None) -> None:
        with self.lock:
            action, _ = self.outstanding.pop(rid)
            self.outcomes[f"{action}:{outcome}"] += 1
            if unexpected and len(self.unexpected) < 20:
                self.unexpected.append(f"{action}: {unexpected}")

    def oldest_age(self) -> float:
        with self.lock:
            now = time.monotonic()
            return max((now - t for _, t in self.outstanding.values()), default=0.0)


def make_inputs(n: int = 12):
    from edgevl.data.tasks import scene_qas
    from edgevl.data.world import make_scene, render

    scenes = [make_scene("test", i) for i in range(n)]
    return [(render(s), scene_qas(s)[i % 5].question) for i, s in enumerate(scenes)]


def one_action(vlm, action: str, rng: random.Random, inputs) -> None:
    image, question = inputs[rng.randrange(len(inputs))]
    n_new = rng.randint(1, 48)
    if action == "generate":
        vlm.generate(image, question, channels="rgb", max_new_tokens=n_new)
    elif action == "generate_text_only":
        vlm.generate(None, question, max_new_tokens=n_new)
    elif action == "generate_sampled":
        vlm.generate(image, question, channels="rgb", max_new_tokens=n_new, temperature=0.8, top_k=10,
                     seed=rng.randrange(1 << 30))
    elif action == "stream_full":
        "".join(vlm.stream(image, question, channels="rgb", max_new_tokens=n_new))
    elif action == "stream_cancel":
        stream = vlm.stream(image, question, channels="rgb", max_new_tokens=48)
        for i, _ in enumerate(stream):
            if i >= 1:
                break
        stream.close()
    elif action == "encode":
        vlm.encode_images([image] * rng.randint(1, 3), channels="rgb")
    elif action in ("deadline", "cancel"):
        pixels = vlm.pixels([image], "rgb")
        ids = vlm.engine.encode_prompt(question)
        params = vlm._params(max_new_tokens=48)
        future = vlm.scheduler.submit(ids, pixels, params, deadline_s=0.02 if action == "deadline" else None)
        if action == "cancel":
            time.sleep(rng.random() * 0.05)
            future.cancel()
        future.result()           # DeadlineExceeded / CancelledError are expected outcomes here
    elif action == "bad_request":
        try:
            vlm.scheduler.submit(vlm.engine.encode_prompt(question), None, vlm._params(max_new_tokens=4))
        except InputError:
            return
        raise AssertionError("a prompt with image tokens and no image was accepted")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--duration", type=float, default=180.0)
    p.add_argument("--warmup-fraction", type=float, default=0.2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-queue-size", type=int, default=64)
    p.add_argument("--rss-bound-mb", type=float, default=48.0)
    p.add_argument("--stuck-after-s", type=float, default=60.0)
    p.add_argument("--sample-s", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    import edgevl
    from edgevl.benchmarks.machine import machine_info

    tracker, stop = Tracker(), threading.Event()
    samples: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgevl-soak-") as tmp:
        vlm = edgevl.load(find_bundle(args.bundle, Path(tmp)), backend=args.backend, batching=True,
                          max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                          max_queue_size=args.max_queue_size, verbose=False)
        inputs = make_inputs()
        t0 = time.monotonic()

        def client(c: int):
            rng = random.Random(args.seed * 1000 + c)
            while not stop.is_set():
                action = rng.choice(ACTIONS)
                rid = tracker.start(action)
                try:
                    one_action(vlm, action, rng, inputs)
                except EXPECTED_ERRORS as e:
                    tracker.end(rid, type(e).__name__)
                except Exception as e:  # recorded as a failure of the soak
                    tracker.end(rid, type(e).__name__, f"{type(e).__name__}: {e}")
                else:
                    tracker.end(rid, "ok")

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
        [t.start() for t in threads]
        max_age = 0.0
        while time.monotonic() - t0 < args.duration:
            time.sleep(args.sample_s)
            age = tracker.oldest_age()
            max_age = max(max_age, age)
            stats = vlm.scheduler.stats()["scheduler"]
            samples.append({"t": round(time.monotonic() - t0, 2), "rss_mb": round(rss_mb(), 2),
                            "outstanding": len(tracker.outstanding), "oldest_s": round(age, 3),
                            "kv_capacity": vlm.scheduler.cache.capacity,
                            "completed": stats["counters"].get("completed", 0)})
        stop.set()
        [t.join(args.stuck_after_s) for t in threads]
        still_running = [t.name for t in threads if t.is_alive()]
        counters = vlm.scheduler.stats()["scheduler"]["counters"]
        health = vlm.scheduler.health()
        vlm.close()

    warm = args.duration * args.warmup_fraction
    after = [s for s in samples if s["t"] >= warm]
    third = max(1, len(after) // 3)
    baseline = max(s["rss_mb"] for s in after[:third]) if after else None
    final = max(s["rss_mb"] for s in after[-third:]) if after else None
    growth = None if baseline is None else round(final - baseline, 2)
    slope = None
    if len(after) >= 3:
        t = np.array([s["t"] for s in after])
        slope = round(float(np.polyfit(t, [s["rss_mb"] for s in after], 1)[0]) * 60, 3)
    resolved = counters.get("completed", 0) + counters.get("failed", 0) + counters.get("cancelled", 0)
    checks = {
        "rss_growth_within_bound": growth is not None and growth <= args.rss_bound_mb,
        "no_request_stuck": max_age <= args.stuck_after_s and not still_running and not tracker.outstanding,
        "scheduler_books_balance": counters.get("accepted", 0) == resolved,
        "no_unexpected_errors": not tracker.unexpected,
    }
    doc = {
        "benchmark": "soak", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m edgevl.benchmarks.soak", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(), "settings": vars(args),
        "requests": sum(tracker.outcomes.values()), "outcomes": dict(sorted(tracker.outcomes.items())),
        "unexpected_errors": tracker.unexpected, "scheduler_counters": counters, "health": health,
        "rss_mb": {"baseline": baseline, "final": final, "growth": growth, "bound": args.rss_bound_mb,
                   "slope_mb_per_min": slope},
        "oldest_request_s": round(max_age, 3), "checks": checks, "passed": all(checks.values()),
        "samples": samples,
    }
    out = Path(args.out_dir)
    atomic_write(out / f"soak-{args.backend}.json", json.dumps(doc, indent=1, default=str) + "\n")
    atomic_write(out / f"soak-{args.backend}.md", markdown(doc))
    print(markdown(doc), file=sys.stderr)
    return 0 if doc["passed"] else 1


def markdown(doc: dict) -> str:
    r, s, m = doc["rss_mb"], doc["settings"], doc["machine"]
    lines = [f"# Soak run ({s['backend']}, {s['duration']} s, {s['clients']} clients): "
             f"{'PASSED' if doc['passed'] else 'FAILED'}", "",
             f"- machine: {m.get('cpu')}, {m.get('cores')} cores, load average {[round(x, 2) for x in m.get('load_average') or []]}",
             f"- command: `{doc['command']}`",
             f"- requests: {doc['requests']}; oldest outstanding at any sample: {doc['oldest_request_s']} s "
             f"(limit {s['stuck_after_s']} s)",
             f"- RSS: {r['baseline']} MB after warm-up -> {r['final']} MB at the end, growth {r['growth']} MB "
             f"(bound {r['bound']} MB), trend {r['slope_mb_per_min']} MB/min",
             f"- scheduler counters: {doc['scheduler_counters']}", "", "| check | result |", "|---|---|"]
    lines += [f"| {k} | {'ok' if v else 'FAILED'} |" for k, v in doc["checks"].items()]
    lines += ["", "| outcome | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in doc["outcomes"].items()]
    if doc["unexpected_errors"]:
        lines += ["", "Unexpected errors:", *[f"- {e}" for e in doc["unexpected_errors"]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
