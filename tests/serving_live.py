"""Helpers for the serving tests: a live uvicorn server in a thread, images as data URLs, raw HTTP."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import threading
import time

import numpy as np


class LiveServer:
    """The app on uvicorn in a background thread, on a free loopback port."""

    def __init__(self, app):
        from edgevl.serving.server import bind, make_server

        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, self.sock, drain_timeout_s=30, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        until = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > until or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def scene(i: int) -> np.ndarray:
    """Test scene ``i`` of the synthetic world, RGB."""
    from edgevl.data.world import make_scene

    return make_scene("test", i).image()


def png_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *image_urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def request(port: int, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 30):
    """(status, headers, parsed JSON or text) of one raw HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw.decode("utf-8", "replace")
    return response.status, dict(response.getheaders()), payload


def metric(port: int, name: str, headers: dict | None = None, **labels) -> float:
    """One sample of /metrics (0 if absent)."""
    status, _, text = request(port, "GET", "/metrics", headers=headers)
    assert status == 200, text
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == str(v) for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    until = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > until:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def slow_down(vlm, step_s: float = 0.05) -> None:
    """Make generation long and slow: no stop token (answers run to max_tokens), slow decode steps.
    Instance attributes on this test's own engine; the scheduler reads both at each use."""
    decode = vlm.engine.decode

    def slow_decode(cache, n, tokens):
        time.sleep(step_s)
        return decode(cache, n, tokens)

    vlm.engine.decode = slow_decode
    vlm.engine.eos_ids = ()


def slow_engine(vlm) -> None:
    """``RemoteVLM(on_load="serving_live:slow_engine")``: slow_down inside the engine process."""
    slow_down(vlm, 0.04)
