"""The stream pipeline: sources -> capture threads -> one-frame slots -> workers -> model -> sinks.

    capture thread (per source)   read, stamp, gate (--fps/--every), latest frame wins
    worker (per source)           change check, VLM.generate (preprocess once, batched across
                                  sources by the scheduler when the VLM was loaded with batching)
    sink thread (one)             console, JSONL, video, window, callbacks, in answer order

Every queue is bounded; every thread reports its faults to ``Health``; stopping (end of all
sources, a duration, ``stop()``, Ctrl-C) lets answers in flight finish, then flushes and closes
the sinks, then writes the metrics. A second Ctrl-C stops waiting for answers in flight but
still closes the outputs.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgevl.errors import ConfigError
from edgevl.pipelines.capture import CaptureThread, FrameSlot, Reconnect
from edgevl.pipelines.health import Health
from edgevl.pipelines.metrics import SourceStats, format_metrics, totals
from edgevl.pipelines.policy import FramePolicy
from edgevl.pipelines.sinks import Sink
from edgevl.pipelines.sources import Source, unique_names
from edgevl.pipelines.worker import SourceWorker

_END = object()                     # tells the sink thread that no more answers will come


@dataclass
class StreamReport:
    metrics: dict

    @property
    def ok(self) -> bool:
        return bool(self.metrics["health"]["ok"])

    @property
    def sources(self) -> dict:
        return self.metrics["sources"]

    @property
    def total(self) -> dict:
        return self.metrics["total"]

    def table(self) -> str:
        return format_metrics(self.metrics)


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: folder {path.parent} does not exist")
    temp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    temp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temp, path)


class StreamPipeline:
    def __init__(self, vlm, sources: list[Source], prompt: str, policy: FramePolicy = FramePolicy(),
                 sinks: list[Sink] = (), pace: str | None = None, loop: bool = False,
                 reconnect: Reconnect = Reconnect(), playback_fps: float | None = None, sampling: dict | None = None,
                 metrics_path: str | Path | None = None, health: Health | None = None, result_queue_size: int = 32,
                 stop_timeout: float = 30.0, info: dict | None = None):
        if not sources:
            raise ConfigError("no sources given; pass at least one --source")
        if not prompt or not prompt.strip():
            raise ConfigError("empty prompt; pass --prompt TEXT")
        unique_names(list(sources))
        self.vlm, self.sources, self.prompt, self.policy = vlm, list(sources), prompt, policy
        self.sinks, self.pace, self.loop, self.reconnect = list(sinks), pace, loop, reconnect
        self.playback_fps, self.sampling, self.metrics_path = playback_fps, dict(sampling or {}), metrics_path
        self.health = health or Health()
        self.stop_timeout, self.info = stop_timeout, dict(info or {})
        self.results: queue.Queue = queue.Queue(maxsize=result_queue_size)
        self._stop = threading.Event()
        self._forced = False
        self.stop_reason: str | None = None
        self.stats = {s.name: SourceStats(s.name) for s in self.sources}
        self.slots = {s.name: FrameSlot() for s in self.sources}
        self.captures: list[CaptureThread] = []
        self.workers: list[SourceWorker] = []
        self._sink_thread: threading.Thread | None = None
        self._active_sinks: list[Sink] = []
        self._started = self._finished = None
        self._started_at = None
        self._report: StreamReport | None = None

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> "StreamPipeline":
        opened = []
        try:
            for s in self.sources:
                self.health.set_state(f"source:{s.name}", "opening")
                s.open()
                opened.append(s)
        except BaseException:
            for s in opened:
                s.close()
            raise
        keep_frames = any(sink.needs_frames for sink in self.sinks)
        for sink in self.sinks:
            sink.start({s.name: {"fps": self._answer_rate(s)} for s in self.sources}, self.stop)
        self._active_sinks = list(self.sinks)
        self._sink_thread = threading.Thread(target=self._run_sinks, name="sinks", daemon=True)
        self._sink_thread.start()
        self._started, self._started_at = time.perf_counter(), time.time()
        for s in self.sources:
            pace = self.pace or ("live" if s.live else "realtime")
            self.stats[s.name].mark_started()
            self.captures.append(CaptureThread(s, self.slots[s.name], self.policy.gate(), self.stats[s.name],
                                               self.health, self._stop, pace, self.reconnect, self.loop,
                                               self.playback_fps))
            self.workers.append(SourceWorker(self.vlm, s.name, self.prompt, self.slots[s.name], self.results,
                                             self.stats[s.name], self.health, self._stop, self.policy.detector(),
                                             self.sampling, keep_frames, self._sink_thread.is_alive))
        for t in self.workers + self.captures:
            t.start()
        return self

    def stop(self) -> None:
        """Ask the pipeline to stop (thread-safe; returns at once; ``wait`` returns the report)."""
        self.stop_reason = self.stop_reason or "requested"
        self._stop.set()

    def wait(self, duration: float | None = None) -> StreamReport:
        """Block until every source ended, ``duration`` seconds passed, ``stop()`` or Ctrl-C."""
        deadline = None if duration is None else time.perf_counter() + duration
        try:
            while any(w.is_alive() for w in self.workers) and not self._stop.is_set():
                if deadline is not None and time.perf_counter() >= deadline:
                    self.stop_reason = "duration"
                    break
                self._stop.wait(0.05)
            else:
                self.stop_reason = self.stop_reason or "sources ended"
        except KeyboardInterrupt:
            self.stop_reason = "interrupted"
        return self.finish()

    def run(self, duration: float | None = None) -> StreamReport:
        self.start()
        return self.wait(duration)

    # -- internals -----------------------------------------------------------------------------
    def _answer_rate(self, s: Source) -> float:
        """How many answers per second of stream time a source yields: the video sink's frame rate."""
        base = self.playback_fps or s.fps or 30.0
        if self.policy.fps:
            return min(self.policy.fps, base)
        if self.policy.every:
            return max(1.0, base / self.policy.every)
        return base

    def _run_sinks(self) -> None:
        while True:
            item = self.results.get()
            if item is _END:
                break
            for sink in list(self._active_sinks):
                try:
                    sink.write(item)
                except Exception as e:
                    self._active_sinks.remove(sink)
                    self.health.error(f"sink:{sink.name}", "sink_error", f"{sink.name} sink failed and was switched "
                                      f"off: {e}", e)
        for sink in self.sinks:
            try:
                sink.close()
                self.health.set_state(f"sink:{sink.name}", "closed")
            except Exception as e:
                self.health.error(f"sink:{sink.name}", "close_error", f"{sink.name} sink could not be closed: {e}", e)

    def _on_second_interrupt(self, signum, frame) -> None:
        self._forced = True
        print("edgevl: stopping without waiting for answers in flight; still closing the outputs",
              file=sys.stderr, flush=True)

    def _join(self, threads, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        for t in threads:
            while t.is_alive() and not self._forced and time.perf_counter() < deadline:
                t.join(0.05)

    def finish(self) -> StreamReport:
        """Stop, let answers in flight finish, close the sinks, write the metrics (once)."""
        if self._report is not None:
            return self._report
        self._stop.set()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_second_interrupt)
        try:
            self._join(self.workers, self.stop_timeout)       # answers in flight finish and reach the sinks
            self._join(self.captures, 2.0)                     # a blocked network read cannot hold us
            for name, slot in self.slots.items():
                if slot.clear() is not None:
                    self.stats[name].count("dropped_stale")
            for w in self.workers:
                if w.is_alive():
                    self.health.warning(w.component, "abandoned", "an answer was still in flight at shutdown")
            self.results.put(_END)
            if self._sink_thread is not None:
                self._sink_thread.join()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        self._finished = time.perf_counter()
        metrics = self.metrics()
        self._report = StreamReport(metrics)
        if self.metrics_path is not None:
            write_json_atomic(self.metrics_path, metrics)
        return self._report

    def metrics(self) -> dict:
        until = self._finished or time.perf_counter()
        per_source = {}
        for s, cap in zip(self.sources, self.captures or [None] * len(self.sources)):
            per_source[s.name] = {"kind": s.kind, "target": s.target, "pace": cap.pace if cap else None,
                                  **self.stats[s.name].to_dict(until)}
        latencies = [v for st in self.stats.values() for v in st.latencies_ms]
        return {
            "prompt": self.prompt,
            "policy": {"fps": self.policy.fps, "every": self.policy.every,
                       "skip_unchanged": self.policy.skip_unchanged, "description": self.policy.describe()},
            **self.info,
            "started_at": self._started_at,
            "elapsed_s": round(until - self._started, 3) if self._started else 0.0,
            "stop_reason": self.stop_reason,
            "sources": per_source,
            "total": totals(per_source, latencies),
            "sinks": {sink.name: sink.summary() for sink in self.sinks},
            "health": self.health.to_dict(),
        }


