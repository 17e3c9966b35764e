"""edgevl serve's engine process (edgevl/serving/engine_process.py): the same answers as in-process,
the queue bound, cancellation and metrics across the process boundary, the wire's checks, and
what happens when either process dies."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import has_module
from serving_live import LiveServer, metric, png_data_url, request, scene, user, wait_for

pytestmark = pytest.mark.skipif(
    not all(has_module(m) for m in ("fastapi", "uvicorn", "prometheus_client", "openai")),
    reason="needs the serve extra and the openai client: pip install -e '.[dev]'")


def _chat(port, body):
    return request(port, "POST", "/v1/chat/completions", body)


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def remote(tiny_bundle):
    from edgevl.serving.engine_process import RemoteVLM

    vlm = RemoteVLM(tiny_bundle, backend="onnxruntime", max_batch_size=4)
    yield vlm
    vlm.close()


@pytest.fixture
def slow(tiny_bundle):
    """One KV slot, one queue place, 40 ms decode steps inside the engine process."""
    from edgevl.serving.app import ServeConfig, create_app
    from edgevl.serving.engine_process import RemoteVLM

    vlm = RemoteVLM(tiny_bundle, backend="onnxruntime", max_batch_size=1, max_queue_size=1,
                    on_load="serving_live:slow_engine")
    server = LiveServer(create_app({"edgevl-tiny": vlm}, ServeConfig(request_timeout_s=30)))
    server.vlm = vlm
    yield server
    server.stop()
    vlm.close()


# -- answers ---------------------------------------------------------------------------------------
def test_answers_through_the_engine_process_equal_generate(remote, reference):
    from edgevl.serving.app import ServeConfig, create_app

    server = LiveServer(create_app({"edgevl-tiny": remote}, ServeConfig(close_models=False)))
    try:
        client = server.client()
        for i, q in enumerate(["describe the image.", "how many shapes are there?"]):
            image = scene(i)
            want = reference.generate(image, q, channels="rgb")
            got = client.chat.completions.create(model="edgevl-tiny", messages=user(q, png_data_url(image)))
            assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == "stop"
            assert got.usage.completion_tokens == len(want.tokens) and got.usage.prompt_tokens == want.prompt_tokens
        want = reference.generate(scene(5), "describe the image.", channels="rgb")
        stream = client.chat.completions.create(model="edgevl-tiny", stream=True, stream_options={"include_usage": True},
                                                messages=user("describe the image.", png_data_url(scene(5))))
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        assert chunks[-1].usage.completion_tokens == len(want.tokens)
        # eight at once: in-flight batching in the engine process keeps every answer exact
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: _chat(server.port, {"messages": user(
                "describe the image.", png_data_url(scene(10 + i)))}), range(8)))
        for i, (status, _, body) in enumerate(answers):
            assert status == 200
            assert body["choices"][0]["message"]["content"] == \
                reference.generate(scene(10 + i), "describe the image.", channels="rgb").text
        assert metric(server.port, "edgevl_scheduler_requests_total", model="edgevl-tiny", event="completed") >= 11
        assert request(server.port, "GET", "/ready")[0] == 200
    finally:
        server.stop()


def test_scheduler_surface_outside_an_app(remote, reference):
    """Without a loop (a script, Ray): tokens are read on a thread, errors keep their class."""
    from edgevl.errors import InputError

    image = scene(2)
    want = reference.generate(image, "what color is the circle?", channels="rgb")
    seen, timings = [], {}
    future = remote.scheduler.submit(remote.engine.encode_prompt("what color is the circle?"),
                                     remote.pixels([image], channels="rgb"), remote._params(), timings,
                                     on_token=seen.append)
    assert future.result(30) == seen == want.tokens
    assert timings["finish_reason"] == "stop" and timings["queue"] >= 0
    with pytest.raises(InputError, match="image tokens"):        # checked before anything is sent
        remote.scheduler.submit(remote.engine.encode_prompt("hi", n_images=1), None, remote._params())
    with pytest.raises(InputError, match="context"):
        remote.scheduler.submit(remote.engine.encode_prompt("hi", n_images=0), None, remote._params(max_new_tokens=10**6))


# -- queue bound, cancellation, deadline ----------------------------------------------------------
def test_full_queue_is_429_and_a_disconnect_frees_the_slot(slow):
    port = slow.port
    long = {"messages": user("describe the image."), "max_tokens": 30}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_chat, port, long)
        wait_for(lambda: metric(port, "edgevl_kv_slots_in_use", model="edgevl-tiny") == 1, what="slot in use")
        second = pool.submit(_chat, port, long)
        wait_for(lambda: metric(port, "edgevl_queue_depth", model="edgevl-tiny") == 1, what="one waiting")
        status, headers, body = _chat(port, long)
        assert status == 429 and headers.get("retry-after") == "1" and "already waiting" in body["error"]["message"]
        assert [f.result()[0] for f in (first, second)] == [200, 200]
    assert metric(port, "edgevl_scheduler_requests_total", model="edgevl-tiny", event="rejected") == 1

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": user("describe the image."), "stream": True,
                                                             "max_tokens": 400}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    t = time.monotonic()
    conn.sock.shutdown(2)
    conn.close()
    wait_for(lambda: metric(port, "edgevl_kv_slots_in_use", model="edgevl-tiny") == 0, 3.0, "the slot to be freed")
    assert time.monotonic() - t < 3.0                            # 400 tokens at 40 ms would take 16 s
    wait_for(lambda: metric(port, "edgevl_scheduler_requests_total", model="edgevl-tiny", event="cancelled") == 1)
    status, _, body = _chat(port, {"messages": user("describe the image."), "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_a_dead_engine_fails_its_requests_clearly_and_the_model_is_not_ready(slow):
    port, vlm = slow.port, slow.vlm
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_chat, port, {"messages": user("describe the image."), "max_tokens": 200})
        wait_for(lambda: metric(port, "edgevl_kv_slots_in_use", model="edgevl-tiny") == 1, what="slot in use")
        vlm.process.kill()
        status, _, body = answer.result(10)
    assert status == 503 and "engine process exited" in body["error"]["message"], body
    assert request(port, "GET", "/ready")[0] == 503
    status, _, body = _chat(port, {"messages": user("describe the image.")})
    assert status == 503 and "restart edgevl serve" in body["error"]["message"]
    assert metric(port, "edgevl_scheduler_alive", model="edgevl-tiny") == 0


# -- start-up and the processes' lifetimes --------------------------------------------------------
def test_an_engine_that_cannot_load_says_why_and_leaves_no_process(tiny_bundle):
    from edgevl.errors import EdgeVLError
    from edgevl.serving.engine_process import RemoteVLM

    with pytest.raises(EdgeVLError, match="no-such-backend"):
        RemoteVLM(tiny_bundle, backend="no-such-backend")


def test_the_engine_exits_when_its_server_process_dies(tiny_bundle):
    script = ("import sys, time; from edgevl.serving.engine_process import RemoteVLM; "
              f"v = RemoteVLM({str(tiny_bundle)!r}, backend='onnxruntime'); print(v.process.pid, flush=True); "
              "time.sleep(120)")
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        engine_pid = int(server.stdout.readline())
        assert not _gone(engine_pid)
        server.kill()                                     # no drain, no close: the pipe just closes
        server.wait(10)
        wait_for(lambda: _gone(engine_pid), 15.0, "the orphaned engine process to exit")
    finally:
        if server.poll() is None:
            server.kill()


def test_cli_serve_drains_then_stops_its_engine_process(tiny_bundle):
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "edgevl.cli.main", "serve", str(tiny_bundle), "--port", "0",
                             "--max-batch", "2"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stderr:
            if "listening on" in line:
                break
        port = int(line.rsplit(":", 1)[1])
        engines = psutil.Process(proc.pid).children()
        assert [" ".join(e.cmdline()[1:3]) for e in engines] == ["-m edgevl.serving.engine_process"]
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(_chat, port, {"messages": user("describe the image."), "max_tokens": 20})
            wait_for(lambda: metric(port, "edgevl_scheduler_requests_total", model="edgevl-tiny", event="accepted") == 1)
            proc.send_signal(signal.SIGTERM)               # Ctrl-C/SIGTERM: the engine ignores it, the server drains
            assert answer.result(20)[0] == 200
        assert proc.wait(30) == 0 and "drained and stopped" in proc.stderr.read()
        wait_for(lambda: _gone(engines[0].pid), 10.0, "the engine process to exit")
    finally:
        if proc.poll() is None:
            proc.kill()


# -- the wire ---------------------------------------------------------------------------------------
def test_wire_round_trip_and_malformed_messages():
    from edgevl.serving.engine_process import WireError, pack, unpack

    ids, pixels = np.arange(7, dtype=np.int64), np.random.default_rng(0).random((1, 3, 4, 4), dtype=np.float32)
    header, arrays = unpack(pack({"op": "submit", "rid": 3}, [ids, pixels]))
    assert header == {"op": "submit", "rid": 3}
    assert np.array_equal(arrays[0], ids) and np.array_equal(arrays[1], pixels) and arrays[1].dtype == np.float32
    data = pack({"op": "submit"}, [ids])
    for bad, words in [(data[:3], "shorter than its header"), (data[:-8], "past the end"), (data + b"x", "follow"),
                       (b"\xff\xff\xff\x00" + data[4:], "declares"), (data[:4] + b"[" + data[5:], "does not parse"),
                       (data.replace(b'"int64"', b'"objec"'), "dtype")]:
        with pytest.raises(WireError, match=words):
            unpack(bad)
    with pytest.raises(WireError, match="dtype object"):
        pack({}, [np.array([{}], dtype=object)])


def test_commands_keep_their_order_when_the_pipe_fills():
    """The server writes a command at once when the pipe takes it and nothing is queued before
    it, and otherwise queues it for its writer thread: either way the engine reads every command
    whole and in the order it was sent (here 1 MB images fill the pipe while nobody reads)."""
    import socket
    from multiprocessing.connection import Connection

    from edgevl.serving.engine_process import RemoteScheduler, unpack

    class Running:
        def poll(self):
            return None

    ours, theirs = socket.socketpair()
    events, _their_events = socket.socketpair()
    scheduler = RemoteScheduler(Running(), ours, Connection(events.detach()), codec=None, max_batch_size=1,
                                max_queue_size=1, name="t")
    big = np.arange(1 << 18, dtype=np.float32)
    for i in range(24):
        scheduler._send({"op": "n", "i": i}, [big] if i % 3 == 0 else [])
    assert scheduler._queued > 0                        # some had to wait for the writer thread
    reader = Connection(theirs.detach())
    got = [unpack(reader.recv_bytes()) for _ in range(24)]
    assert [h["i"] for h, _ in got] == list(range(24))
    assert all(np.array_equal(a[0], big) for h, a in got if h["i"] % 3 == 0)
    wait_for(lambda: scheduler._queued == 0, what="the writer thread to finish")
    scheduler._send({"op": "n", "i": 24})               # the queue is empty: written at once
    assert unpack(reader.recv_bytes())[0]["i"] == 24
    scheduler._outbox.put(None)
    reader.close()
