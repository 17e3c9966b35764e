"""The model in a process of its own, behind the same interface as an in-process VLM.

    vlm = RemoteVLM("out/tiny-int8", backend="onnxruntime", max_batch_size=16)   # starts the engine process
    app = create_app({"edgevl-tiny": vlm})                                       # app.py does not change
    vlm.close()                                                                  # drains it, then it exits

``edgevl serve`` runs each model this way by default (``--engine process``). With the scheduler in
the server's process, each decode step waited for the GIL while the event loop wrote server-sent
events: on edgevl-tiny with 16 streaming clients an HTTP step took 2.5-3.1 ms of wall time for
1.4-1.6 ms of CPU, 1.1 ms of it blocked (README section 9). vLLM splits its API server from its
engine core for the same reason.

- **Server process** (the caller): HTTP, image decoding and preprocessing, tokenization and
  detokenization (what app.py already did), and ``RemoteScheduler``, which sends each request to
  the engine process and hands the tokens that come back to the request's ``on_token``.
- **Engine process** (``_engine_main``): ``edgevl.load(bundle, batching=True)``, the vision batcher,
  the in-flight scheduler and the KV cache, unchanged.
- **The wire** (``pack``/``unpack``): two socket pairs, one per direction; each message is a JSON
  header plus raw numpy buffers (token ids, pixels). Nothing is pickled. The engine sends one
  message per prefill or decode step (its tokens, the requests that finished) from the scheduler
  thread itself (``Scheduler.after_tokens``); the server writes a command from the thread that
  makes it (the event loop, for submits and cancels) when the pipe takes it at once, and leaves
  the rest to a writer thread. Each thread hop these replace was a wait for the GIL in a busy
  process: without the two, ``serve_load``'s HTTP/in-process ratio went from 0.89-0.92 to
  0.94-1.00 in alternated 20-30 s runs (0.8.1, README section 9).
- **Queue bound**: the server process counts the requests it sent that have not finished and
  refuses one more than the scheduler holds (``max_queue_size + max_batch_size``) with QueueFull
  at once, no round trip; prompt and image checks also run before anything is sent.
- **Faults**: if the engine process dies, every pending request fails with ShutdownError and the
  model is not ready (``/ready`` answers 503); if the server process dies, the pipe closes and the
  engine process cancels what it holds and exits. The engine process ignores SIGINT and SIGTERM:
  the server drains its connections first, then closes the engine (``close``).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

import numpy as np

from edgevl import errors
from edgevl.errors import EdgeVLError, QueueFull, RequestCancelled, ShutdownError
from edgevl.runtimes.sampling import SamplingParams

_DTYPES = ("int64", "float32", "float16", "uint8")
_HEADER = struct.Struct("<I")
_MAX_HEADER = 16 << 20


class WireError(EdgeVLError):
    """A message between the server and its engine process that does not parse."""


def pack(header: dict, arrays: tuple | list = ()) -> bytes:
    """header (JSON-able) + arrays -> one message."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    for a in arrays:
        if a.dtype.name not in _DTYPES:
            raise WireError(f"arrays of dtype {a.dtype} do not cross to the engine process (only {', '.join(_DTYPES)})")
    head = json.dumps({**header, "arrays": [[a.dtype.name, list(a.shape)] for a in arrays]},
                      separators=(",", ":")).encode()
    return b"".join([_HEADER.pack(len(head)), head, *(a.tobytes() for a in arrays)])


def _frame(message: bytes) -> bytes:
    """A message framed as multiprocessing.connection frames it (a 4-byte big-endian length),
    for the engine's ``Connection.recv_bytes``."""
    if len(message) > 0x7FFFFFFF:
        raise WireError(f"a message of {len(message)} bytes (2 GB or more) does not cross to the engine process")
    return struct.pack("!i", len(message)) + message


