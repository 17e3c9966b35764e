"""From the scheduler's thread to the event loop: one request's tokens as awaitables, and its text.

The scheduler calls ``on_token`` on its own thread; ``Submission`` hands each token to the loop
through the loop's ``_Mailbox`` (the decode loop never waits for a slow client), and cancelling
it (a client that went away, a stop string that matched) frees the request's KV slot at the
scheduler's next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from typing import Callable

import numpy as np

from edgevl.runtimes.sampling import SamplingParams

_END = object()


class _Mailbox:
    """Tokens from the scheduler's thread to one event loop, one wake-up per burst: a decode step
    of 16 rows hands over 16 tokens, and ``call_soon_threadsafe`` per token would wake the loop
    (a write to its self-pipe) 16 times; here the first token of a burst schedules one flush and
    the rest join it."""

    _boxes: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _boxes_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False
        self.loop_thread = threading.get_ident()     # made by a Submission, on the loop's thread

    @classmethod
    def of(cls, loop) -> "_Mailbox":
        with cls._boxes_lock:
            box = cls._boxes.get(loop)
            if box is None:
                box = cls._boxes[loop] = cls(loop)
            return box

    def put(self, queue: asyncio.Queue, item) -> None:
        with self.lock:
            if not self.items and threading.get_ident() == self.loop_thread:
                queue.put_nowait(item)     # on the loop already (an engine process's tokens): no wake-up
                return
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:    # the loop is closed: nobody is listening any more
            with self.lock:
                self.items.clear()
                self.scheduled = False

    def _flush(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class Submission:
    """One request accepted by the scheduler. ``await next_token()`` -> a token id, or None at
    the end (raising the request's own error: DeadlineExceeded, a failed step...)."""

    def __init__(self, scheduler, ids: np.ndarray, pixels: np.ndarray | None, params: SamplingParams,
                 deadline_s: float | None):
        self.loop = asyncio.get_running_loop()
        self.mailbox = _Mailbox.of(self.loop)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.timings: dict = {}
        self.tokens: list[int] = []
        self.first_token_at: float | None = None           # time.monotonic()
        self.future = scheduler.submit(ids, pixels, params, self.timings, on_token=self._put,
                                       deadline_s=deadline_s)   # QueueFull / InputError raise here
        self.future.add_done_callback(lambda _: self._put(_END))

    def _put(self, item) -> None:
        self.mailbox.put(self.queue, item)

    async def next_token(self) -> int | None:
        return self._take(await self.queue.get())

    def take_nowait(self) -> int | None:
        """``next_token`` for a token already delivered (``queue`` not empty)."""
        return self._take(self.queue.get_nowait())

    def _take(self, item) -> int | None:
        if item is _END:
            self.queue.put_nowait(_END)        # later calls see the end too
            self.future.result()               # the request's error, if it ended with one
            return None
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.tokens.append(item)
        return item

    @property
    def finish_reason(self) -> str:
        return "stop" if self.timings.get("finish_reason") == "stop" else "length"

    def cancel(self) -> None:
        if not self.future.done():
            self.future.cancel()


class TextStream:
    """Tokens -> the answer's new text, piece by piece, with OpenAI ``stop`` strings.

    The whole sequence is decoded each time (as VLM.stream does: spaces and multi-byte characters
    stay right), and text that could still become a stop string is held back until it cannot.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode, self.stops = decode, stops
        self.tokens: list[int] = []
        self.text = ""           # decoded so far (stop string cut off once matched)
        self.sent = 0            # characters of self.text already returned
        self.stopped = False     # a stop string matched: generation should end

    def push(self, token: int) -> str:
        self.tokens.append(token)
        new = self.decode(self.tokens)
        if not new.startswith(self.text):      # a partial character resolved differently: keep what was sent
            new = self.text + new[len(self.text):] if len(new) > len(self.text) else self.text
        self.text = new
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held())

    def finish(self) -> str:
        return self._take(len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of the text that is the start of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        piece, self.sent = self.text[self.sent:upto], upto
        return piece
