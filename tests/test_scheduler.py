"""In-flight batching on the real edgevl-tiny bundle: batched tokens equal tokens alone, and
the request lifecycle (cancel, deadline, queue full, shutdown, a failing step) checked by counting."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest

from conftest import BACKENDS
from edgevl.errors import DeadlineExceeded, InputError, QueueFull, RequestCancelled, ShutdownError
from edgevl.runtimes.engine import Engine
from edgevl.runtimes.generation import stream_tokens
from edgevl.runtimes.sampling import SamplingParams
from edgevl.runtimes.scheduler import Scheduler


class ControlledEngine(Engine):
    """The real engine plus test controls: ``no_eos`` masks the stop tokens so sequences run to
    max_new_tokens (long, overlapping generations), ``step_delay_s`` slows decode steps, and
    ``fail_on_call`` makes the N-th decode call raise, ``refuse_nan_prompts`` makes a prefill
    whose prompts hold NaN raise (as a backend that checks its inputs would)."""

    no_eos = False
    step_delay_s = 0.0
    fail_on_call: int | None = None
    decode_calls = 0
    refuse_nan_prompts = False

    def _mask(self, logits):
        if self.no_eos:
            logits = logits.copy()
            logits[..., list(self.eos_ids)] = -1e30
        return logits

    def prefill_rows(self, cache, first, embeds, ids=None):
        if self.refuse_nan_prompts and np.isnan(embeds).any():
            raise ValueError("prompt embeddings hold NaN (injected check)")
        return self._mask(super().prefill_rows(cache, first, embeds, ids))

    def decode(self, cache, n, tokens):
        self.decode_calls += 1
        if self.fail_on_call == self.decode_calls:
            raise RuntimeError(f"decode step {self.decode_calls} failed (injected)")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        return self._mask(super().decode(cache, n, tokens))


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, tiny_bundle):
    from edgevl.bundle import load_bundle

    eng = ControlledEngine(load_bundle(tiny_bundle), request.param).activate()
    yield eng
    eng.close()


@pytest.fixture
def controlled(engine):
    """The module's engine with its controls reset after the test."""
    yield engine
    engine.no_eos, engine.step_delay_s, engine.fail_on_call, engine.decode_calls = False, 0.0, None, 0
    engine.refuse_nan_prompts = False


def scene_requests(engine, n: int, seed: int = 0):
    """(ids, pixels, params): questions about rendered scenes, random-token prompts with 0-2
    images, and a few seeded sampling requests; prompts of many lengths."""
    from edgevl.data.tasks import scene_qas
    from edgevl.data.world import make_scene, render
    from edgevl.preprocess import preprocess

    rng = np.random.default_rng(seed)
    seq_len = int(engine.prompt_spec["image_seq_len"])
    vocab = int(engine.runners["decoder"].outputs[0].shape[-1])
    out = []
    for i in range(n):
        if i % 2 == 0:
            scene = make_scene("test", seed * 100 + i)
            ids = engine.encode_prompt(scene_qas(scene)[i % 5].question)
            pixels = preprocess(render(scene), engine.preprocess_spec, "rgb")
        else:
            n_images = i % 3
            words = rng.integers(5, vocab, size=int(rng.integers(3, 40)))
            ids = np.concatenate([np.full(seq_len * n_images, engine.image_token_id), words]).astype(np.int64)
            pixels = rng.normal(size=(n_images, 3, 64, 64)).astype(np.float32) if n_images else None
        params = SamplingParams(max_new_tokens=int(rng.integers(4, 28)))
        if i % 5 == 3:
            params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=12, top_p=0.95,
                                    repetition_penalty=1.2, seed=1000 + i)
        out.append((ids, pixels, params))
    return out


def alone(engine, requests):
    return [list(stream_tokens(engine, ids, None if px is None else engine.encode_images(px), p))
            for ids, px, p in requests]


def run_concurrently(scheduler, requests, stagger_s: float = 0.004, together: int = 1):
    """One thread per request, started ``stagger_s`` apart (the first ``together`` at once), so
    requests join mid-generation."""
    results: dict[int, object] = {}

    def client(i):
        time.sleep(stagger_s * max(0, i - together + 1))
        try:
            results[i] = scheduler.submit(*requests[i]).result(60)
        except Exception as e:  # recorded and asserted on by the caller
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    return [results[i] for i in range(len(requests))]