def unpack(data: bytes) -> tuple[dict, list[np.ndarray]]:
    """One message -> (header, arrays); a malformed one raises WireError."""
    if len(data) < _HEADER.size:
        raise WireError(f"a message of {len(data)} bytes is shorter than its header")
    (n,) = _HEADER.unpack_from(data)
    if n > min(_MAX_HEADER, len(data) - _HEADER.size):
        raise WireError(f"a message declares a {n}-byte header in {len(data)} bytes")
    try:
        header = json.loads(data[_HEADER.size:_HEADER.size + n])
        specs = header.pop("arrays")
        offset, arrays = _HEADER.size + n, []
        for dtype, shape in specs:
            if dtype not in _DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise WireError(f"an array of dtype {dtype!r} and shape {shape!r}")
            count = int(np.prod(shape, dtype=np.int64))
            size = count * np.dtype(dtype).itemsize
            if offset + size > len(data):
                raise WireError(f"arrays run past the end of a {len(data)}-byte message")
            arrays.append(np.frombuffer(data, dtype, count, offset).reshape(shape))
            offset += size
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise WireError(f"a message that does not parse ({type(e).__name__}: {e})") from None
    if offset != len(data):
        raise WireError(f"{len(data) - offset} bytes follow the last array of a message")
    return header, arrays


# errors that cross the wire keep their class (app.py maps classes to HTTP statuses)
_ERRORS = {c.__name__: c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, EdgeVLError)}


def _describe(error: BaseException) -> list:
    return [type(error).__name__, str(error)]


def _rebuild(name: str, message: str) -> BaseException:
    try:
        return _ERRORS[name](message)
    except (KeyError, TypeError):            # not an edgevl error, or one built with other arguments
        return EdgeVLError(f"{name}: {message}")


# -- the engine process ----------------------------------------------------------------------
def _engine_main(commands_fd: int, events_fd: int) -> None:
    """The engine process (``python -m edgevl.serving.engine_process FD FD``): read what to load
    from the commands pipe, load it, say "ready" (or why not) on the events pipe, then serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C reaches the whole process group: the server
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # drains its connections first, then closes us
    commands, events = Connection(commands_fd), Connection(events_fd)
    try:
        spec, _ = unpack(commands.recv_bytes())
        sys.path.extend(p for p in spec.get("path", []) if p not in sys.path)   # on_load's module, as the server sees it
        import edgevl

        vlm = edgevl.load(spec["bundle"], batching=True, verbose=False, **spec["load"])
        if spec.get("on_load"):
            module, _, name = spec["on_load"].partition(":")
            getattr(importlib.import_module(module), name)(vlm)
    except (EOFError, OSError):
        return
    except BaseException as e:
        events.send_bytes(pack({"op": "failed", "error": _describe(e)}))
        return
    events.send_bytes(pack({"op": "ready", "backend": vlm.backend}))
    _EngineCore(vlm, commands, events).serve()


class _EngineCore:
    """Serves the commands pipe on the main thread. Events (tokens, finished requests, stats)
    collect in a list: those the scheduler thread makes go out in one message after each
    prefill and decode step (``Scheduler.after_tokens``), from that thread, with no thread hop;
    those made on any other thread go out at once."""

    def __init__(self, vlm, commands, events):
        self.vlm, self.commands, self.out, self.scheduler = vlm, commands, events, vlm.scheduler
        self.futures: dict[int, Future] = {}
        self.events: list = []
        self.lock = threading.Lock()          # the events list and the pipe
        self.closing = False                  # shutting down: the scheduler stopping is expected
        self.scheduler.after_tokens = self.flush
        threading.Thread(target=self._watch, name="edgevl-engine-watch", daemon=True).start()

    def emit(self, event: list) -> None:
        with self.lock:
            self.events.append(event)
        if not self.scheduler.on_thread():
            self.flush()

    def flush(self) -> None:
        """Send what was emitted as one message (never raises: a server that went away is
        seen by ``serve``, which then cancels everything and exits)."""
        with self.lock:
            if not self.events:
                return
            events, self.events = self.events, []
            try:
                self.out.send_bytes(pack({"op": "events", "events": events}))
            except OSError:
                pass

    def _watch(self) -> None:
        while not self.closing:
            if not self.scheduler.alive:
                error = self.scheduler.metrics.snapshot().get("last_error")
                self.emit(["x", f"the scheduler thread of the engine process stopped (last error: {error})"])
                return
            time.sleep(0.5)

    def serve(self) -> None:
        while True:
            try:
                header, arrays = unpack(self.commands.recv_bytes())
            except (EOFError, OSError, WireError):    # the server process went away: cancel, free, exit
                self._stop(cancel_pending=True)
                return
            op = header.get("op")
            if op == "submit":
                self._submit(header, arrays)
            elif op == "cancel":
                future = self.futures.get(header["rid"])
                if future is not None:
                    future.cancel()
            elif op == "stats":
                self.emit(["s", header["nonce"], {"scheduler": self.scheduler.metrics.snapshot(),
                                                  "alive": self.scheduler.alive}])
            elif op == "close":
                self._stop(cancel_pending=False, timeout=header.get("timeout_s"))
                return

    def _stop(self, cancel_pending: bool, timeout: float | None = None) -> None:
        self.closing = True
        self.scheduler.shutdown(wait=True, cancel_pending=cancel_pending, timeout=timeout)
        self.vlm.close()
        self.flush()                          # what finished during the drain is sent before we exit

    def _submit(self, header: dict, arrays: list) -> None:
        rid, timings, first = header["rid"], {}, [True]

        def on_token(token: int) -> None:
            if first[0]:
                first[0] = False
                self.emit(["t", rid, token, timings.get("queue")])
            else:
                self.emit(["t", rid, token])

        try:
            params = header["params"]
            params = SamplingParams(**{**params, "stop_token_ids": tuple(params.get("stop_token_ids", ()))})
            future = self.scheduler.submit(arrays[0], arrays[1] if len(arrays) > 1 else None, params, timings,
                                           on_token=on_token, deadline_s=header.get("deadline_s"),
                                           block=True, wait_s=5.0)
        except Exception as e:
            self.emit(["d", rid, None, *_describe(e)])
            return
        self.futures[rid] = future
        future.add_done_callback(lambda f: self._done(rid, f, timings))

    def _done(self, rid: int, future: Future, timings: dict) -> None:
        self.futures.pop(rid, None)
        error = RequestCancelled("cancelled") if future.cancelled() else future.exception()
        self.emit(["d", rid, timings.get("finish_reason"), *(_describe(error) if error else (None, None))])


# -- the server process ----------------------------------------------------------------------
class RemoteFuture(Future):
    """A request's token list. ``cancel()`` resolves it at once and tells the engine process,
    which frees the request's KV slot at its next step."""

    def __init__(self, on_cancel: Callable[[], None]):
        super().__init__()
        self._on_cancel = on_cancel

    def cancel(self) -> bool:
        if self.done():
            return False
        self._on_cancel()
        return super().cancel()


