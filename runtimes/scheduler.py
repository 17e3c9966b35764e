"""In-flight batching for generation: one batched decode step over every active sequence.

    scheduler = Scheduler(engine, max_batch_size=8, max_wait_ms=5, max_queue_size=256)
    future = scheduler.submit(ids, pixels, SamplingParams(max_new_tokens=32))   # -> token list
    for token in scheduler.stream(ids, pixels, params, timings): ...
    scheduler.shutdown()

A request goes through: **waiting** (counted against ``max_queue_size``; its images are being
encoded by a DynamicBatcher, so images of requests that arrive together share one vision
call) -> **active** (it owns slot ``i`` of one preallocated KVCache with ``max_batch_size``
slots; active slots are packed at the front) -> **done** (its slot is freed at once: the last
active slot is moved into the hole). One thread owns the decoder and the cache. Each loop:

1. drop waiting/active requests that were cancelled or ran past their deadline;
2. admit ready waiting requests into free slots, FIFO: merge text and image embeddings and
   prefill them into their slots (prompts of the same length in one call), then choose each
   one's first token;
3. run ONE ``engine.decode`` over slots ``[:n]``: every row at its own position (``past_len``
   per row), and choose each row's next token with its own sampler and seed.

Sequences never wait for each other: a request that arrives mid-generation joins at the next
step, and decode steps do not wait to fill (``max_wait_ms`` applies to image batching only).
Greedy tokens are the ones the sequence gives alone (tests/test_scheduler.py checks this on
every backend): rows are independent in the decoder, and a masked cache position adds an exact
zero to attention.

Every accepted request resolves exactly once: its tokens, its own error (a prefill that
fails), the error of the decode step it was in (that step's sequences fail, the scheduler goes
on), DeadlineExceeded (``deadline_s`` covers the whole request), RequestCancelled
(``future.cancel()`` or closing a stream, even mid-generation) or ShutdownError.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable, Iterator

import numpy as np

from edgevl.errors import ConfigError, DeadlineExceeded, InputError, QueueFull, RequestCancelled, ShutdownError
from edgevl.runtimes.batcher import DynamicBatcher
from edgevl.runtimes.engine import Engine
from edgevl.runtimes.metrics import ServingMetrics
from edgevl.runtimes.sampling import SamplingParams, choose
from edgevl.runtimes.sequence import Sequence

_END = object()


class GenerationFuture(Future):
    """A Future of one request's token list. ``cancel()`` also stops a running generation: it
    then resolves with RequestCancelled (a CancelledError) at the next decode step."""

    def __init__(self, notify: Callable[[], None]):
        super().__init__()
        self._notify = notify
        self.cancel_requested = False

    def cancel(self) -> bool:
        if super().cancel():
            self._notify()
            return True
        if self.done():
            return False
        self.cancel_requested = True
        self._notify()
        return True


class Scheduler:
    def __init__(self, engine: Engine, max_batch_size: int = 8, max_wait_ms: float = 5.0,
                 max_queue_size: int = 256, initial_capacity: int = 64, name: str = "scheduler",
                 after_tokens: Callable[[], None] | None = None):
        """``after_tokens``: called on the scheduler thread after each prefill and each decode
        step, once that step's tokens went to the requests' ``on_token`` (the engine process
        sends them to its server in one message from here)."""
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_size < 1:
            raise ConfigError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.engine, self.name, self.after_tokens = engine, name, after_tokens
        self.max_batch_size, self.max_queue_size = max_batch_size, max_queue_size
        self.initial_capacity = initial_capacity
        self.metrics = ServingMetrics(name)
        self.vision = DynamicBatcher(engine.encode_images, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                     max_queue_size=max_queue_size, name=f"{name}.vision")
        self.cache = engine.new_cache(slots=max_batch_size, capacity=initial_capacity)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._reserved = 0                          # places promised to submits encoding their images
        self._active: list[Sequence] = []           # row i of the batch owns cache slot i
        self._closed = False
        self._abort: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"edgevl-{name}", daemon=True)
        self._thread.start()

    # -- public surface ----------------------------------------------------------------------
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Images (B, 3, H, W) -> embeddings, batched with other callers' images."""
        return self.vision.submit(pixels).result()

    def submit(self, ids, pixels: np.ndarray | None, params: SamplingParams, timings: dict | None = None,
               on_token: Callable[[int], None] | None = None, deadline_s: float | None = None,
               block: bool = False, wait_s: float | None = None) -> GenerationFuture:
        """Queue one generation; returns a future of its new token ids (stop token excluded).

        ``on_token`` is called with each token as it is chosen (on the scheduler's thread: keep
        it quick). A full queue raises QueueFull, or with ``block=True`` waits up to ``wait_s``.
        """
        params = params.validate()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.engine.check_context(len(ids), params.max_new_tokens)
        self.engine.check_images(ids, pixels, self.name)
        now = time.monotonic()
        future = GenerationFuture(self._wake)
        seq = Sequence(ids, params, future, {} if timings is None else timings, on_token, now,
                       None if deadline_s is None else now + deadline_s,
                       stop=set(self.engine.eos_ids) | set(params.stop_token_ids))
        self._reserve(block, wait_s)
        try:
            if pixels is not None:
                seq.vision_future = self.vision.submit(pixels, deadline_s=deadline_s, block=block, wait_s=wait_s)
                seq.vision_future.add_done_callback(functools.partial(self._on_vision_done, seq))
        except BaseException:
            with self._cond:
                self._reserved -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._reserved -= 1
            self._waiting.append(seq)
            self.metrics.count("accepted")
            self.metrics.gauge("queue_depth", len(self._waiting))
            self._cond.notify_all()
        return future

    def stream(self, ids, pixels: np.ndarray | None, params: SamplingParams, timings: dict | None = None,
               deadline_s: float | None = None) -> Iterator[int]:
        """Yield new token ids as they are chosen; closing the iterator early cancels the request."""
        pipe: queue.SimpleQueue = queue.SimpleQueue()
        future = self.submit(ids, pixels, params, timings, on_token=pipe.put, deadline_s=deadline_s)
        future.add_done_callback(lambda _: pipe.put(_END))
        try:
            while (token := pipe.get()) is not _END:
                yield token
            future.result()          # the request's error, if it ended with one
        finally:
            if not future.done():
                future.cancel()

    def shutdown(self, wait: bool = True, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop accepting requests; finish every accepted one, or with ``cancel_pending`` fail
        them with ShutdownError. After ``timeout`` s, whatever is unfinished fails the same way."""
        with self._cond:
            self._closed = True
            if cancel_pending and self._abort is None:
                self._abort = ShutdownError(f"{self.name} was shut down with cancel_pending=True")
            self._cond.notify_all()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._cond:
                    if self._abort is None:
                        self._abort = ShutdownError(f"{self.name}: shutdown timed out after {timeout} s")
                    self._cond.notify_all()
                self._thread.join(timeout)
        self.vision.shutdown(wait=wait, cancel_pending=cancel_pending, timeout=timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def health(self) -> dict:
        return {"scheduler": self.metrics.health(self.alive and not self._closed), "vision": self.vision.health()}

    def stats(self) -> dict:
        return {"scheduler": self.metrics.snapshot(), "vision": self.vision.metrics.snapshot()}

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- submitting helpers ------------------------------------------------------------------
    def _reserve(self, block: bool, wait_s: float | None) -> None:
        """Count a new request against the queue bound. Requests that the next admission puts
        into free slots are not waiting for one: a slot freed by a finished request is handed to
        the oldest waiting request only at the scheduler's next loop, and a caller that answers
        "done" to its client at once (an HTTP server; Ray Serve's router, which then sends the
        next request to this replica) would otherwise see a full queue with a slot free."""
        with self._cond:
            until = None if wait_s is None else time.monotonic() + wait_s
            while not self._closed and len(self._waiting) + self._reserved >= \
                    self.max_queue_size + max(0, self.max_batch_size - len(self._active)):
                left = None if until is None else until - time.monotonic()
                if not block or (left is not None and left <= 0):
                    self.metrics.count("rejected")
                    raise QueueFull(f"{self.name}: {self.max_queue_size} requests are already waiting for a slot; "
                                    "retry later, submit with block=True, or raise max_queue_size")
                self._cond.wait(left)
            if self._closed:
                raise ShutdownError(str(self._abort) if self._abort else f"{self.name} is shut down")
            self._reserved += 1

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _on_vision_done(self, seq: Sequence, _future: Future) -> None:
        seq.timings["vision"] = (time.monotonic() - seq.submitted) * 1e3
        self._wake()

    # -- the scheduler thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                admit, failures, stop = self._collect()
                for seq, error in failures:
                    self._finish(seq, error=error)
                self._drop_active()
                if stop:
                    return
                self._admit(admit)
                self._drop_active()              # some finish at their first token
                self._tokens_out()
                if self._active:
                    self._step()
                    self._drop_active()
                    self._tokens_out()
                elif self.cache.capacity > self.initial_capacity:   # idle: give grown memory back
                    self.cache = self.engine.new_cache(slots=self.max_batch_size, capacity=self.initial_capacity)
        except BaseException as e:  # a bug here must not leave callers waiting forever
            self._die(e)
            logging.getLogger("edgevl").error("%s thread died; every pending request failed with ShutdownError",
                                              self.name, exc_info=e)

    def _tokens_out(self) -> None:
        if self.after_tokens is not None:
            self.after_tokens()

    def on_thread(self) -> bool:
        """Whether the caller runs on the scheduler thread (where ``on_token`` is called)."""
        return threading.current_thread() is self._thread

    def _collect(self) -> tuple[list[Sequence], list[tuple[Sequence, BaseException]], bool]:
        """Under the lock: waiting requests to fail, ready ones to admit, and whether to stop."""
        with self._cond:
            while True:
                now = time.monotonic()
                failures = []
                if self._abort is not None:
                    failures = [(s, self._abort) for s in list(self._waiting) + self._active]
                    self._waiting.clear()
                    for s in self._active:
                        s.leaving = True
                    return [], failures, True
                for seq in list(self._waiting):
                    error = self._waiting_error(seq, now)
                    if error is not None:
                        self._waiting.remove(seq)
                        failures.append((seq, error))
                admit = []
                free = self.max_batch_size - len(self._active)
                for seq in list(self._waiting):
                    if len(admit) >= free:
                        break
                    if seq.vision_future is None or seq.vision_future.done():
                        self._waiting.remove(seq)
                        admit.append(seq)
                self.metrics.gauge("queue_depth", len(self._waiting))
                if failures or admit or self._active:
                    self._cond.notify_all()       # room for blocked submitters
                    return admit, failures, False
                if self._closed and not self._waiting:
                    return [], [], True
                deadlines = [s.deadline for s in self._waiting if s.deadline is not None]
                self._cond.wait(None if not deadlines else max(0.0, min(deadlines) - now))

    def _waiting_error(self, seq: Sequence, now: float) -> BaseException | None:
        if seq.future.cancelled():
            return RequestCancelled("cancelled while waiting")     # resolved already; _finish just counts it
        if seq.deadline is not None and now >= seq.deadline:
            return self._deadline_error(seq, now, "waiting for a slot")
        vision = seq.vision_future
        if vision is not None and vision.done():
            if vision.cancelled():
                return RequestCancelled("its image encoding was cancelled")
            if vision.exception() is not None:      # the vision batch failed, or its deadline passed there
                return vision.exception()
        return None

    def _deadline_error(self, seq: Sequence, now: float, where: str) -> DeadlineExceeded:
        return DeadlineExceeded(f"{self.name}: request ran past its deadline of {(seq.deadline - seq.submitted):.3f} s "
                                f"while {where} ({len(seq.tokens)} tokens generated); give it a longer deadline, "
                                "fewer max_new_tokens, or add capacity")

    def _admit(self, admit: list[Sequence]) -> None:
        """Prefill newly admitted requests into the next free slots. Prompts of the same length
        (the same question about a new frame from each camera) share one prefill call."""
        ready: dict[int, list[Sequence]] = {}       # prompt length -> requests, FIFO
        for seq in admit:
            if not seq.future.set_running_or_notify_cancel():
                self._finish(seq, error=RequestCancelled("cancelled while waiting"))
                continue
            seq.admitted = time.monotonic()
            seq.timings["queue"] = (seq.admitted - seq.submitted) * 1e3
            self.metrics.observe_ms("queue_wait", seq.timings["queue"])
            try:
                embeds = None if seq.vision_future is None else seq.vision_future.result()
                seq.prompt_embeds = self.engine.merge(seq.ids, embeds)
            except Exception as e:  # only this request's prompt failed
                self._prefill_failed(seq, e)
                continue
            ready.setdefault(seq.prompt_embeds.shape[1], []).append(seq)
        for group in ready.values():
            self._prefill(group)

    def _prefill(self, group: list[Sequence]) -> None:
        first = len(self._active)
        try:
            logits = self.engine.prefill_rows(self.cache, first, np.concatenate([s.prompt_embeds for s in group]),
                                              np.stack([s.ids for s in group]))
        except Exception as e:
            for row in range(first, first + len(group)):
                self.cache.reset(row)
            if len(group) > 1:              # find the request at fault: each alone
                for seq in group:
                    self._prefill([seq])
            else:
                self._prefill_failed(group[0], e)
            return
        now = time.monotonic()
        for seq, row_logits in zip(group, logits):
            seq.prompt_embeds = None
            seq.timings["prefill"] = (now - seq.admitted) * 1e3
            self.metrics.observe_ms("prefill", seq.timings["prefill"])
            self._active.append(seq)
            self._advance(seq, row_logits)
        self.metrics.observe_size("prefill_batch", len(group))
        self.metrics.gauge("active", len(self._active))

    def _prefill_failed(self, seq: Sequence, error: Exception) -> None:
        seq.prompt_embeds = None
        self.metrics.record_error("prefill", error, 1)
        self._finish(seq, error=error)

    def _step(self) -> None:
        n = len(self._active)
        tokens = np.fromiter((s.next_token for s in self._active), dtype=np.int64, count=n)
        start = time.monotonic()
        try:
            logits = self.engine.decode(self.cache, n, tokens)
        except Exception as e:  # the step failed: its sequences fail, the scheduler serves on
            self.metrics.record_error("decode", e, n)
            for s in self._active:
                s.error, s.leaving = e, True
            return
        ms = (time.monotonic() - start) * 1e3
        self.metrics.observe_size("decode_batch", n)
        self.metrics.observe_ms("decode_step", ms)
        for i, seq in enumerate(self._active):
            seq.timings["decode_steps"].append(ms)
            self._advance(seq, logits[i])

    def _advance(self, seq: Sequence, logits: np.ndarray) -> None:
        """Choose the sequence's next token from its logits, exactly as generation.py does."""
        token = choose(logits, seq.params, seq.rng, seq.seen_array())
        if token in seq.stop:
            seq.timings["finish_reason"], seq.leaving = "stop", True
            return
        seq.tokens.append(token)
        if len(seq.tokens) == 1:
            self.metrics.observe_ms("time_to_first_token", (time.monotonic() - seq.submitted) * 1e3)
        if seq.on_token is not None:
            try:
                seq.on_token(token)
            except Exception as e:  # the caller's callback failed: that request ends with its error
                seq.error, seq.leaving = e, True
                return
        if len(seq.tokens) >= seq.params.max_new_tokens:
            seq.timings["finish_reason"], seq.leaving = "length", True
        else:
            seq.next_token = token

    def _drop_active(self) -> None:
        """Finish sequences that are done, cancelled or late, and pack the survivors' slots."""
        now = time.monotonic()
        for seq in self._active:
            if seq.leaving:
                continue
            if seq.future.cancel_requested:
                seq.error, seq.leaving = RequestCancelled(
                    f"cancelled after {len(seq.tokens)} tokens"), True
            elif seq.deadline is not None and now >= seq.deadline:
                seq.error, seq.leaving = self._deadline_error(seq, now, "generating"), True
        for row in sorted((i for i, s in enumerate(self._active) if s.leaving), reverse=True):
            seq, last = self._active[row], len(self._active) - 1
            if row != last:
                self.cache.move(last, row)
                self._active[row] = self._active[last]
            else:
                self.cache.reset(row)
            self._active.pop()
            self._finish(seq, error=seq.error)
        self.metrics.gauge("active", len(self._active))

    def _finish(self, seq: Sequence, error: BaseException | None = None) -> None:
        """Resolve a request's future exactly once (a cancelled one is only counted)."""
        if seq.finished:
            return
        seq.finished = True
        future = seq.future
        if seq.vision_future is not None and not seq.vision_future.done():
            seq.vision_future.cancel()
        if future.cancelled() or (not future.running() and not future.set_running_or_notify_cancel()):
            self.metrics.count("cancelled")
            return
        seq.timings.setdefault("decode_steps", [])
        latency = (time.monotonic() - seq.submitted) * 1e3
        self.metrics.observe_ms("latency", latency)
        if error is None:
            self.metrics.count("completed")
            self.metrics.count("tokens", len(seq.tokens))
            future.set_result(list(seq.tokens))
        else:
            seq.timings.setdefault("finish_reason", "error")
            if isinstance(error, RequestCancelled):
                self.metrics.count("cancelled")
            else:
                self.metrics.count("failed")
                self.metrics.count(f"failed.{type(error).__name__}")
            future.set_exception(error)

    def _die(self, error: BaseException) -> None:
        self.metrics.record_error("scheduler", error, len(self._waiting) + len(self._active))
        with self._cond:
            self._closed = True
            self._abort = ShutdownError(f"{self.name}: scheduler thread died: {type(error).__name__}: {error}")
            leftovers = list(self._waiting) + list(self._active)
            self._waiting.clear()
            self._active = []
            self._cond.notify_all()
        for seq in leftovers:
            self._finish(seq, error=self._abort)
        self.vision.shutdown(wait=False, cancel_pending=True)
