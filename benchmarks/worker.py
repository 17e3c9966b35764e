"""One benchmark worker process: loads one subject and measures it when told to.

Run as ``python -m edgevl.benchmarks.worker``; it speaks JSON lines on stdin/stdout with the
orchestrator (orchestrate.py), one reply per request:

    {"cmd": "load", "subject": {...}, "settings": {...}}  -> {"ok": true, "facts": {...}}
    {"cmd": "round", "batch": B, "index": i, "budget_s": s} -> {"ok": true, "samples": {...}}
    {"cmd": "rss"}                                       -> {"ok": true, "peak_rss_mb": ...}
    {"cmd": "finish", "accuracy_scenes": n}              -> {"ok": true, "accuracy": ..., "overhead": ...}
    {"cmd": "quit"}                                      -> exits
    any failure                                          -> {"ok": false, "error": ..., "traceback": ...}

Being its own process is the point: its peak resident memory (``ru_maxrss``, what
``/usr/bin/time -v`` reports) is the variant's alone, and a crash fails one variant only.
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0      # Linux: KiB


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
        out["vision_ms"] = time_calls(lambda: subject.encode(pixels),
                                      Plan(warmup=warmup, min_runs=1, max_runs=10_000, budget_s=budget * vision_share))
        if generates:
            if warmup:
                subject.generate(images, s.prompt, s.new_tokens)
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
            at = {}
            for p in self.positions(steps):
                if warmup:
                    subject.decode_at(p, 2, batch)
                step_ms = subject.decode_at(p, steps, batch)[1:]      # the first step pays for new shapes
                at[str(p)] = [batch * 1e3 / ms for ms in step_ms]
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
