"""DynamicBatcher with a fake batch function: every behaviour is checked by counting.

The fake function records every batch it sees, so each test can check that each accepted
request reached the runner at most once, and resolved exactly once (a result or an error).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from concurrent.futures import CancelledError

import numpy as np
import pytest

from edgevl.errors import ConfigError, DeadlineExceeded, InputError, QueueFull, RequestCancelled, ShutdownError
from edgevl.runtimes.batcher import DynamicBatcher
from edgevl.runtimes.collate import PadToLongest


class FakeRunner:
    """x (B, F) -> x * 2; logs the request ids (column 0) of every batch; can block or fail."""

    def __init__(self, delay_s: float = 0.0, fail_if=None):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.delay_s, self.fail_if = delay_s, fail_if
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        ids = [int(v) for v in x[:, 0]]
        with self.lock:
            self.batches.append(ids)
        self.entered.set()
        self.gate.wait()
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_if is not None and self.fail_if(ids):
            raise RuntimeError(f"runner failed on batch {ids}")
        return x * 2

    def seen(self) -> Counter:
        return Counter(i for b in self.batches for i in b)


def row(i: int, width: int = 3) -> np.ndarray:
    return np.full((1, width), float(i), dtype=np.float32)


def outcomes(futures: dict[int, object]) -> dict[int, str]:
    """id -> 'ok' | exception class name | 'cancelled'; every future must be resolved."""
    out = {}
    for i, f in futures.items():
        assert f.done(), f"request {i} never resolved"
        if f.cancelled():
            out[i] = "cancelled"
        elif f.exception() is not None:
            out[i] = type(f.exception()).__name__
        else:
            assert np.array_equal(f.result(), row(i) * 2), f"request {i} got someone else's result"
            out[i] = "ok"
    return out


def wait_for(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def test_batches_fill_up_to_max_size_and_each_request_runs_once():
    fn = FakeRunner()
    fn.gate.clear()                                  # hold the first batch so the queue builds up
    b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=50, max_queue_size=64)
    futures = {0: b.submit(row(0))}
    fn.entered.wait(5)
    futures.update({i: b.submit(row(i)) for i in range(1, 23)})
    fn.gate.set()
    b.shutdown()
    assert set(outcomes(futures).values()) == {"ok"}
    assert fn.seen() == Counter(range(23))          # no request lost, none run twice
    sizes = [len(x) for x in fn.batches]
    assert max(sizes) == 4 and sizes.count(4) >= 5   # 22 queued requests -> full batches
    snap = b.metrics.snapshot()
    assert snap["counters"]["accepted"] == snap["counters"]["completed"] == 23
    assert sum(k * v for k, v in snap["histograms"]["batch_rows"].items()) == 23


def test_thread_storm_every_request_resolves_exactly_once():
    fn = FakeRunner(fail_if=lambda ids: any(i % 37 == 5 for i in ids))
    b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=2, max_queue_size=32)
    futures, rejected, lock = {}, [], threading.Lock()

    def client(c: int):
        rng = random.Random(c)
        for k in range(40):
            i = c * 1000 + k
            try:
                f = b.submit(row(i), deadline_s=rng.choice([None, None, 0.001, 1.0]), block=rng.random() < 0.5,
                             wait_s=0.05)
            except QueueFull:
                rejected.append(i)
                continue
            with lock:
                futures[i] = f
            if rng.random() < 0.1:
                f.cancel()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    b.shutdown()
    result = outcomes(futures)
    counts = Counter(result.values())
    assert len(result) + len(rejected) == 8 * 40
    assert set(counts) <= {"ok", "RuntimeError", "DeadlineExceeded", "cancelled"}
    seen = fn.seen()
    assert max(seen.values()) == 1                               # nothing ran twice
    assert all(result[i] in ("ok", "RuntimeError") for i in seen)  # what ran resolved from the run
    assert all(i in seen for i, r in result.items() if r in ("ok", "RuntimeError"))
    c = b.metrics.snapshot()["counters"]
    assert c["accepted"] == len(futures)
    assert c.get("completed", 0) == counts["ok"]
    assert c.get("failed", 0) == counts["RuntimeError"] + counts["DeadlineExceeded"]
    assert c.get("cancelled", 0) == counts["cancelled"]
    assert c.get("rejected", 0) == len(rejected)


def test_a_lone_request_waits_at_most_max_wait_and_a_full_batch_does_not_wait():
    fn = FakeRunner()
    b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=1000, max_queue_size=8)
    t = time.monotonic()
    b.submit(row(0)).result(5)
    lone = time.monotonic() - t
    t = time.monotonic()
    futures = [b.submit(row(i)) for i in range(1, 5)]
    [f.result(5) for f in futures]
    full = time.monotonic() - t
    b.shutdown()
    assert 0.99 <= lone < 3.0, lone          # waited for company, then ran alone
    assert full < 0.5, full                  # a full batch runs at once, without the wait
    assert fn.batches == [[0], [1, 2, 3, 4]]


def test_queue_full_raises_and_blocking_submit_times_out_or_gets_room():
    fn = FakeRunner()
    fn.gate.clear()
    b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0, max_queue_size=2)
    futures = {0: b.submit(row(0))}
    fn.entered.wait(5)                                   # request 0 is in the runner
    futures[1], futures[2] = b.submit(row(1)), b.submit(row(2))
    with pytest.raises(QueueFull, match="queue is full"):
        b.submit(row(3))
    t = time.monotonic()
    with pytest.raises(QueueFull, match="stayed full"):
        b.submit(row(4), block=True, wait_s=0.1)
    assert time.monotonic() - t >= 0.09
    got = {}
    blocked = threading.Thread(target=lambda: got.setdefault(5, b.submit(row(5), block=True, wait_s=5)))
    blocked.start()
    time.sleep(0.05)
    assert blocked.is_alive()                            # still waiting for room
    fn.gate.set()
    blocked.join(5)
    futures[5] = got[5]
    b.shutdown()
    assert outcomes(futures) == {0: "ok", 1: "ok", 2: "ok", 5: "ok"}
    assert fn.seen() == Counter([0, 1, 2, 5])
    assert b.metrics.snapshot()["counters"]["rejected"] == 2


def test_deadline_fails_only_late_requests():
    fn = FakeRunner()
    fn.gate.clear()
    b = DynamicBatcher(fn, max_batch_size=2, max_wait_ms=0, max_queue_size=8)
    futures = {0: b.submit(row(0))}
    fn.entered.wait(5)
    futures[1] = b.submit(row(1), deadline_s=0.05)
    futures[2] = b.submit(row(2), deadline_s=10)
    time.sleep(0.1)
    fn.gate.set()
    b.shutdown()
    assert outcomes(futures) == {0: "ok", 1: "DeadlineExceeded", 2: "ok"}
    assert 1 not in fn.seen()
    with pytest.raises(DeadlineExceeded, match="deadline"):
        futures[1].result()


def test_deadline_fires_while_the_worker_waits_for_a_batch_to_fill():
    b = DynamicBatcher(FakeRunner(), max_batch_size=8, max_wait_ms=2000, max_queue_size=8)
    t = time.monotonic()
    f = b.submit(row(0), deadline_s=0.05)
    with pytest.raises(DeadlineExceeded):
        f.result(5)
    assert time.monotonic() - t < 1.0          # not held until max_wait_ms
    b.shutdown()


def test_cancelled_requests_never_reach_the_runner_and_free_their_place():
    fn = FakeRunner()
    fn.gate.clear()
    b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=0, max_queue_size=4)
    futures = {0: b.submit(row(0))}
    fn.entered.wait(5)
    futures.update({i: b.submit(row(i)) for i in range(1, 5)})
    assert futures[2].cancel() and futures[4].cancel()
    futures[5] = b.submit(row(5))                   # the cancelled ones' places are free again
    futures[6] = b.submit(row(6))
    fn.gate.set()
    b.shutdown()
    result = outcomes(futures)
    assert result == {0: "ok", 1: "ok", 2: "cancelled", 3: "ok", 4: "cancelled", 5: "ok", 6: "ok"}
    assert fn.seen() == Counter([0, 1, 3, 5, 6])
    assert b.metrics.snapshot()["counters"]["cancelled"] == 2
    with pytest.raises(CancelledError):
        futures[2].result()
    assert issubclass(RequestCancelled, CancelledError)   # one except clause covers both kinds


def test_asyncio_submit_and_task_cancellation():
    fn = FakeRunner()
    b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=1, max_queue_size=16)

    async def main():
        results = await asyncio.gather(*(b.submit_async(row(i)) for i in range(6)))
        assert all(np.array_equal(r, row(i) * 2) for i, r in enumerate(results))
        fn.gate.clear()
        fn.entered.clear()
        first = asyncio.ensure_future(b.submit_async(row(100)))
        await asyncio.get_running_loop().run_in_executor(None, fn.entered.wait, 5)   # 100 is in the runner
        doomed = asyncio.ensure_future(b.submit_async(row(101)))
        await asyncio.sleep(0.01)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed          # by now the cancel has reached the batcher (it runs in the event loop)
        fn.gate.set()             # only then free the runner: releasing it first raced the cancel
        assert np.array_equal(await first, row(100) * 2)

    asyncio.run(main())
    b.shutdown()
    assert 101 not in fn.seen() and fn.seen()[100] == 1


def test_runner_failure_fails_only_its_batch_and_the_batcher_keeps_serving():
    fn = FakeRunner(fail_if=lambda ids: 13 in ids)
    b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=20, max_queue_size=64)
    fn.gate.clear()
    futures = {0: b.submit(row(0))}
    fn.entered.wait(5)
    futures.update({i: b.submit(row(i)) for i in range(1, 21)})
    fn.gate.set()
    b.shutdown()
    result = outcomes(futures)
    bad = next(batch for batch in fn.batches if 13 in batch)
    assert {i for i, r in result.items() if r != "ok"} == set(bad)
    assert all(result[i] == "RuntimeError" for i in bad)
    with pytest.raises(RuntimeError, match="runner failed"):
        futures[13].result()
    assert fn.seen() == Counter(range(21))
    health = b.health()
    assert health["errors"] == 1 and health["last_error"]["affected"] == len(bad)
    assert "runner failed" in health["last_error"]["message"]


def test_shutdown_finishes_queued_requests_then_refuses_new_ones():
    fn = FakeRunner(delay_s=0.01)
    b = DynamicBatcher(fn, max_batch_size=3, max_wait_ms=1000, max_queue_size=64)
    futures = {i: b.submit(row(i)) for i in range(10)}
    t = time.monotonic()
    b.shutdown()                                     # does not wait out max_wait_ms
    assert time.monotonic() - t < 0.9
    assert set(outcomes(futures).values()) == {"ok"}
    assert fn.seen() == Counter(range(10))
    with pytest.raises(ShutdownError):
        b.submit(row(99))
    assert not b.alive


def test_shutdown_cancel_pending_fails_queued_and_finishes_the_running_batch():
    fn = FakeRunner()
    fn.gate.clear()
    b = DynamicBatcher(fn, max_batch_size=2, max_wait_ms=0, max_queue_size=64)
    futures = {0: b.submit(row(0))}
    fn.entered.wait(5)
    futures.update({i: b.submit(row(i)) for i in range(1, 9)})
    threading.Timer(0.05, fn.gate.set).start()
    b.shutdown(cancel_pending=True)
    result = outcomes(futures)
    assert result[0] == "ok"
    assert Counter(result.values()) == Counter({"ok": 1, "ShutdownError": 8})
    assert fn.seen() == Counter([0])


def test_shutdown_wakes_a_blocked_submitter_with_shutdown_error():
    fn = FakeRunner()
    fn.gate.clear()
    b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0, max_queue_size=1)
    futures = {0: b.submit(row(0))}
    fn.entered.wait(5)
    futures[1] = b.submit(row(1))
    errors = []

    def blocked():
        try:
            b.submit(row(2), block=True)
        except ShutdownError as e:
            errors.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.05)
    threading.Timer(0.05, fn.gate.set).start()
    b.shutdown()
    t.join(5)
    assert len(errors) == 1 and outcomes(futures) == {0: "ok", 1: "ok"}


def test_a_dying_worker_fails_everything_and_reports_it():
    class Fatal(BaseException):
        pass

    def fn(x):
        if x[0, 0] == 1:
            raise Fatal("bug")
        time.sleep(0.02)
        return x

    b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0, max_queue_size=16)
    futures = [b.submit(row(i)) for i in range(5)]
    for f in futures:
        f.exception(5)
    assert futures[0].result() is not None
    assert all(isinstance(f.exception(), ShutdownError) for f in futures[1:])
    with pytest.raises(ShutdownError, match="worker thread died"):
        b.submit(row(9))
    health = b.health()
    assert not health["alive"] and health["last_error"]["type"] == "Fatal"


def test_requests_of_different_shapes_never_share_a_batch():
    shapes = []

    def fn(x):
        shapes.append(x.shape)
        return x

    b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=20, max_queue_size=64)
    futures = [b.submit(np.zeros((1, 2 + i % 3), np.float32)) for i in range(12)]
    futures.append(b.submit(np.zeros((3, 2), np.float32)))          # a request of three rows
    results = [f.result(5) for f in futures]
    b.shutdown()
    assert [r.shape for r in results] == [(1, 2 + i % 3) for i in range(12)] + [(3, 2)]
    assert sorted(s[1] for s in shapes) == [2, 3, 4] and sum(s[0] for s in shapes) == 15


def test_padding_collation_pads_to_the_longest_and_trims_back():
    seen = []

    def fn(x):                       # per-token op, like the embedding part: padding is harmless
        seen.append(x.shape)
        return {"out": x[..., None] * 10}

    b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=50, max_queue_size=8, collation=PadToLongest(axis=1))
    items = [np.arange(n, dtype=np.int64)[None] + 1 for n in (2, 5, 3)]
    futures = [b.submit(x) for x in items]
    results = [f.result(5)["out"] for f in futures]
    b.shutdown()
    assert seen == [(3, 5)]
    for x, r in zip(items, results):
        assert np.array_equal(r, x[..., None] * 10)


def test_bad_requests_and_settings_are_refused_clearly():
    with pytest.raises(ConfigError, match="max_batch_size"):
        DynamicBatcher(lambda x: x, max_batch_size=0)
    b = DynamicBatcher(lambda x: x[:1], max_batch_size=2, max_wait_ms=500)   # drops rows: a broken fn
    with pytest.raises(InputError, match="numpy array"):
        b.submit([1, 2, 3])
    with pytest.raises(InputError, match="at least one row"):
        b.submit(np.zeros((0, 3)))
    f1, f2 = b.submit(row(1)), b.submit(row(2))    # one batch of 2 rows -> 1 row back
    for f in (f1, f2):
        with pytest.raises(ConfigError, match="one output row per input row"):
            f.result(5)
    b.shutdown()
