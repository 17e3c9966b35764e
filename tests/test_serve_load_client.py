"""The load generator's HTTP client (benchmarks/serve_load.SSEClient): what the committed load and
soak figures count must be what the server sent (tokens, statuses, disconnects)."""

from __future__ import annotations

import pytest

from conftest import has_module
from serving_live import LiveServer, png_data_url, scene, user

pytestmark = pytest.mark.skipif(
    not all(has_module(m) for m in ("fastapi", "uvicorn", "prometheus_client")),
    reason="needs the serve extra: pip install -e '.[serve]'")


@pytest.fixture(scope="module")
def server(tiny_bundle):
    import edgevl
    from edgevl.serving.app import ServeConfig, create_app

    vlm = edgevl.load(tiny_bundle, backend="onnxruntime", batching=True, max_batch_size=4, verbose=False)
    live = LiveServer(create_app({"edgevl-tiny": vlm}, ServeConfig()))
    yield live
    live.stop()
    vlm.close()


def test_counts_tokens_statuses_and_disconnects_as_the_server_sent_them(server, reference):
    from edgevl.benchmarks.serve_load import SSEClient

    client = SSEClient(server.port)
    want = reference.generate(scene(3), "describe the image.", channels="rgb")
    body = {"messages": user("describe the image.", png_data_url(scene(3))), "stream": True,
            "stream_options": {"include_usage": True}}
    status, ttft, latency, tokens = client.chat(body)
    assert (status, tokens) == ("200", len(want.tokens)) and 0 < ttft <= latency
    sock = client.sock
    assert client.chat({"messages": body["messages"]})[::3] == ("200", len(want.tokens))   # a plain answer
    assert client.sock is sock                                    # the kept-alive connection was reused
    bad = {"messages": user("describe the image.", "data:image/png;base64,aGVsbG8=")}
    assert client.chat(bad)[0] == "400" and client.sock is sock   # an error answer keeps the connection
    status, ttft, _, _ = client.chat(body, abandon=True)
    assert status == "disconnect" and ttft is not None and client.sock is None
    assert client.chat(body)[::3] == ("200", len(want.tokens))    # a new connection after the abandoned one
