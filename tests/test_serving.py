"""edgevl serve on edgevl-tiny: the official openai client (plain, streaming, images, usage), answers
equal to edgevl.load().generate(), and every documented error over raw HTTP."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import has_module
from serving_live import LiveServer, metric, png_data_url, request, scene, slow_down, user, wait_for

pytestmark = pytest.mark.skipif(
    not all(has_module(m) for m in ("fastapi", "uvicorn", "prometheus_client", "openai")),
    reason="needs the serve extra and the openai client: pip install -e '.[dev]'")

QUESTIONS = ["describe the image.", "how many shapes are there?", "what color is the circle?"]


def load(bundle, **kw):
    import edgevl

    return edgevl.load(bundle, backend="onnxruntime", batching=True, verbose=False, **kw)


@pytest.fixture(scope="module")
def vlm(tiny_bundle):
    v = load(tiny_bundle, max_batch_size=4)
    yield v
    v.close()


@pytest.fixture(scope="module")
def live(vlm):
    from edgevl.serving.app import ServeConfig, create_app

    server = LiveServer(create_app({"edgevl-tiny": vlm}, ServeConfig(close_models=False, max_body_mb=1)))
    yield server
    server.stop()


@pytest.fixture
def slow(tiny_bundle):
    """A server whose one KV slot and one queue place fill up: answers of max_tokens, 40 ms a step."""
    from edgevl.serving.app import ServeConfig, create_app

    v = load(tiny_bundle, max_batch_size=1, max_queue_size=1)
    slow_down(v, 0.04)
    server = LiveServer(create_app({"edgevl-tiny": v}, ServeConfig(request_timeout_s=30)))
    server.vlm = v
    yield server
    server.stop()
    v.close()


# -- the official client --------------------------------------------------------------------------
def test_openai_client_answers_equal_generate_token_for_token(live, reference):
    client = live.client()
    for i, q in enumerate(QUESTIONS):
        image = scene(i)
        want = reference.generate(image, q, channels="rgb")
        got = client.chat.completions.create(model="edgevl-tiny", messages=user(q, png_data_url(image)))
        assert got.choices[0].message.content == want.text
        assert got.choices[0].finish_reason == want.finish_reason == "stop"
        assert got.usage.completion_tokens == len(want.tokens)
        assert got.usage.prompt_tokens == want.prompt_tokens
        assert got.usage.total_tokens == want.prompt_tokens + len(want.tokens)
        assert reference.engine.tokenizer.encode(got.choices[0].message.content).ids == want.tokens


def test_openai_client_streaming(live, reference):
    image = scene(3)
    want = reference.generate(image, QUESTIONS[0], channels="rgb")
    stream = live.client().chat.completions.create(model="edgevl-tiny", messages=user(QUESTIONS[0], png_data_url(image)),
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == want.text
    assert len(pieces) == len(want.tokens)             # one piece per token for this tokenizer
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(want.tokens) and chunks[-1].usage.prompt_tokens == want.prompt_tokens


def test_content_chunk_template_is_the_chunk_byte_for_byte():
    from edgevl.serving import openai_schema as oa
    from edgevl.serving.app import _ContentChunks, _sse

    chat = oa.parse_chat_request({"messages": user("hi"), "stream": True})
    render = _ContentChunks(chat, "edgevl-tiny")
    for piece in ["a", " red circle", 'say "hi"\n', "back\\slash", "caf\u00e9 \u732b", "\0", "</script>"]:
        assert render(piece) == _sse(oa.chunk(chat, "edgevl-tiny", {"content": piece}))


def _events_of(vlm, tokens: list[int], error: BaseException | None = None) -> list[tuple[str, bool]]:
    """What a stream sends when all of ``tokens`` (and the end) are already delivered."""
    import asyncio
    from concurrent.futures import Future

    from edgevl.serving import openai_schema as oa
    from edgevl.serving.app import _Run
    from edgevl.serving.generation import _END, Submission
    from edgevl.serving.metrics import ServerMetrics

    async def scenario():
        sub = Submission.__new__(Submission)
        sub.queue, sub.tokens, sub.timings, sub.first_token_at = asyncio.Queue(), [], {"finish_reason": "length"}, None
        sub.future = Future()
        sub.future.set_exception(error) if error else sub.future.set_result(list(tokens))
        for t in [*tokens, _END]:
            sub.queue.put_nowait(t)
        chat = oa.parse_chat_request({"messages": user("hi"), "stream": True,
                                      "stream_options": {"include_usage": True}})
        run = _Run(vlm, "edgevl-tiny", chat, sub, time.monotonic(), 7, ServerMetrics({"edgevl-tiny": vlm}))
        first = await run.next_piece()
        return [e async for e in run.events(first)]

    return asyncio.run(scenario())


def test_tokens_already_delivered_go_out_in_one_write_each_its_own_event(vlm):
    tokens = vlm.engine.encode_prompt("a red circle and a blue square", n_images=0)[-5:].tolist()
    writes = _events_of(vlm, tokens)
    assert len(writes) == 1 and writes[0][1] is True          # one write, and it ends the body
    events = [line[6:] for line in writes[0][0].split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert len(pieces) == len(tokens) and "".join(pieces) == vlm.engine.decode_tokens(tokens)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": len(tokens), "total_tokens": 7 + len(tokens)}


def test_an_error_after_delivered_tokens_keeps_their_text_then_reports_it(vlm):
    from edgevl.errors import DeadlineExceeded

    tokens = vlm.engine.encode_prompt("a red circle and a blue square", n_images=0)[-4:].tolist()
    writes = _events_of(vlm, tokens, DeadlineExceeded("ran past its deadline"))
    assert [last for _, last in writes] == [False, True]
    sent = [json.loads(line[6:]) for text, _ in writes for line in text.split("\n\n") if line.startswith("data: {")]
    pieces = [c["choices"][0]["delta"].get("content") for c in sent if c.get("choices")][1:]
    assert "".join(pieces) == vlm.engine.decode_tokens(tokens)
    assert "deadline" in sent[-1]["error"]["message"] and writes[-1][0].endswith("data: [DONE]\n\n")


def test_sampling_fields_and_max_tokens(live, reference):
    client = live.client()
    image, q = scene(5), QUESTIONS[0]
    sampled = dict(temperature=0.9, top_p=0.8, seed=7)
    want = reference.generate(image, q, channels="rgb", **sampled)
    got = [client.chat.completions.create(model="edgevl-tiny", messages=user(q, png_data_url(image)), **sampled)
           for _ in range(2)]
    assert got[0].choices[0].message.content == got[1].choices[0].message.content == want.text
    short = client.chat.completions.create(model="edgevl-tiny", messages=user(q, png_data_url(image)),
                                           max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert short.choices[0].message.content == reference.engine.decode_tokens(
        reference.generate(image, q, channels="rgb").tokens[:3])


def test_stop_strings_end_the_answer(live, reference):
    image = scene(1)
    full = reference.generate(image, QUESTIONS[0], channels="rgb").text
    assert " and " in full
    want = full[:full.index(" and ")]
    client = live.client()
    plain = client.chat.completions.create(model="edgevl-tiny", messages=user(QUESTIONS[0], png_data_url(image)),
                                           stop=[" and ", "zzz"])
    assert plain.choices[0].message.content == want and plain.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="edgevl-tiny", messages=user(QUESTIONS[0], png_data_url(image)),
                                              stop=" and ", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want


def test_text_only_and_system_message(live, reference):
    want = reference.generate(None, "system says\nhow many shapes are there?")
    got = live.client().chat.completions.create(
        model="edgevl-tiny", messages=[{"role": "system", "content": "system says"},
                                       {"role": "user", "content": "how many shapes are there?"}])
    assert got.choices[0].message.content == want.text


def test_models_health_ready(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == ["edgevl-tiny"]
    assert request(live.port, "GET", "/health")[:3:2] == (200, {"status": "ok"})
    status, _, body = request(live.port, "GET", "/ready")
    assert status == 200 and body["models"] == ["edgevl-tiny"]
    status, _, body = request(live.port, "GET", "/v1/models/nope")
    assert status == 404 and "nope" in body["error"]["message"]


def test_metrics_count_requests_tokens_and_latency(live):
    before = metric(live.port, "edgevl_generated_tokens_total", model="edgevl-tiny")
    ok_before = metric(live.port, "edgevl_requests_total", model="edgevl-tiny", outcome="ok")
    got = live.client().chat.completions.create(model="edgevl-tiny", messages=user("describe the image.",
                                                                                   png_data_url(scene(2))))
    assert metric(live.port, "edgevl_generated_tokens_total", model="edgevl-tiny") == before + got.usage.completion_tokens
    assert metric(live.port, "edgevl_requests_total", model="edgevl-tiny", outcome="ok") == ok_before + 1
    for name in ("edgevl_time_to_first_token_seconds_count", "edgevl_request_latency_seconds_count",
                 "edgevl_queue_wait_seconds_count", "edgevl_decode_batch_size_count"):
        assert metric(live.port, name, model="edgevl-tiny") >= 1, name
    assert metric(live.port, "edgevl_kv_slots", model="edgevl-tiny") == 4


# -- errors, over raw HTTP ------------------------------------------------------------------------
def _chat(port, body, headers=None):
    return request(port, "POST", "/v1/chat/completions", body, headers)


@pytest.mark.parametrize("change, status, words", [
    ({"n": 2}, 400, ["`n`", "one choice"]),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, ["tools", "not supported"]),
    ({"logprobs": True}, 400, ["logprobs"]),
    ({"frobnicate": 1}, 400, ["frobnicate", "not permitted"]),
    ({"temperature": -1}, 400, ["temperature"]),
    ({"model": "gpt-4o"}, 404, ["gpt-4o", "edgevl-tiny"]),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                   {"role": "user", "content": "and?"}]}, 400, ["assistant", "one turn"]),
    ({"messages": user("describe", "data:image/png;base64,%%%notbase64")}, 400, ["image 1", "base64"]),
    ({"messages": user("describe", "data:image/png;base64," + base64.b64encode(b"not an image at all").decode())},
     400, ["image 1", "cannot be decoded"]),
    ({"messages": user("describe", "https://example.com/cat.png")}, 400, ["http(s) URL", "--allow-remote-images"]),
    ({"messages": user("describe", "/etc/passwd")}, 400, ["local path", "--allow-local-images"]),
    ({"messages": user("count " * 600)}, 400, ["context", "512"]),
    ({"max_tokens": 510}, 400, ["context", "new tokens"]),
])
def test_bad_requests_get_a_4xx_naming_the_problem(live, change, status, words):
    body = {"model": "edgevl-tiny", "messages": user("describe the image.", png_data_url(scene(0))), **change}
    got, _, payload = _chat(live.port, body)
    assert got == status, payload
    message = payload["error"]["message"]
    for w in words:
        assert w in message, (w, message)


def test_too_many_images_and_bad_json(live):
    url = png_data_url(scene(0))
    status, _, body = _chat(live.port, {"messages": user("describe", url, url)})
    assert status == 400 and "2 images" in body["error"]["message"] and "--max-images" in body["error"]["message"]
    status, _, body = request(live.port, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert metric(live.port, "edgevl_requests_total", model="edgevl-tiny", outcome="bad_request") >= 2


def test_body_over_the_limit_is_413(live):
    big = {"messages": user("describe", "data:image/png;base64," + "A" * (2 * 2**20))}
    status, _, body = _chat(live.port, big)
    assert status == 413 and "--max-body-mb" in body["error"]["message"]
    # a chunked body (no Content-Length) is cut off once it passes the limit
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=iter([b"x" * 2**19] * 4),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "--max-body-mb" in json.loads(response.read())["error"]["message"]
    conn.close()


def test_api_key_is_required_and_checked(vlm):
    from edgevl.serving.app import ServeConfig, create_app

    server = LiveServer(create_app({"edgevl-tiny": vlm}, ServeConfig(api_key="s3cret", close_models=False)))
    try:
        body = {"messages": user("how many shapes are there?")}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            status, h, payload = _chat(server.port, body, headers)
            assert status == 401 and "API key" in payload["error"]["message"] and h.get("www-authenticate") == "Bearer"
        assert request(server.port, "GET", "/metrics")[0] == 401
        assert request(server.port, "GET", "/v1/models")[0] == 401
        assert request(server.port, "GET", "/health")[0] == 200
        assert _chat(server.port, body, {"Authorization": "Bearer s3cret"})[0] == 200
        assert server.client(api_key="s3cret").models.list().data[0].id == "edgevl-tiny"
        from openai import AuthenticationError

        with pytest.raises(AuthenticationError):
            server.client(api_key="nope").chat.completions.create(model="edgevl-tiny", messages=body["messages"])
    finally:
        server.stop()


def test_full_queue_answers_429_with_retry_after(slow):
    long = {"messages": user("describe the image."), "max_tokens": 40}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_chat, slow.port, long)
        wait_for(lambda: metric(slow.port, "edgevl_kv_slots_in_use", model="edgevl-tiny") == 1, what="slot in use")
        second = pool.submit(_chat, slow.port, long)
        wait_for(lambda: metric(slow.port, "edgevl_queue_depth", model="edgevl-tiny") == 1, what="one waiting")
        status, headers, body = _chat(slow.port, long)
        assert status == 429 and headers.get("retry-after") == "1", body
        assert "already waiting" in body["error"]["message"]
        for f in (first, second):
            status, _, body = f.result()
            assert status == 200 and body["usage"]["completion_tokens"] == 40
    assert metric(slow.port, "edgevl_requests_total", model="edgevl-tiny", outcome="rejected") == 1


def test_disconnect_mid_stream_frees_the_slot_at_once(slow):
    port = slow.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": user("describe the image."), "stream": True,
                                                             "max_tokens": 400}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")          # the answer is under way
    assert metric(port, "edgevl_kv_slots_in_use", model="edgevl-tiny") == 1
    t = time.monotonic()
    conn.sock.shutdown(2)
    conn.close()
    wait_for(lambda: metric(port, "edgevl_kv_slots_in_use", model="edgevl-tiny") == 0, 3.0, "the slot to be freed")
    assert time.monotonic() - t < 3.0                            # 400 tokens at 40 ms would take 16 s
    wait_for(lambda: metric(port, "edgevl_scheduler_requests_total", model="edgevl-tiny", event="cancelled") == 1)
    assert metric(port, "edgevl_requests_total", model="edgevl-tiny", outcome="cancelled") == 1
    # the freed slot serves the next request at once
    status, _, body = _chat(port, {"messages": user("describe the image."), "max_tokens": 5})
    assert status == 200 and body["usage"]["completion_tokens"] == 5


def test_disconnect_while_waiting_cancels_a_non_streaming_request(slow):
    port = slow.port
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_chat, port, {"messages": user("describe the image."), "max_tokens": 30})
        wait_for(lambda: metric(port, "edgevl_kv_slots_in_use", model="edgevl-tiny") == 1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": user("describe the image.")}),
                     {"Content-Type": "application/json"})
        wait_for(lambda: metric(port, "edgevl_queue_depth", model="edgevl-tiny") == 1, what="second request waiting")
        conn.sock.shutdown(2)
        conn.close()
        wait_for(lambda: metric(port, "edgevl_queue_depth", model="edgevl-tiny") == 0, 3.0, "the waiting one to go")
        assert first.result()[0] == 200
    wait_for(lambda: metric(port, "edgevl_requests_total", model="edgevl-tiny", outcome="cancelled") == 1)


def test_request_past_its_deadline_fails_clearly(tiny_bundle):
    from edgevl.serving.app import ServeConfig, create_app

    v = load(tiny_bundle, max_batch_size=1)
    slow_down(v, 0.03)
    server = LiveServer(create_app({"edgevl-tiny": v}, ServeConfig(request_timeout_s=0.3)))
    try:
        status, _, body = _chat(server.port, {"messages": user("describe the image."), "max_tokens": 100})
        assert status == 504 and "deadline" in body["error"]["message"] and "--request-timeout" in body["error"]["message"]
        from openai import APIError

        stream = server.client().chat.completions.create(model="edgevl-tiny", messages=user("describe the image."),
                                                         max_tokens=100, stream=True)
        with pytest.raises(APIError, match="deadline"):
            for _ in stream:
                pass
        assert metric(server.port, "edgevl_requests_total", model="edgevl-tiny", outcome="timeout") == 2
        assert metric(server.port, "edgevl_kv_slots_in_use", model="edgevl-tiny") == 0
    finally:
        server.stop()
        v.close()


def test_local_and_remote_images_only_when_enabled(vlm, reference, tmp_path):
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from PIL import Image

    from edgevl.serving.app import ServeConfig, create_app
    from edgevl.serving.images import ImagePolicy

    image = scene(6)
    Image.fromarray(image).save(tmp_path / "scene.png")
    want = reference.generate(image, "describe the image.", channels="rgb").text
    files = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: SimpleHTTPRequestHandler(*a, directory=str(tmp_path)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    server = LiveServer(create_app({"edgevl-tiny": vlm}, ServeConfig(
        close_models=False, images=ImagePolicy(local_dir=tmp_path, allow_remote=True))))
    try:
        for url in ("scene.png", str(tmp_path / "scene.png"), (tmp_path / "scene.png").as_uri(),
                    f"http://127.0.0.1:{files.server_address[1]}/scene.png"):
            status, _, body = _chat(server.port, {"messages": user("describe the image.", url)})
            assert status == 200 and body["choices"][0]["message"]["content"] == want, (url, body)
        status, _, body = _chat(server.port, {"messages": user("describe the image.", "../../etc/passwd")})
        assert status == 400 and "outside the allowed image folder" in body["error"]["message"]
    finally:
        server.stop()
        files.shutdown()


# -- shutdown -------------------------------------------------------------------------------------
def test_drain_finishes_in_flight_answers_then_stops(tiny_bundle):
    from edgevl.serving.app import ServeConfig, create_app

    v = load(tiny_bundle, max_batch_size=2)
    slow_down(v, 0.03)
    server = LiveServer(create_app({"edgevl-tiny": v}, ServeConfig()))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": user("describe the image."), "stream": True,
                                                             "stream_options": {"include_usage": True}, "max_tokens": 40}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(_chat, server.port, {"messages": user("describe the image."), "max_tokens": 40})
        wait_for(lambda: metric(server.port, "edgevl_kv_slots_in_use", model="edgevl-tiny") == 2)
        server.server.handle_exit(signal.SIGTERM, None)       # what uvicorn's SIGTERM handler does
        assert server.app.state.draining
        events = response.read().decode().split("\n\n")
        status, _, body = plain.result()
    assert events[-2] == "data: [DONE]"
    streamed = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert streamed[-1]["usage"]["completion_tokens"] == 40 and streamed[-2]["choices"][0]["finish_reason"] == "length"
    assert status == 200 and body["usage"]["completion_tokens"] == 40
    server.thread.join(20)
    assert not server.thread.is_alive()
    assert not v.scheduler.alive                    # the app closed its models after the drain
    with pytest.raises(OSError):
        request(server.port, "GET", "/health", timeout=2)


def test_cli_serve_exits_cleanly_on_sigterm(tiny_bundle):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgevl.cli.main", "serve", str(tiny_bundle), "--port", "0",
                             "--max-batch", "2"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        port = int(lines[-1].rsplit(":", 1)[1])
        assert _chat(port, {"model": "edgevl-tiny", "messages": user("how many shapes are there?")})[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "drained and stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