def _print_event(event) -> None:
    print(f"edgevl stream: {event.line()}", file=sys.stderr, flush=True)


def run_stream(bundle_or_vlm, sources, prompt: str, *, fps: float | None = None, every: int | None = None,
               skip_unchanged: float | None = None, jsonl=None, video=None, metrics=None, console: bool = True,
               verbose: bool | None = None, window: bool = False, sinks: list[Sink] = (), backend: str | None = None, threads: int | None = None,
               batching: bool | None = None, max_batch_size: int = 8, max_wait_ms: float = 0.0,
               no_drop: bool = False, loop: bool = False, playback_fps: float | None = None,
               reconnect: Reconnect = Reconnect(), duration: float | None = None, folder_fps: float = 5.0,
               **sampling) -> StreamReport:
    """Answer ``prompt`` about frames of one or more ``sources`` until they end, ``duration``
    seconds pass, or Ctrl-C; returns the report (also written to ``metrics`` as JSON).

    ``bundle_or_vlm``: a bundle directory (loaded here, with batching across sources when there
    are several and the scheduler is installed) or a ``VLM`` from ``edgevl.load`` (used as is).
    ``sources``: ``--source`` strings (see ``parse_source``) or Source objects. ``no_drop``: read
    files and folders no faster than the model answers (every selected frame gets an answer).
    ``sampling``: generation options passed to ``VLM.generate`` (max_new_tokens, temperature, ...).
    ``console``: a live line per answer on stdout; ``verbose`` (default: as ``console``): health
    events on stderr as they happen and the metrics table at the end.
    """
    from edgevl.pipelines.sinks import ConsoleSink, JsonlSink, VideoSink, WindowSink
    from edgevl.pipelines.sources import parse_source

    if isinstance(sources, (str, Source)):
        sources = [sources]
    sources = [s if isinstance(s, Source) else parse_source(str(s), folder_fps=folder_fps) for s in sources]
    verbose = console if verbose is None else verbose
    policy = FramePolicy(fps=fps, every=every, skip_unchanged=skip_unchanged)
    health = Health()
    if verbose:
        health.listeners.append(_print_event)
    all_sinks: list[Sink] = list(sinks)
    opened: list[Sink] = []
    try:
        if console:
            all_sinks.append(ConsoleSink())
        if jsonl:
            opened.append(JsonlSink(jsonl))
        if video:
            opened.append(VideoSink(video))
        if window:
            ok, why = WindowSink.available()
            if ok:
                opened.append(WindowSink())
            else:
                health.warning("sink:window", "unavailable", f"--window ignored: {why}")
        all_sinks += opened
        owns_vlm = not hasattr(bundle_or_vlm, "generate")
        vlm, info = bundle_or_vlm, {}
        if owns_vlm:
            vlm, info = _load(bundle_or_vlm, backend, threads, batching, len(sources), max_batch_size, max_wait_ms,
                              verbose=verbose)
        else:
            info = {"backend": getattr(vlm, "backend", None),
                    "batching": {"enabled": getattr(vlm, "scheduler", None) is not None}}
    except BaseException:
        for sink in opened:
            sink.close()
        raise
    try:
        pipeline = StreamPipeline(vlm, sources, prompt, policy, all_sinks, pace="all" if no_drop else None, loop=loop,
                                  reconnect=reconnect, playback_fps=playback_fps, sampling=sampling,
                                  metrics_path=metrics, health=health, info=info)
        try:
            pipeline.start()
        except BaseException:
            for sink in opened:
                sink.close()
            raise
        try:
            if verbose:
                print(f"edgevl stream: {len(sources)} source(s): "
                      + ", ".join(f"{s.name} ({s.kind})" for s in pipeline.sources)
                      + f"; {policy.describe()}; Ctrl-C stops", file=sys.stderr, flush=True)
            report = pipeline.wait(duration)
        except KeyboardInterrupt:               # Ctrl-C outside wait()'s loop: still a clean stop
            pipeline.stop_reason = "interrupted"
            report = pipeline.finish()
        if verbose:
            print(report.table())
            if not report.ok:
                print("edgevl stream: problems were reported:", file=sys.stderr)
                for e in report.metrics["health"]["events"]:
                    if e["level"] == "error":
                        print(f"  {e['component']}: {e['message']}", file=sys.stderr)
        return report
    finally:
        if owns_vlm:
            vlm.close()