def test_concurrent_requests_give_the_tokens_they_give_alone(controlled):
    requests = scene_requests(controlled, 12)
    expected = alone(controlled, requests)
    with Scheduler(controlled, max_batch_size=4, max_wait_ms=3, max_queue_size=64) as scheduler:
        got = run_concurrently(scheduler, requests)
        stats = scheduler.stats()
    assert got == expected
    c = stats["scheduler"]["counters"]
    assert c["accepted"] == c["completed"] == 12 and c["tokens"] == sum(map(len, expected))


def test_long_overlapping_generations_match_alone_in_full_batches(controlled):
    controlled.no_eos = True                      # every sequence runs to its own max_new_tokens
    requests = scene_requests(controlled, 14, seed=1)
    expected = alone(controlled, requests)
    assert len({len(t) for t in expected}) > 4     # sequences leave at many different steps
    with Scheduler(controlled, max_batch_size=6, max_wait_ms=3, max_queue_size=64) as scheduler:
        got = run_concurrently(scheduler, requests, stagger_s=0.01, together=6)   # the first batch is full
        hist = scheduler.stats()["scheduler"]["histograms"]["decode_batch"]
    assert got == expected, [(i, g, e) for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert max(hist) == 6 and len(hist) > 3, hist  # full batches, and joins/leaves in between


def same_question_requests(engine, n: int, seed: int = 7):
    """The same question about n different scenes (what n cameras ask): one prompt length."""
    from edgevl.data.tasks import scene_qas
    from edgevl.data.world import make_scene, render
    from edgevl.preprocess import preprocess

    ids = engine.encode_prompt(scene_qas(make_scene("test", seed * 100))[0].question)
    scenes = [make_scene("test", seed * 100 + i) for i in range(n)]
    return [(ids, preprocess(render(s), engine.preprocess_spec, "rgb"), SamplingParams(max_new_tokens=12)) for s in scenes]


def test_requests_admitted_together_share_one_prefill_and_keep_their_tokens(controlled):
    requests = same_question_requests(controlled, 6)
    expected = alone(controlled, requests)
    with Scheduler(controlled, max_batch_size=6, max_wait_ms=50) as scheduler:
        got = run_concurrently(scheduler, requests, together=6)
        hist = scheduler.stats()["scheduler"]["histograms"]["prefill_batch"]
    assert got == expected
    assert max(hist) > 1 and sum(size * n for size, n in hist.items()) == 6   # shared prefills, each request once


def test_a_bad_prompt_in_a_shared_prefill_fails_alone(controlled):
    controlled.refuse_nan_prompts = True
    requests = same_question_requests(controlled, 4, seed=8)
    expected = alone(controlled, requests)
    bad_pixels = np.full_like(requests[2][1], np.nan)
    requests[2] = (requests[2][0], bad_pixels, requests[2][2])
    with Scheduler(controlled, max_batch_size=4, max_wait_ms=50) as scheduler:
        got = run_concurrently(scheduler, requests, together=4)
        stats = scheduler.stats()["scheduler"]
    assert isinstance(got[2], ValueError) and "NaN" in str(got[2])
    assert [got[i] for i in (0, 1, 3)] == [expected[i] for i in (0, 1, 3)]
    assert stats["counters"]["completed"] == 3 and stats["counters"]["failed"] == 1


def test_stream_yields_tokens_as_they_come_and_fills_timings(controlled):
    ids, pixels, params = scene_requests(controlled, 1)[0]
    params = SamplingParams(max_new_tokens=8)
    expected = alone(controlled, [(ids, pixels, params)])[0]
    timings: dict = {}
    with Scheduler(controlled, max_batch_size=2) as scheduler:
        assert list(scheduler.stream(ids, pixels, params, timings)) == expected
        embeds = scheduler.encode(pixels)
    assert np.allclose(embeds, controlled.encode_images(pixels), atol=1e-5)
    assert {"vision", "queue", "prefill", "decode_steps", "finish_reason"} <= set(timings)
    assert timings["finish_reason"] in ("stop", "length")
    assert len(timings["decode_steps"]) == (len(expected) - 1 if timings["finish_reason"] == "length"
                                            else len(expected))


def test_cancel_mid_generation_frees_the_slot_and_spares_the_others(controlled):
    controlled.no_eos, controlled.step_delay_s = True, 0.005
    ids, pixels, _ = scene_requests(controlled, 1)[0]
    long = SamplingParams(max_new_tokens=200)
    with Scheduler(controlled, max_batch_size=2) as scheduler:
        victim = scheduler.submit(ids, pixels, long)
        other = scheduler.submit(ids, pixels, SamplingParams(max_new_tokens=30))
        stream = scheduler.stream(ids, pixels, long)
        first = [next(stream) for _ in range(3)]
        stream.close()                              # closing a stream cancels its request
        time.sleep(0.05)
        assert victim.cancel()
        with pytest.raises(RequestCancelled):
            victim.result(10)
        assert len(other.result(30)) == 30
        late = scheduler.submit(ids, pixels, SamplingParams(max_new_tokens=5))   # slots were freed
        assert len(late.result(30)) == 5
        stats = scheduler.stats()["scheduler"]
    assert len(first) == 3
    assert stats["counters"]["cancelled"] == 2 and stats["counters"]["completed"] == 2
    assert stats["gauges"]["active"] == 0


def test_deadline_ends_a_generation_that_runs_late(controlled):
    controlled.no_eos, controlled.step_delay_s = True, 0.005
    ids, pixels, _ = scene_requests(controlled, 1)[0]
    with Scheduler(controlled, max_batch_size=2) as scheduler:
        late = scheduler.submit(ids, pixels, SamplingParams(max_new_tokens=400), deadline_s=0.2)
        fine = scheduler.submit(ids, pixels, SamplingParams(max_new_tokens=10), deadline_s=30)
        with pytest.raises(DeadlineExceeded, match="deadline"):
            late.result(10)
        assert len(fine.result(10)) == 10


def test_queue_full_then_blocking_submit_and_every_accepted_request_resolves(controlled):
    controlled.no_eos, controlled.step_delay_s = True, 0.01
    ids, _, _ = scene_requests(controlled, 2)[1]
    ids = ids[ids != controlled.image_token_id]            # text-only prompt
    p = SamplingParams(max_new_tokens=15)
    with Scheduler(controlled, max_batch_size=1, max_queue_size=2) as scheduler:
        futures = [scheduler.submit(ids, None, p)]
        time.sleep(0.1)                                     # the first is active, not waiting
        futures += [scheduler.submit(ids, None, p), scheduler.submit(ids, None, p)]
        with pytest.raises(QueueFull, match="already waiting"):
            scheduler.submit(ids, None, p)
        with pytest.raises(QueueFull):
            scheduler.submit(ids, None, p, block=True, wait_s=0.02)
        futures.append(scheduler.submit(ids, None, p, block=True, wait_s=30))   # waits for room
        results = [f.result(60) for f in futures]
        c = scheduler.stats()["scheduler"]["counters"]
    assert all(r == results[0] for r in results) and len(results[0]) == 15
    assert c["accepted"] == 4 and c["completed"] == 4 and c["rejected"] == 2


def test_a_request_sent_the_moment_another_finishes_is_not_refused(controlled):
    """A full batch and a full queue; the instant a request finishes (its future resolves, in the
    scheduler thread, before the next loop admits a waiting request into the freed slot) a new one
    is submitted, as an HTTP server or Ray Serve's router does after answering: it is accepted,
    because the queue's waiting requests now have a free slot ahead of them."""
    controlled.no_eos, controlled.step_delay_s = True, 0.01
    ids, _, _ = scene_requests(controlled, 2)[1]
    ids = ids[ids != controlled.image_token_id]
    with Scheduler(controlled, max_batch_size=2, max_queue_size=1) as scheduler:
        first = scheduler.submit(ids, None, SamplingParams(max_new_tokens=20))
        others = [scheduler.submit(ids, None, SamplingParams(max_new_tokens=40))]
        deadline = time.monotonic() + 10
        while scheduler.stats()["scheduler"]["gauges"].get("active") != 2:      # the batch is full
            assert time.monotonic() < deadline and not first.done()
            time.sleep(0.005)
        others.append(scheduler.submit(ids, None, SamplingParams(max_new_tokens=4)))     # waiting: queue full
        with pytest.raises(QueueFull):
            scheduler.submit(ids, None, SamplingParams(max_new_tokens=4))
        sent = []

        def resubmit(_future):
            try:
                sent.append(scheduler.submit(ids, None, SamplingParams(max_new_tokens=4)))
            except QueueFull as e:
                sent.append(e)

        first.add_done_callback(resubmit)
        assert len(first.result(60)) == 20
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sent and not isinstance(sent[0], QueueFull), sent
        assert [len(f.result(60)) for f in [*others, sent[0]]] == [40, 4, 4]


def test_shutdown_finishes_every_accepted_request(controlled):
    requests = scene_requests(controlled, 6, seed=2)
    expected = alone(controlled, requests)
    scheduler = Scheduler(controlled, max_batch_size=2)
    futures = [scheduler.submit(*r) for r in requests]
    scheduler.shutdown()
    assert [f.result(0) for f in futures] == expected
    with pytest.raises(ShutdownError):
        scheduler.submit(*requests[0])
    with pytest.raises(ShutdownError):
        scheduler.encode(requests[0][1])


def test_shutdown_cancel_pending_fails_the_rest_with_shutdown_error(controlled):
    controlled.no_eos, controlled.step_delay_s = True, 0.01
    requests = scene_requests(controlled, 6, seed=3)
    scheduler = Scheduler(controlled, max_batch_size=2)
    futures = [scheduler.submit(ids, px, SamplingParams(max_new_tokens=100)) for ids, px, _ in requests]
    time.sleep(0.1)
    scheduler.shutdown(cancel_pending=True)
    outcomes = Counter(type(f.exception(0)).__name__ for f in futures)
    assert outcomes == Counter({"ShutdownError": 6})
    c = scheduler.stats()["scheduler"]["counters"]
    assert c["accepted"] == 6 and c["failed"] == 6 and not scheduler.alive


def test_a_failing_decode_step_fails_only_its_sequences(controlled):
    controlled.no_eos, controlled.fail_on_call = True, 3
    requests = scene_requests(controlled, 3, seed=4)
    with Scheduler(controlled, max_batch_size=4) as scheduler:
        doomed = [scheduler.submit(ids, px, SamplingParams(max_new_tokens=10)) for ids, px, _ in requests]
        errors = [f.exception(30) for f in doomed]
        after = [scheduler.submit(ids, px, SamplingParams(max_new_tokens=10)) for ids, px, _ in requests]
        results = [f.result(30) for f in after]
        health = scheduler.health()["scheduler"]
    assert all(isinstance(e, RuntimeError) and "injected" in str(e) for e in errors if e is not None)
    assert sum(e is not None for e in errors) >= 1
    controlled.fail_on_call = None
    assert results == alone(controlled, [(ids, px, SamplingParams(max_new_tokens=10)) for ids, px, _ in requests])
    assert health["alive"] and health["errors"] == 1 and "injected" in health["last_error"]["message"]


def test_mismatched_images_and_long_prompts_are_refused_at_submit(engine):
    ids, pixels, params = scene_requests(engine, 1)[0]
    with Scheduler(engine, max_batch_size=2) as scheduler:
        with pytest.raises(InputError, match="image tokens"):
            scheduler.submit(ids, None, params)
        with pytest.raises(InputError, match="context"):
            scheduler.submit(ids, pixels, SamplingParams(max_new_tokens=10_000))
        assert scheduler.stats()["scheduler"]["counters"].get("accepted", 0) == 0


def test_api_batching_generate_is_thread_safe_and_matches_unbatched(tiny_bundle, engine):
    import edgevl
    from edgevl.data.tasks import scene_qas
    from edgevl.data.world import make_scene, render

    scenes = [make_scene("test", i) for i in range(6)]
    questions = [scene_qas(s)[i % 5].question for i, s in enumerate(scenes)]
    images = [render(s) for s in scenes]
    with edgevl.load(tiny_bundle, backend=engine.backend, verbose=False) as plain:
        expected = [plain.generate(im, q, channels="rgb", max_new_tokens=12).tokens for im, q in zip(images, questions)]
    with edgevl.load(tiny_bundle, backend=engine.backend, batching=True, max_batch_size=4, verbose=False) as vlm:
        got: dict[int, list] = {}
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(
            i, vlm.generate(images[i], questions[i], channels="rgb", max_new_tokens=12).tokens)) for i in range(6)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        answers = vlm.answer(images, questions, max_new_tokens=12)
        stats = vlm.metrics()["scheduler"]
        with pytest.raises(DeadlineExceeded, match="deadline"):
            vlm.generate(images[0], questions[0], channels="rgb", max_new_tokens=400, deadline_s=1e-4)
    assert [got[i] for i in range(6)] == expected
    assert answers == [vlm.engine.decode_tokens(t) for t in expected]
    assert stats["counters"]["accepted"] == 12 and stats["counters"]["completed"] == 12


def test_api_deadline_without_batching_says_how_to_enable_it(tiny_bundle):
    import edgevl
    from edgevl.data.world import make_scene, render

    with edgevl.load(tiny_bundle, backend="onnxruntime", verbose=False) as vlm:
        assert vlm.metrics() == {}
        with pytest.raises(ValueError, match="batching=True"):
            vlm.generate(render(make_scene("test", 0)), "how many shapes?", channels="rgb", deadline_s=1.0)
