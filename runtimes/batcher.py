"""A dynamic batcher: many callers' requests grouped into one runner call, each with its own future.

    batcher = DynamicBatcher(engine.encode_images, max_batch_size=8, max_wait_ms=5, max_queue_size=256)
    future = batcher.submit(pixels)               # (n, 3, H, W) -> Future of (n, N, D)
    embeds = future.result()
    embeds = await batcher.submit_async(pixels)   # from asyncio
    batcher.shutdown()                            # finishes (or fails) everything accepted

Batching policy. One worker thread calls ``fn`` (runners are not guaranteed thread-safe, and
one call at a time is what lets a batch use every core). It takes the bucket (same trailing
shape, see edgevl.runtimes.collate) whose oldest request waited longest, once that bucket
holds ``max_batch_size`` rows or its oldest request has waited ``max_wait_ms``: so no request
waits more than ``max_wait_ms`` for company, and a full batch never waits at all. While ``fn``
runs, new requests queue up, so under load batches fill without any waiting.

Every accepted request resolves exactly once: a result, its batch's error (a runner that
raises fails only that batch, and the batcher goes on serving), DeadlineExceeded (its deadline
passed before it was dispatched; checked whenever the worker wakes, at the latest when the
running batch ends), CancelledError (``future.cancel()`` while queued; a dispatched request
cannot be taken back from a runner), or ShutdownError. Errors also go to ``metrics``/``health()``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from edgevl.errors import ConfigError, DeadlineExceeded, QueueFull, ShutdownError
from edgevl.runtimes.collate import StackByShape
from edgevl.runtimes.metrics import ServingMetrics


@dataclass(eq=False)
class _Request:
    item: Any
    rows: int
    key: Hashable
    future: Future
    enqueued: float                       # time.monotonic()
    deadline: float | None                # time.monotonic() by which it must be dispatched
    queued: bool = field(default=True)    # still in a bucket (guarded by the batcher's lock)


class DynamicBatcher:
    def __init__(self, fn: Callable[[Any], Any], max_batch_size: int = 8, max_wait_ms: float = 5.0,
                 max_queue_size: int = 256, *, collation: StackByShape | None = None, name: str = "batcher"):
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue_size < 1:
            raise ConfigError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.fn, self.name = fn, name
        self.max_batch_size, self.max_wait_s, self.max_queue_size = max_batch_size, max_wait_ms / 1e3, max_queue_size
        self.collation = collation or StackByShape()
        self.metrics = ServingMetrics(name)
        self._cond = threading.Condition()
        self._buckets: dict[Hashable, deque[_Request]] = {}
        self._bucket_rows: dict[Hashable, int] = {}
        self._queued = 0
        self._closed = False                      # no new requests
        self._abort: BaseException | None = None  # fail whatever is still queued, then stop
        self._inflight: list[_Request] = []
        self._thread = threading.Thread(target=self._run, name=f"edgevl-{name}", daemon=True)
        self._thread.start()

    # -- submitting --------------------------------------------------------------------------
    def submit(self, item: Any, deadline_s: float | None = None, block: bool = False,
               wait_s: float | None = None) -> Future:
        """Queue one request; returns its Future at once.

        ``deadline_s``: seconds from now by which it must be dispatched (else DeadlineExceeded).
        A full queue raises QueueFull, or with ``block=True`` waits up to ``wait_s`` seconds
        (None: as long as it takes) for room, then raises QueueFull.
        """
        rows = self.collation.rows(item)
        key = self.collation.key(item)
        now = time.monotonic()
        future: Future = Future()
        request = _Request(item, rows, key, future, now, None if deadline_s is None else now + deadline_s)
        with self._cond:
            if self._queued >= self.max_queue_size:
                if not block:
                    self.metrics.count("rejected")
                    raise QueueFull(f"{self.name}: queue is full ({self.max_queue_size} requests waiting); retry "
                                    "later, submit with block=True, or raise max_queue_size")
                until = None if wait_s is None else now + wait_s
                while self._queued >= self.max_queue_size and not self._closed:
                    left = None if until is None else until - time.monotonic()
                    if left is not None and left <= 0:
                        self.metrics.count("rejected")
                        raise QueueFull(f"{self.name}: queue stayed full ({self.max_queue_size} requests) for "
                                        f"{wait_s:.3f} s; retry later or raise max_queue_size")
                    self._cond.wait(left)
            if self._closed:
                raise ShutdownError(self._closed_message())
            request.enqueued = time.monotonic()
            self._buckets.setdefault(key, deque()).append(request)
            self._bucket_rows[key] = self._bucket_rows.get(key, 0) + rows
            self._queued += 1
            self.metrics.count("accepted")
            self.metrics.gauge("queue_depth", self._queued)
            self._cond.notify_all()
        future.add_done_callback(functools.partial(self._on_done, request))
        return future

    def __call__(self, item: Any, **kwargs) -> Any:
        """Submit and wait: the blocking form for one caller thread."""
        return self.submit(item, **kwargs).result()

    async def submit_async(self, item: Any, deadline_s: float | None = None, block: bool = False,
                           wait_s: float | None = None) -> Any:
        """Awaitable form; cancelling the awaiting task cancels the request if still queued."""
        if block:  # waiting for room must not stall the event loop
            loop = asyncio.get_running_loop()
            future = await loop.run_in_executor(None, functools.partial(self.submit, item, deadline_s, True, wait_s))
        else:
            future = self.submit(item, deadline_s)
        return await asyncio.wrap_future(future)

    def _on_done(self, request: _Request, future: Future) -> None:
        if future.cancelled():  # free its queue place now, not when the worker next wakes
            with self._cond:
                if self._unqueue(request):
                    self.metrics.count("cancelled")
                self._cond.notify_all()

    def _unqueue(self, request: _Request) -> bool:
        """Take a request out of its bucket (lock held). False if it had already left."""
        if not request.queued:
            return False
        request.queued = False
        bucket = self._buckets[request.key]
        bucket.remove(request)
        self._bucket_rows[request.key] -= request.rows
        if not bucket:
            del self._buckets[request.key], self._bucket_rows[request.key]
        self._queued -= 1
        self.metrics.gauge("queue_depth", self._queued)
        self._cond.notify_all()           # a blocked submitter may have room now
        return True

    # -- the worker --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                batch, failures, stop = self._take()
                for request, error in failures:
                    self._resolve(request, error=error)
                if batch:
                    self._execute(batch)
                if stop:
                    return
        except BaseException as e:  # a bug here must not leave callers waiting forever
            self._die(e)
            logging.getLogger("edgevl").error("%s thread died; every pending request failed with ShutdownError",
                                              self.name, exc_info=e)

    def _take(self) -> tuple[list[_Request], list[tuple[_Request, BaseException]], bool]:
        """Wait for a batch to be ready. Returns (batch, requests to fail, worker should stop)."""
        with self._cond:
            while True:
                now = time.monotonic()
                failures = self._expired(now)
                if self._abort is not None:
                    failures += [(r, self._abort) for r in self._drain_all()]
                    return [], failures, True
                if failures:
                    return [], failures, False
                if not self._queued:
                    if self._closed:
                        return [], [], True
                    self._cond.wait()
                    continue
                key, wake = self._ready_bucket(now)
                if key is not None:
                    return self._pop_batch(key), [], False
                self._cond.wait(max(0.0, wake - now))

    def _expired(self, now: float) -> list[tuple[_Request, BaseException]]:
        out = []
        for bucket in list(self._buckets.values()):
            # a cancelled one is left to its own callback (it is already resolved)
            for r in [r for r in bucket if r.deadline is not None and r.deadline <= now and not r.future.cancelled()]:
                self._unqueue(r)
                out.append((r, DeadlineExceeded(
                    f"{self.name}: request waited {(now - r.enqueued) * 1e3:.1f} ms in the queue, past its deadline "
                    f"of {(r.deadline - r.enqueued) * 1e3:.1f} ms; give it a longer deadline or add capacity")))
        return out

    def _ready_bucket(self, now: float) -> tuple[Hashable | None, float]:
        """The bucket to run now (oldest head first), else None and when to look again."""
        best, best_age, wake = None, None, float("inf")
        for key, bucket in self._buckets.items():
            head = bucket[0]
            fill_by = head.enqueued + self.max_wait_s
            if self._closed or self._bucket_rows[key] >= self.max_batch_size or fill_by <= now:
                if best is None or head.enqueued < best_age:
                    best, best_age = key, head.enqueued
            wake = min(wake, fill_by)
            wake = min(wake, min((r.deadline for r in bucket if r.deadline is not None), default=wake))
        return best, wake

    def _pop_batch(self, key: Hashable) -> list[_Request]:
        bucket, batch, rows = self._buckets[key], [], 0
        while bucket and (not batch or rows + bucket[0].rows <= self.max_batch_size):
            r = bucket[0]
            self._unqueue(r)
            if r.future.set_running_or_notify_cancel():   # False: cancelled while queued
                batch.append(r)
                rows += r.rows
            else:
                self.metrics.count("cancelled")
            if key not in self._buckets:
                break
        self._inflight = batch
        return batch

    def _execute(self, batch: list[_Request]) -> None:
        start = time.monotonic()
        for r in batch:
            self.metrics.observe_ms("queue_wait", (start - r.enqueued) * 1e3)
        self.metrics.observe_size("batch_rows", sum(r.rows for r in batch))
        self.metrics.observe_size("batch_requests", len(batch))
        try:
            output = self.fn(self.collation.collate([r.item for r in batch]))
            pieces = self.collation.split(output, [r.item for r in batch])
        except Exception as e:  # the runner failed this batch: only this batch's requests see it
            self.metrics.record_error("batch", e, len(batch))
            for r in batch:
                self._resolve(r, error=e)
        else:
            self.metrics.observe_ms("batch_run", (time.monotonic() - start) * 1e3)
            for r, piece in zip(batch, pieces):
                self._resolve(r, result=piece)
        self._inflight = []

    def _resolve(self, request: _Request, result: Any = None, error: BaseException | None = None) -> None:
        future = request.future
        if future.done():
            return
        # a queued request (failing on deadline or shutdown) may be cancelled by its caller at
        # this very moment: claiming it first makes exactly one of the two outcomes win
        if not future.running() and not future.set_running_or_notify_cancel():
            self.metrics.count("cancelled")
            return
        if error is None:
            future.set_result(result)
            self.metrics.count("completed")
        else:
            future.set_exception(error)
            self.metrics.count("failed")
            self.metrics.count(f"failed.{type(error).__name__}")
        self.metrics.observe_ms("latency", (time.monotonic() - request.enqueued) * 1e3)

    def _drain_all(self) -> list[_Request]:
        out = [r for bucket in self._buckets.values() for r in bucket]
        for r in out:
            self._unqueue(r)
        return out

    def _die(self, error: BaseException) -> None:
        self.metrics.record_error("worker", error, self._queued + len(self._inflight))
        with self._cond:
            self._closed = True
            self._abort = ShutdownError(f"{self.name}: worker thread died: {type(error).__name__}: {error}")
            leftovers = self._drain_all() + [r for r in self._inflight if not r.future.done()]
            self._cond.notify_all()
        for r in leftovers:
            self._resolve(r, error=self._abort)

    def _closed_message(self) -> str:
        if self._abort is not None:
            return str(self._abort)
        return f"{self.name} is shut down and accepts no new requests"

    # -- lifecycle ---------------------------------------------------------------------------
    def shutdown(self, wait: bool = True, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop accepting requests. Queued ones are run (without waiting for batches to fill),
        or with ``cancel_pending`` fail with ShutdownError. With ``wait``, block until the worker
        is done, at most ``timeout`` s: then whatever is still queued fails with ShutdownError
        (a batch already in the runner resolves when the runner returns)."""
        with self._cond:
            self._closed = True
            if cancel_pending and self._abort is None:
                self._abort = ShutdownError(f"{self.name} was shut down with cancel_pending=True before this "
                                            "request ran")
            self._cond.notify_all()
        if not wait or threading.current_thread() is self._thread:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                if self._abort is None:
                    self._abort = ShutdownError(f"{self.name}: shutdown timed out after {timeout} s before this "
                                                "request ran")
                self._cond.notify_all()
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return self._queued

    def health(self) -> dict:
        return self.metrics.health(self.alive and not self._closed)

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