def default_threads() -> int:
    """Threads per model part in a stream pipeline: half the cores (``edgevl.api.half_the_cores``),
    batching or not. Capture, video decoding and preprocessing need the rest; with full-width
    ONNX Runtime pools, 4 cameras on 2 cores got 119 answers/s instead of 179, one camera 85
    instead of 98 (benchmarks/results/streams)."""
    from edgevl.api import half_the_cores

    return half_the_cores()


def _load(bundle, backend, threads, batching, n_sources, max_batch_size, max_wait_ms, verbose):
    import importlib.util

    import edgevl

    scheduler_installed = importlib.util.find_spec("edgevl.runtimes.scheduler") is not None
    note = None
    if batching is None:
        batching = n_sources > 1 and scheduler_installed
        if n_sources > 1 and not scheduler_installed:
            note = "batching off: edgevl.runtimes.scheduler is not installed; sources take turns on one engine"
    elif batching and not scheduler_installed:
        raise ConfigError("batching was asked for but edgevl.runtimes.scheduler is not installed in this edgevl")
    if note and verbose:
        print(f"edgevl stream: {note}", file=sys.stderr)
    threads = default_threads() if threads is None else threads
    vlm = edgevl.load(bundle, backend=backend, threads=threads, batching=batching, max_batch_size=max_batch_size,
                      max_wait_ms=max_wait_ms, verbose=verbose)
    info = {"backend": vlm.backend, "bundle": str(bundle), "precision": vlm.bundle.precision, "threads": threads,
            "batching": {"enabled": bool(batching), "max_batch_size": max_batch_size if batching else None,
                         "max_wait_ms": max_wait_ms if batching else None, "note": note}}
    return vlm, info
