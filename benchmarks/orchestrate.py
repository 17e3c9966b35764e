"""The benchmark run: prepare every variant, measure them interleaved, summarise.

For each model: prepare each setup (build or reuse its bundle; a failure fails that setup only),
start one worker process per setup and load it, then for each batch size run ``rounds`` rounds
in which every worker measures in turn (the starting worker rotates each round), pausing
between workers so one backend's spinning threads do not slow the next (MEASURED.md gotcha 2).
Drift of the shared machine then hits every variant alike, and ratios inside one run hold.
After each batch size every worker reports its peak resident memory so far, so a batch-1 row's
memory is read before any larger batch ran. Last, each worker measures accuracy and edgevl's
vision overhead (after the memory readings), reports its whole-life peak and exits.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgevl.benchmarks.variants import Plan, Setup

WORKER_CMD = [sys.executable, "-m", "edgevl.benchmarks.worker"]
LOAD_TIMEOUT_S = 3600.0     # a peer exports its model at first load (minutes for a 256M VLM on 2 cores)


class WorkerFailed(RuntimeError):
    pass


class WorkerProcess:
    """A worker subprocess and its JSON-lines channel."""

    def __init__(self, setup: Setup, spec: dict, log_dir: Path, timeout_s: float = 900.0):
        self.setup, self.spec, self.timeout_s = setup, spec, timeout_s
        safe = setup.key.replace("/", "_").replace(":", "_")
        self.log_path = Path(log_dir) / f"{safe}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = self.spec.get("command") or WORKER_CMD
        env = dict(os.environ, **self.spec.get("env", {}))
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1, env=env, cwd=self.spec.get("cwd"))

    def log_tail(self, lines: int = 12) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def request(self, msg: dict, timeout_s: float | None = None) -> dict:
        timeout_s = timeout_s or self.timeout_s
        if self.proc is None or self.proc.poll() is not None:
            raise WorkerFailed(f"worker is not running (exit code {self.proc.returncode if self.proc else None})")
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            code = self.proc.poll()
            why = f"exited with code {code}" if code is not None else f"gave no answer in {timeout_s:.0f} s"
            raise WorkerFailed(f"worker {why} during {msg.get('cmd')!r}; log {self.log_path}:\n{self.log_tail()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise WorkerFailed(f"{reply.get('error')} (during {msg.get('cmd')!r}; traceback in {self.log_path})")
        return reply

    def close(self) -> None:
        """Ask the worker to quit; kill it if it does not within 30 s."""
        if self.proc is None:
            if getattr(self, "_log", None):
                self._log.close()
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self._log):
            try:
                stream.close()
            except (BrokenPipeError, OSError):
                pass


@dataclass
class SetupRun:
    """Everything measured for one setup across all batches (raw samples; report.py summarises)."""

    setup: Setup
    spec: dict | None = None
    status: str = "ok"
    error: str | None = None
    prepared: dict = field(default_factory=dict)          # bundle path, reused?, build seconds
    facts: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)           # batch -> {metric: [values]}
    peak_rss_mb: dict = field(default_factory=dict)       # batch -> MB
    finish: dict = field(default_factory=dict)
    process_peak_rss_mb: float | None = None
    log: str | None = None
    failed_batch: int | None = None                       # rows of smaller batches keep their numbers

    def fail(self, error: str, batch: int | None = None) -> None:
        self.status, self.error, self.failed_batch = "failed", error, batch

    def add(self, batch: int, samples: dict) -> None:
        into = self.samples.setdefault(batch, {})
        for key, values in samples.items():
            if key == "decode_tok_s_at":
                at = into.setdefault(key, {})
                for pos, vals in values.items():
                    at.setdefault(pos, []).extend(vals)
            elif isinstance(values, list):
                into.setdefault(key, []).extend(values)
            else:
                into[key] = values


Prepare = Callable[[Setup], dict]       # setup -> worker subject spec (raises on failure)


def run_plan(plan: Plan, prepare: Prepare, log_dir: Path | None = None, progress: bool = True,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
             prepare_only: bool = False) -> list[SetupRun]:
    """Measure every setup of ``plan``; ``prepare_only`` builds (caches) bundles and stops."""
    s = plan.settings
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="edgevl-bench-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    n_batches = len(plan.batches)
    per_call = s.budget_s / max(1, len(plan.setups) * n_batches * s.rounds)
    total = len(plan.setups) * (1 if prepare_only else 3 + n_batches * s.rounds)
    bar = _progress(total, progress)
    runs: list[SetupRun] = []
    try:
        for model in plan.models():
            group = [SetupRun(setup) for setup in plan.setups if setup.model == model]
            runs += group
            _measure_group(group, plan, prepare, log_dir, per_call, bar, log, prepare_only)
    finally:
        bar.close()
    return runs


def _measure_group(group: list[SetupRun], plan: Plan, prepare: Prepare, log_dir: Path, per_call: float, bar, log,
                   prepare_only: bool = False):
    s = plan.settings
    workers: dict[str, WorkerProcess] = {}
    for run in group:
        bar.set_postfix_str(f"prepare {run.setup.key}")
        try:
            t = time.perf_counter()
            run.spec = prepare(run.setup)
            run.prepared = {**run.spec.get("prepared", {}), "prepare_s": round(time.perf_counter() - t, 2)}
        except Exception as e:                      # a build that fails fails its variant only
            run.fail(f"build failed: {type(e).__name__}: {e}")
            log(f"bench: {run.setup.key}: {run.error}")
        bar.update(1)
    if prepare_only:
        for run in group:       # peers in their own venv export at load: do that once now too
            if run.status == "ok" and run.spec.get("kind") == "venv-peer":
                worker = WorkerProcess(run.setup, run.spec, log_dir)
                try:
                    worker.start()
                    worker.request({"cmd": "load", "subject": run.spec, "settings": s.to_dict()},
                                   timeout_s=LOAD_TIMEOUT_S)
                except (WorkerFailed, OSError) as e:
                    run.fail(f"load failed: {e}")
                    log(f"bench: {run.setup.key}: {run.error}")
                finally:
                    worker.close()
        return
    try:
        for run in group:
            bar.set_postfix_str(f"load {run.setup.key}")
            if run.status == "ok":
                worker = WorkerProcess(run.setup, run.spec, log_dir)
                run.log = str(worker.log_path)
                try:
                    worker.start()
                    reply = worker.request({"cmd": "load", "subject": run.spec, "settings": s.to_dict()},
                                           timeout_s=LOAD_TIMEOUT_S)
                    run.facts = reply["facts"]
                    workers[run.setup.key] = worker
                except (WorkerFailed, OSError) as e:
                    run.fail(f"load failed: {e}")
                    log(f"bench: {run.setup.key}: {run.error}")
                    worker.close()
            bar.update(1)
        for batch in plan.batches:
            for index in range(s.rounds):
                live = [r for r in group if r.setup.key in workers]
                shift = index % max(1, len(live))
                for run in live[shift:] + live[:shift]:
                    bar.set_postfix_str(f"b{batch} round {index + 1}/{s.rounds} {run.setup.key}")
                    worker = workers.get(run.setup.key)
                    if worker is not None:
                        try:
                            reply = worker.request({"cmd": "round", "batch": batch, "index": index,
                                                    "budget_s": per_call})
                            run.add(batch, reply["samples"])
                        except WorkerFailed as e:
                            run.fail(f"measuring batch {batch} failed: {e}", batch)
                            log(f"bench: {run.setup.key}: {run.error}")
                            workers.pop(run.setup.key).close()
                        time.sleep(s.pause_s)
                    bar.update(1)
                bar.update(len(group) - len(live))
            for key, worker in list(workers.items()):
                run = next(r for r in group if r.setup.key == key)
                try:
                    run.peak_rss_mb[batch] = worker.request({"cmd": "rss"})["peak_rss_mb"]
                except WorkerFailed as e:
                    run.fail(f"reading memory failed: {e}", batch)
                    workers.pop(key).close()
        for run in group:
            bar.set_postfix_str(f"accuracy/overhead {run.setup.key}")
            worker = workers.get(run.setup.key)
            if worker is not None:
                try:
                    scenes = s.accuracy_scenes if run.spec.get("accuracy", True) else 0
                    run.finish = worker.request({"cmd": "finish", "accuracy_scenes": scenes,
                                                 "overhead_pairs": s.overhead_pairs})
                    run.process_peak_rss_mb = run.finish.get("process_peak_rss_mb")
                except WorkerFailed as e:           # measurements so far stand; the extra is missing
                    run.finish = {"error": str(e)}
                    log(f"bench: {run.setup.key}: accuracy/overhead failed: {e}")
            bar.update(1)
    finally:
        for run in group:
            worker = workers.pop(run.setup.key, None)
            if worker is not None:
                worker.close()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="edgevl bench", unit="step", file=sys.stderr, dynamic_ncols=True)
