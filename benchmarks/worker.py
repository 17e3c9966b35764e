"""One benchmark worker process: loads one subject and measures it when told to.

Run as ``python -m edgevl.benchmarks.worker``; it speaks JSON lines on stdin/stdout with the
orchestrator (orchestrate.py), one reply per request:

    {"cmd": "load", "subject": {...}, "settings": {...}}  -> {"ok": true, "facts": {...}}
    {"cmd": "round", "batch": B, "index": i, "budget_s": s} -> {"ok": true, "samples": {...}}
    {"cmd": "rss"}                                       -> {"ok": true, "peak_rss_mb": ...}
    {"cmd": "finish", "accuracy_scenes": n}              -> {"ok": true, "accuracy": ..., "overhead": ...}
    {"cmd": "quit"}                                      -> exits
    any failure                                          -> {"ok": false, "error": ..., "traceback": ...}

Being its own process is the point: its peak resident memory (VmHWM, the number
``/usr/bin/time -v`` reports as maximum resident set size) is the variant's alone, and a crash fails one variant only.
Libraries print to stdout, so the protocol gets a private copy of fd 1 and fd 1 goes to stderr.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

from edgevl.benchmarks.stats import Plan, time_calls


def peak_rss_mb() -> float:
    """Peak resident memory of this process image, in MB.

    /proc's VmHWM, not ``ru_maxrss``: Linux carries the forking parent's resident size into a
    child's ``ru_maxrss`` across fork+exec, so a worker started by an orchestrator that had
    imported torch would report at least the orchestrator's memory. VmHWM belongs to the
    worker's own address space, which exec made fresh.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0                 # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # elsewhere: ru_maxrss (KiB on Linux)


def make_subject(spec: dict):
    kind, threads = spec["kind"], spec.get("threads")
    if kind == "edgevl":
        from edgevl.benchmarks.subject_edgevl import EdgeVLSubject

        return EdgeVLSubject(spec["bundle"], spec["backend"], spec["precision"], threads, spec.get("options"))
    if kind == "pytorch-tiny":
        from edgevl.benchmarks.subject_torch import TinyTorchSubject

        return TinyTorchSubject(spec["checkpoint"], "fp32", threads)
    if kind == "pytorch-hf":
        from edgevl.benchmarks.subject_hf import HFTorchSubject

        return HFTorchSubject(spec["checkpoint"], "fp32", threads)
    if kind == "fake":                      # tests: the protocol without any model
        from edgevl.benchmarks.subject_fake import FakeSubject

        return FakeSubject(spec.get("checkpoint", "fake"), spec.get("precision", "fp32"), threads, spec)
    raise ValueError(f"unknown subject kind {kind!r}")


def _warm_up(fn, calls: int, budget_s: float = 1.0) -> None:
    """Up to ``calls`` untimed calls, but stop after ``budget_s``: one call of a slow part (a
    512 px encoder at batch 8 takes seconds) already loads the kernels and caches."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
        if time.perf_counter() - start > budget_s:
            break


class Worker:
    def __init__(self):
        self.subject = None
        self.settings: dict = {}
        self.inputs: dict = {}              # batch -> (images, pixels)
        self.rounds_seen: set = set()

    def load(self, msg: dict) -> dict:
        from edgevl.benchmarks.variants import Settings

        self.settings = Settings.from_dict(msg.get("settings", {}))
        self.subject = make_subject(msg["subject"])
        self.subject.load()
        facts = {"load_ms": self.subject.load_ms, "max_position": self.subject.max_position(), "pid": os.getpid()}
        facts.update(self.subject.describe())
        return {"facts": facts, "peak_rss_mb": peak_rss_mb()}

    def _inputs(self, batch: int):
        if batch not in self.inputs:
            from edgevl.benchmarks.subject import scene_images

            images = scene_images(batch)
            self.inputs[batch] = (images, self.subject.pixels(images))
        return self.inputs[batch]

    def positions(self, steps: int) -> list[int]:
        """The asked positions, clamped so position + steps fits the model's context."""
        limit = self.subject.max_position() - steps - 1
        return sorted({min(p, limit) for p in self.settings.positions})

    def round(self, msg: dict) -> dict:
        s, subject = self.settings, self.subject
        batch, budget = int(msg["batch"]), float(msg.get("budget_s", 1.0))
        first = batch not in self.rounds_seen
        self.rounds_seen.add(batch)
        images, pixels = self._inputs(batch)
        warmup = s.warmup if first else 0
        out: dict = {"batch": batch}
        generates = batch in s.generate_batches
        vision_share = 0.4 if generates else 1.0
        encode = lambda: subject.encode(pixels)  # noqa: E731
        _warm_up(encode, warmup)
        out["vision_ms"] = time_calls(encode, Plan(warmup=0, min_runs=1, max_runs=10_000, budget_s=budget * vision_share))
        if generates:
            if warmup:                          # two tokens load both the prefill and the decode path
                subject.generate(images, s.prompt, 2)
            timings, spent = [], 0.0
            while not timings or spent < budget * 0.45:
                g = subject.generate(images, s.prompt, s.new_tokens)
                timings.append(g)
                spent += g.e2e_ms / 1e3
            out["ttft_ms"] = [g.ttft_ms for g in timings]
            out["e2e_ms"] = [g.e2e_ms for g in timings]
            out["decode_tok_s"] = [g.decode_tok_s for g in timings if g.decode_tok_s]
            out["prompt_tokens"] = timings[0].prompt_tokens
        if generates and s.positions and s.position_steps > 1:
            steps = s.position_steps
            at: dict = {}
            for p in self.positions(steps):
                if warmup:
                    subject.decode_at(p, 2, batch)
                step_ms = subject.decode_at(p, steps, batch)[1:]      # the first step pays for new shapes
                # tokens/s over the run of steps, like decode_tok_s (a per-step median would hide
                # the stalls a generation pays, and the two would not compare)
                at.setdefault(str(p), []).append(batch * len(step_ms) * 1e3 / sum(step_ms))
            out["decode_tok_s_at"] = at
        return {"samples": out}

    def finish(self, msg: dict) -> dict:
        result: dict = {"accuracy": None, "overhead": None}
        n = int(msg.get("accuracy_scenes", 0))
        answerer = self.subject.answerer() if n > 0 else None
        if answerer is not None:
            from edgevl.evaluate import evaluate

            t = time.perf_counter()
            acc = evaluate(answerer, n=n, split="test")
            result["accuracy"] = {"accuracy": acc["accuracy"], "by_task": acc["by_task"], "n_scenes": n,
                                  "seconds": round(time.perf_counter() - t, 2)}
        pairs = int(msg.get("overhead_pairs", 0))
        if pairs > 0:
            _, pixels = self._inputs(1)
            result["overhead"] = self.subject.vision_overhead(pixels, pairs)
        result["process_peak_rss_mb"] = peak_rss_mb()
        return result


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                           # anything a library prints goes to the log, not the protocol
    sys.stdout = sys.stderr
    worker = Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.get("cmd")
        if cmd == "quit":
            break
        try:
            reply = {"load": worker.load, "round": worker.round, "finish": worker.finish,
                     "rss": lambda m: {"peak_rss_mb": peak_rss_mb()}}[cmd](msg)
            reply["ok"] = True
        except Exception as e:             # reported to the orchestrator, which fails this variant only
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        proto.write(json.dumps(reply) + "\n")
    if worker.subject is not None:
        worker.subject.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