@dataclass(eq=False)
class _Pending:
    future: RemoteFuture
    on_token: Callable[[int], None] | None
    timings: dict
    tokens: list = field(default_factory=list)


class _RemoteMetrics:
    """``scheduler.metrics.snapshot()`` of the engine's scheduler, plus the requests this side
    refused before sending them."""

    def __init__(self, scheduler: "RemoteScheduler"):
        self.scheduler = scheduler

    def snapshot(self) -> dict:
        snap = self.scheduler.stats().get("scheduler") or {"counters": {}, "gauges": {}, "histograms": {}}
        snap["histograms"] = {k: {int(size): n for size, n in v.items()} for k, v in snap.get("histograms", {}).items()}
        counters = snap.setdefault("counters", {})
        counters["rejected"] = counters.get("rejected", 0) + self.scheduler.rejected
        return snap


class RemoteScheduler:
    """The scheduler's ``submit`` surface, served by the engine process."""

    def __init__(self, process, commands: socket.socket, events: Connection, codec, max_batch_size: int,
                 max_queue_size: int, name: str):
        self.process, self.commands, self.events, self.codec, self.name = process, commands, events, codec, name
        self.max_batch_size, self.max_queue_size = max_batch_size, max_queue_size
        self.metrics = _RemoteMetrics(self)
        self.rejected = 0
        self._pending: dict[int, _Pending] = {}
        self._room = threading.Condition()
        self._ids, self._nonces = itertools.count(1), itertools.count(1)
        self._replies: dict[int, dict] = {}
        self._waiters: dict[int, threading.Event] = {}
        self._closed = False
        self._dead: str | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0                      # frames in the outbox or being written by the writer thread
        self._write_lock = threading.Lock()   # guards _queued; never held across a blocking write
        self._writer = threading.Thread(target=self._write_loop, name=f"edgevl-{name}-write", daemon=True)
        self._writer.start()
        self._reader: threading.Thread | None = None
        self._loop = None
        self._reading = threading.Lock()

    def start_reading(self, loop=None) -> None:
        """Read the engine's messages on ``loop`` (an asyncio loop: tokens reach the requests'
        queues without a thread hop; create_app does this at startup) or, by default, on a thread
        of its own. Called at the first submit if nobody called it before."""
        with self._reading:
            if self._reader is not None or self._loop is not None or self._closed:
                return
            if loop is not None:
                self._loop, self._buffer = loop, bytearray()
                os.set_blocking(self.events.fileno(), False)   # the loop reads what is there, never waits
                loop.add_reader(self.events.fileno(), self._on_readable)
            else:
                self._reader = threading.Thread(target=self._read_loop, name=f"edgevl-{self.name}-read", daemon=True)
                self._reader.start()

    def stop_reading(self) -> None:
        """Stop reading on the loop (an app stopping); the next start_reading picks again."""
        with self._reading:
            if self._loop is not None:
                if not self._loop.is_closed():
                    self._loop.remove_reader(self.events.fileno())
                os.set_blocking(self.events.fileno(), True)
                self._loop = None

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, ids, pixels: np.ndarray | None, params: SamplingParams, timings: dict | None = None,
               on_token: Callable[[int], None] | None = None, deadline_s: float | None = None,
               block: bool = False, wait_s: float | None = None) -> RemoteFuture:
        self.start_reading()
        params = params.validate()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.codec.check_context(len(ids), params.max_new_tokens)
        self.codec.check_images(ids, pixels, self.name)
        with self._room:
            until = None if wait_s is None else time.monotonic() + wait_s
            while self._usable() and len(self._pending) >= self.max_queue_size + self.max_batch_size:
                left = None if until is None else until - time.monotonic()
                if not block or (left is not None and left <= 0):
                    self.rejected += 1
                    raise QueueFull(f"{self.name}: {self.max_queue_size} requests are already waiting for a slot; "
                                    "retry later, submit with block=True, or raise max_queue_size")
                self._room.wait(left)
            if not self._usable():
                raise ShutdownError(self._why_unusable())
            rid = next(self._ids)
            future = RemoteFuture(lambda: self._send({"op": "cancel", "rid": rid}))
            self._pending[rid] = _Pending(future, on_token, {} if timings is None else timings)
        pixels = None if pixels is None else np.asarray(pixels, dtype=np.float32)
        self._send({"op": "submit", "rid": rid, "params": asdict(params), "deadline_s": deadline_s},
                   [ids] if pixels is None else [ids, pixels])
        return future

    def stats(self, timeout: float = 10.0) -> dict:
        """The engine's scheduler metrics and liveness ({} when the engine does not answer)."""
        if self._dead or self._closed:
            return {}
        self.start_reading()
        if self._loop is not None and _on_loop(self._loop):
            raise RuntimeError("RemoteScheduler.stats() waits for the loop that reads its answer; call it from "
                               "another thread (e.g. starlette's run_in_threadpool)")
        nonce = next(self._nonces)
        self._waiters[nonce] = ready = threading.Event()
        self._send({"op": "stats", "nonce": nonce})
        ready.wait(timeout)
        self._waiters.pop(nonce, None)
        return self._replies.pop(nonce, {})

    @property
    def alive(self) -> bool:
        return self._usable()

    def shutdown(self, wait: bool = True, cancel_pending: bool = False, timeout: float | None = 60.0) -> None:
        """Finish what the engine holds (or cancel it), stop the engine process, and wait for it."""
        with self._room:
            if self._closed:
                return
            self._closed = True
        if cancel_pending:
            for rid in list(self._pending):
                self._send({"op": "cancel", "rid": rid})
        self._send({"op": "close", "timeout_s": timeout})
        if wait:
            try:
                self.process.wait(None if timeout is None else timeout + 15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self._reader is not None:
                self._reader.join(5)

    # -- the pipe ------------------------------------------------------------------------------
    def _usable(self) -> bool:
        return not self._closed and self._dead is None and self.process.poll() is None

    def _why_unusable(self) -> str:
        if self._closed:
            return f"{self.name} is shut down"
        return f"{self.name}: {self._dead or f'the engine process exited (code {self.process.poll()})'}; " \
               "restart edgevl serve (its log above says why the engine stopped)"

    def _send(self, header: dict, arrays: list | tuple = ()) -> None:
        """Write a command now if the pipe takes it without waiting and nothing is queued before
        it (no thread hop for the event loop's submits and cancels); the rest goes, in order, to
        the writer thread, which may block (an image can be megabytes)."""
        frame = memoryview(_frame(pack(header, arrays)))
        with self._write_lock:
            if self._queued == 0:
                try:
                    frame = frame[self.commands.send(frame, socket.MSG_DONTWAIT):]
                except BlockingIOError:
                    pass
                except OSError:
                    return                   # the engine process is gone: the reader fails what is pending
                if not frame:
                    return
            self._queued += 1
            self._outbox.put(frame)

    def _write_loop(self) -> None:
        while (frame := self._outbox.get()) is not None:
            try:
                self.commands.sendall(frame)
            except OSError:
                return                       # the engine process is gone: the reader fails what is pending
            with self._write_lock:
                self._queued -= 1

    def _read_loop(self) -> None:
        try:
            while True:
                self._message(self.events.recv_bytes())
        except (EOFError, OSError, WireError) as e:
            self._broken(e)
        self._gone(wait_s=5.0)

    def _on_readable(self) -> None:
        """The loop's reader callback: read what has arrived, handle every complete message
        (multiprocessing.connection's framing: a 4-byte big-endian length, then the bytes)."""
        try:
            while True:
                try:
                    chunk = os.read(self.events.fileno(), 1 << 20)
                except BlockingIOError:
                    break
                if not chunk:
                    raise EOFError
                self._buffer += chunk
            while len(self._buffer) >= 4:
                (n,) = struct.unpack_from("!i", self._buffer)
                if n < 0:
                    raise WireError("a message of 2 GB or more from the engine process")
                if len(self._buffer) < 4 + n:
                    break
                data = bytes(self._buffer[4:4 + n])
                del self._buffer[:4 + n]
                self._message(data)
        except (EOFError, OSError, WireError) as e:
            self._loop.remove_reader(self.events.fileno())
            self._broken(e)
            self._gone(wait_s=0.0)

    def _broken(self, error: BaseException) -> None:
        if isinstance(error, WireError):
            self._dead = f"a message from the engine process did not parse ({error})"

    def _message(self, data: bytes) -> None:
        header, _ = unpack(data)
        if header.get("op") == "events":
            for event in header["events"]:
                self._event(event)

    def _event(self, event: list) -> None:
        kind = event[0]
        if kind == "t":
            pending = self._pending.get(event[1])
            if pending is None or pending.future.done():
                return
            if len(event) > 3 and event[3] is not None:
                pending.timings["queue"] = event[3]
            pending.tokens.append(event[2])
            if pending.on_token is not None:
                try:
                    pending.on_token(event[2])
                except Exception as e:      # the caller's callback failed: that request ends with its error
                    self._send({"op": "cancel", "rid": event[1]})
                    self._resolve(pending, e)
        elif kind == "d":
            _, rid, finish_reason, error_name, message = event
            with self._room:
                pending = self._pending.pop(rid, None)
                self._room.notify_all()
            if pending is None:
                return
            if finish_reason is not None:
                pending.timings["finish_reason"] = finish_reason
            self._resolve(pending, None if error_name is None else _rebuild(error_name, message))
        elif kind == "s":
            ready = self._waiters.get(event[1])
            if ready is not None:                 # nobody waits for an answer that came after its timeout
                self._replies[event[1]] = event[2]
                ready.set()
        elif kind == "x":
            self._dead = event[1]

    @staticmethod
    def _resolve(pending: _Pending, error: BaseException | None) -> None:
        try:
            if error is None:
                pending.future.set_result(list(pending.tokens))
            else:
                pending.future.set_exception(error)
        except InvalidStateError:            # cancelled here already
            pass

    def _gone(self, wait_s: float) -> None:
        """The engine's end of the pipe closed: fail what is pending, wake stats waiters."""
        try:
            code = self.process.wait(wait_s) if wait_s else self.process.poll()
        except subprocess.TimeoutExpired:
            code = None
        if not self._closed and self._dead is None:
            self._dead = f"the engine process exited (code {code})"
        with self._room:
            pending, self._pending = list(self._pending.values()), {}
            self._room.notify_all()
        error = ShutdownError(self._why_unusable())
        for p in pending:
            self._resolve(p, error)
        for ready in list(self._waiters.values()):
            ready.set()
        self._outbox.put(None)


class RemoteVLM:
    """What ``create_app`` uses of a VLM (``scheduler``, ``engine`` for prompts and text,
    ``pixels``, ``_params``, ``close``), with the model in an engine process."""

    def __init__(self, bundle: str | Path, backend: str | None = None, threads: int | dict | None = None,
                 max_batch_size: int = 8, max_wait_ms: float = 5.0, max_queue_size: int = 256, trust=None,
                 on_load: str | None = None, start_timeout_s: float = 600.0, name: str = "scheduler"):
        """``on_load``: "module:function" called with the loaded VLM inside the engine process
        (instrumentation; the tests slow its decode steps with it)."""
        from edgevl.bundle import load_bundle
        from edgevl.runtimes.engine import PromptCodec

        self.bundle = load_bundle(bundle, trust=trust)        # checked here; the engine process checks it again
        self.engine = PromptCodec(self.bundle)
        self.preprocess_spec = self.bundle.manifest["preprocess"]
        self.generation_defaults = dict(self.bundle.manifest.get("generation", {}))
        # one socket pair per direction: the server's loop reads events without blocking while
        # its writer thread sends commands (an image can be megabytes) with blocking writes
        (commands, their_commands), (events, their_events) = socket.socketpair(), socket.socketpair()
        fds = [their_commands.fileno(), their_events.fileno()]
        # a fresh interpreter (not multiprocessing's spawn, which re-imports the caller's main script)
        self.process = subprocess.Popen([sys.executable, "-m", "edgevl.serving.engine_process", *map(str, fds)],
                                        pass_fds=fds, env=_engine_env())
        their_commands.close()
        their_events.close()
        events = Connection(events.detach())
        try:
            commands.sendall(_frame(pack({"bundle": str(bundle), "on_load": on_load, "path": sys.path, "load": {
                "backend": backend, "threads": threads, "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
                "max_queue_size": max_queue_size, "trust": _portable_trust(trust)}})))
            header = self._wait_ready(events, start_timeout_s)
        except BaseException:
            self.process.kill()
            self.process.wait()
            commands.close()
            events.close()
            raise
        self.backend = header["backend"]
        self.scheduler = RemoteScheduler(self.process, commands, events, self.engine, max_batch_size, max_queue_size,
                                         name)

    def _wait_ready(self, conn, timeout_s: float) -> dict:
        until = time.monotonic() + timeout_s
        while not conn.poll(0.1):
            if self.process.poll() is not None:
                break
            if time.monotonic() > until:
                raise ShutdownError(f"the engine process did not load the model in {timeout_s:.0f} s")
        try:
            header, _ = unpack(conn.recv_bytes())
        except (EOFError, OSError):
            raise ShutdownError(f"the engine process exited while loading the model (code "
                                f"{self.process.wait()}); its error is on stderr above") from None
        if header.get("op") == "failed":
            raise _rebuild(*header["error"])
        return header

    def _params(self, **overrides) -> SamplingParams:
        from edgevl.api import sampling_params

        return sampling_params(self.generation_defaults, **overrides)

    def pixels(self, images, channels: str = "bgr") -> np.ndarray:
        from edgevl.preprocess import preprocess

        return preprocess(images, self.preprocess_spec, channels)

    def close(self) -> None:
        self.scheduler.shutdown()

    def __enter__(self) -> "RemoteVLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _engine_env() -> dict:
    """The engine process's environment: the server's, with glibc's malloc held to two arenas
    unless the caller chose a number (MALLOC_ARENA_MAX). The engine's threads (scheduler, vision
    batcher, pipe) each took an arena of their own by default, and memory freed in one stayed
    mapped: edgevl-tiny's engine process held 182-183 MB after 60 s of the soak's mixed load with
    the default, 143-146 MB with two arenas (2-core AMD EPYC, 0.8.1)."""
    return {"MALLOC_ARENA_MAX": "2", **os.environ}


def _on_loop(loop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _portable_trust(trust):
    """``trust`` as the engine process can take it from JSON: None (the same EDGEVL_TRUST policy,
    inherited with the environment), False, or the policy's public keys as PEM text."""
    if trust is None or trust is False:
        return trust
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from edgevl.signing import policy_from

    return [k.public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
            for k in policy_from(trust).keys]


if __name__ == "__main__":
    _engine_main(int(sys.argv[1]), int(sys.argv[2]))
