"""The HTTP app: OpenAI chat completions over the in-flight scheduler, health, metrics, a web page.

    app = create_app({"edgevl-tiny": edgevl.load(bundle, batching=True)}, ServeConfig(api_key="..."))

Routes: ``POST /v1/chat/completions`` (plain and server-sent events), ``GET /v1/models``,
``GET /health`` (liveness: the process answers), ``GET /ready`` (readiness: every scheduler
alive and not draining; 503 otherwise), ``GET /metrics`` (Prometheus) and ``GET /`` (the page).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
request (the message names the field, image or limit), 401 without the API key, 404 for an
unknown model, 413 for a body over the limit, 429 with ``Retry-After`` when the queue is full,
503 while draining, 504 past ``request_timeout_s``. A request whose client goes away is
cancelled, which frees its KV slot at the scheduler's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from edgevl.errors import DeadlineExceeded, EdgeVLError, InputError, QueueFull, ShutdownError
from edgevl.serving.generation import Submission, TextStream
from edgevl.serving.images import ImagePolicy, load_image
from edgevl.serving.metrics import ServerMetrics
from edgevl.serving import openai_schema as oa

log = logging.getLogger("edgevl.serve")

# A request body up to this size (a prompt and a small image) is decoded, preprocessed and
# tokenized on the event loop: that costs less than the hop to a worker thread on a busy CPU
# (edgevl-tiny, 16 streaming clients, 2-core EPYC: time to first token p50 37-38 ms against
# 45-48 ms through the thread pool). Bigger bodies (a camera frame) go to the pool, so decoding a
# large image, or reading a file or URL, never holds up the streams.
INLINE_PREPARE_BYTES = 64 << 10


@dataclass
class ServeConfig:
    api_key: str | None = None               # None: no auth (the server binds to 127.0.0.1 by default)
    request_timeout_s: float | None = 120.0  # whole request, queue wait included; None: no deadline
    max_body_mb: float = 20.0
    max_images: int = 1                      # per request
    retry_after_s: int = 1                   # told to clients that got 429
    images: ImagePolicy = field(default_factory=ImagePolicy)
    close_models: bool = True                # close the VLMs when the app shuts down


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None,
                 headers: dict | None = None, outcome: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers, self.outcome = headers or {}, outcome

    def response(self) -> JSONResponse:
        return JSONResponse(oa.error_body(self.message, self.type, self.code), self.status, headers=self.headers)


def problem_for(error: BaseException) -> HTTPProblem:
    """An edgevl error (or any exception) -> the HTTP answer a client should get."""
    if isinstance(error, HTTPProblem):
        return error
    if isinstance(error, QueueFull):
        return HTTPProblem(429, str(error), "rate_limit_error", "queue_full", outcome="rejected")
    if isinstance(error, DeadlineExceeded):
        return HTTPProblem(504, f"{error} (the server's --request-timeout)", "timeout_error", "request_timeout",
                           outcome="timeout")
    if isinstance(error, ShutdownError):
        return HTTPProblem(503, str(error), "server_error", "shutting_down", outcome="unavailable")
    if isinstance(error, InputError):
        return HTTPProblem(400, str(error), "invalid_request_error", "invalid_request")
    if isinstance(error, EdgeVLError):
        return HTTPProblem(500, str(error), "server_error", type(error).__name__, outcome="error")
    return HTTPProblem(500, f"internal error: {type(error).__name__}: {error}", "server_error", "internal_error",
                       outcome="error")


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before the app parses them (a declared
    Content-Length at once; a chunked body as soon as it passes the limit)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, int(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, size)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, size: int) -> None:
        mb = self.max_bytes / 2**20
        problem = HTTPProblem(413, f"the request body is {'at least ' if size else ''}{size} bytes, over the server's "
                                   f"limit of {mb:g} MB (--max-body-mb); send a smaller image", "invalid_request_error",
                              "body_too_large")
        await problem.response()(scope, receive, send)


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _or_disconnect(request: Request, coro, submission: Submission):
    """Await ``coro``; if the client disconnects first, cancel the request and raise ClientGone."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        submission.cancel()
        work.cancel()
        raise ClientGone()
    return work.result()


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


def _sse(data) -> str:
    return f"data: {json.dumps(data, separators=(',', ':')) if not isinstance(data, str) else data}\n\n"


class _ContentChunks:
    """``_sse(oa.chunk(chat, model, {"content": piece}))`` byte for byte, from a template made once
    per answer: only the piece is JSON-encoded per token (the rest of the chunk never changes)."""

    def __init__(self, chat: oa.ParsedChat, model: str):
        whole = _sse(oa.chunk(chat, model, {"content": "\0"}))
        self.head, _, self.tail = whole.partition(json.dumps("\0"))

    def __call__(self, piece: str) -> str:
        return self.head + json.dumps(piece) + self.tail


class _EventStream(Response):
    """The ASGI response of a streamed answer (server-sent events), leaner than Starlette's
    StreamingResponse on the path every token takes (benchmarks/serve_load.py, issue 17):

    - no task group per response: one task watches for the client's disconnect and cancels the
      stream, which cancels the request (its KV slot is freed at the scheduler's next step);
    - the role chunk goes out with the first piece, and the finish, usage and ``[DONE]`` events
      with the end of the HTTP body, so an answer of N pieces takes N + 2 socket writes, not N + 6;
    - pieces whose tokens are already here when the stream wakes up go out in one write (each
      still its own event, as OpenAI clients expect)."""

    media_type = "text/event-stream"

    def __init__(self, run: "_Run", first: str | None):
        self.run, self.first = run, first
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        me = asyncio.current_task()
        watch = asyncio.ensure_future(_until_disconnect(receive))
        watch.add_done_callback(lambda w: me.cancel() if not w.cancelled() else None)
        events = self.run.events(self.first)
        try:
            async for text, last in events:
                await send({"type": "http.response.body", "body": text.encode(), "more_body": not last})
        except asyncio.CancelledError:
            if not watch.done() or watch.cancelled():
                raise                      # cancelled from outside (shutdown), not by the client leaving
            if hasattr(me, "uncancel"):    # Python >= 3.11
                me.uncancel()              # the client went away: the request is cancelled, nothing to send
        finally:
            watch.cancel()
            await events.aclose()          # the request is cancelled and counted now, not when collected


def create_app(models: dict, config: ServeConfig | None = None) -> FastAPI:
    """``models``: served name -> VLM loaded with ``batching=True`` (the first is the default)."""
    config = config or ServeConfig()
    if not models:
        raise InputError("create_app needs at least one model")
    for name, vlm in models.items():
        if vlm.scheduler is None:
            raise InputError(f"model {name!r} was loaded without batching; load it with "
                             "edgevl.load(bundle, batching=True)")
    metrics = ServerMetrics(models)
    created = int(time.time())
    key = config.api_key.encode() if config.api_key else None

    @asynccontextmanager
    async def lifespan(app):
        for vlm in models.values():       # an engine process's tokens are read on this loop
            if hasattr(vlm.scheduler, "start_reading"):
                vlm.scheduler.start_reading(asyncio.get_running_loop())
        yield
        if config.close_models:   # after uvicorn has drained connections: finish what is left, then close
            for vlm in models.values():
                await run_in_threadpool(vlm.close)
        for vlm in models.values():
            if hasattr(vlm.scheduler, "stop_reading"):
                vlm.scheduler.stop_reading()

    app = FastAPI(title="edgevl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=int(config.max_body_mb * 2**20))
    app.state.draining = False
    app.state.models = models
    app.state.metrics = metrics

    @app.exception_handler(HTTPProblem)
    async def _problem(request, exc: HTTPProblem):
        return exc.response()

    def authorize(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise HTTPProblem(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
                                   "the key the server was started with (--api-key or EDGEVL_API_KEY)",
                              "invalid_request_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"},
                              outcome="unauthorized")

    def pick(name: str | None) -> tuple[str, object]:
        if name is None or name == "":
            return next(iter(models.items()))
        if name not in models:
            raise HTTPProblem(404, f"model {name!r} is not served here; served: {', '.join(models)} "
                                   "(see GET /v1/models)", "invalid_request_error", "model_not_found",
                              outcome="not_found")
        return name, models[name]

    def prepare(vlm, chat: oa.ParsedChat):
        """Images decoded and preprocessed, prompt tokenized and checked (runs in a worker thread)."""
        if len(chat.image_urls) > config.max_images:
            raise InputError(f"the request has {len(chat.image_urls)} images; this server takes at most "
                             f"{config.max_images} per request (--max-images)")
        images = [load_image(url, config.images, i + 1) for i, url in enumerate(chat.image_urls)]
        pixels = vlm.pixels(images, channels="rgb") if images else None
        ids = vlm.engine.encode_prompt(chat.prompt, n_images=len(images))
        params = vlm._params(**chat.sampling)
        vlm.engine.check_context(len(ids), params.max_new_tokens)
        return ids, pixels, params

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        dead = [n for n, vlm in models.items() if not vlm.scheduler.alive]
        if app.state.draining or dead:
            why = "draining (shutting down)" if app.state.draining else f"scheduler not running: {', '.join(dead)}"
            return JSONResponse({"status": "unavailable", "reason": why}, 503)
        return {"status": "ready", "models": list(models)}

    @app.get("/metrics")
    async def prometheus(request: Request):
        authorize(request)
        body, content_type = await run_in_threadpool(metrics.render)   # may ask an engine process
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("edgevl.serving").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "edgevl"}
                                           for n in models]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request):
        authorize(request)
        pick(name)
        return {"id": name, "object": "model", "created": created, "owned_by": "edgevl"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        name, outcome = "-", "error"
        try:
            authorize(request)
            if app.state.draining:
                raise HTTPProblem(503, "the server is shutting down and takes no new requests; retry on another "
                                       "replica", "server_error", "shutting_down",
                                  {"Retry-After": str(config.retry_after_s)}, outcome="unavailable")
            try:
                raw = await request.body()
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"the request body is not valid JSON ({e})") from None
            chat = oa.parse_chat_request(body)
            name, vlm = pick(chat.model)
            if len(raw) <= INLINE_PREPARE_BYTES and all(u.startswith("data:") for u in chat.image_urls):
                ids, pixels, params = prepare(vlm, chat)
            else:
                ids, pixels, params = await run_in_threadpool(prepare, vlm, chat)
            submission = Submission(vlm.scheduler, ids, pixels, params, config.request_timeout_s)
            metrics.prompt.labels(name).inc(len(ids))
            run = _Run(vlm, name, chat, submission, arrived, len(ids), metrics)
            if chat.stream:
                first = await _or_disconnect(request, run.next_piece(), submission)
                outcome = "streaming"         # the response's generator records the outcome from here
                return _EventStream(run, first)
            answer = await _or_disconnect(request, run.complete(), submission)
            outcome = "ok"
            return JSONResponse(answer)
        except ClientGone:
            outcome = "cancelled"
            return Response(status_code=499)   # nobody reads it; logged as 499 like nginx does
        except Exception as e:
            problem = problem_for(e)
            outcome = problem.outcome
            if problem.status == 429:
                problem.headers["Retry-After"] = str(config.retry_after_s)
            if problem.status >= 500:
                log.warning("chat completion failed: %s", problem.message)
            return problem.response()
        finally:
            if outcome != "streaming":
                metrics.requests.labels(name, outcome).inc()

    return app


class _Run:
    """One accepted request: turns tokens into text pieces, answers, chunks and metrics."""

    def __init__(self, vlm, name: str, chat: oa.ParsedChat, submission: Submission, arrived: float,
                 prompt_tokens: int, metrics: ServerMetrics):
        self.vlm, self.name, self.chat, self.sub = vlm, name, chat, submission
        self.arrived, self.prompt_tokens, self.metrics = arrived, prompt_tokens, metrics
        self.text = TextStream(vlm.engine.decode_tokens, chat.stop)
        self.done = False

    def _consume(self, token: int | None) -> str:
        """One delivered token (None: the end) -> its new text, "" while held back for a stop
        string. The end, or a stop string that matched (which frees the slot), sets ``done``."""
        if token is None:
            self.done = True
            return self.text.finish()
        piece = self.text.push(token)
        if self.text.stopped:
            self.done = True
            self.sub.cancel()
        return piece

    async def next_piece(self) -> str | None:
        """The next non-empty piece of text, or None when the answer is complete."""
        while not self.done:
            token = await self.sub.next_token()
            if token is not None and len(self.sub.tokens) == 1:
                self.metrics.ttft.labels(self.name).observe(time.monotonic() - self.arrived)
                if "queue" in self.sub.timings:
                    self.metrics.queue_wait.labels(self.name).observe(self.sub.timings["queue"] / 1e3)
            if piece := self._consume(token):
                return piece
        return None

    @property
    def finish_reason(self) -> str:
        return "stop" if self.text.stopped else self.sub.finish_reason

    def _finished(self) -> None:
        self.metrics.latency.labels(self.name).observe(time.monotonic() - self.arrived)
        self.metrics.generated.labels(self.name).inc(len(self.sub.tokens))

    async def complete(self) -> dict:
        pieces = []
        while (piece := await self.next_piece()) is not None:
            pieces.append(piece)
        self._finished()
        return oa.completion(self.chat, self.name, "".join(pieces), self.finish_reason, self.prompt_tokens,
                             len(self.sub.tokens))

    def _ready_pieces(self, pieces: list, render) -> None:
        """Append ``render(piece)`` for the tokens already delivered, without waiting for more (a
        request's error raises here, after the pieces before it were appended)."""
        while not self.done and not self.sub.queue.empty():
            if piece := self._consume(self.sub.take_nowait()):
                pieces.append(render(piece))

    async def events(self, first: str | None):
        """-> (server-sent events as one string, whether it ends the stream)."""
        outcome = "error"
        content = _ContentChunks(self.chat, self.name)
        try:
            out = [_sse(oa.chunk(self.chat, self.name, {"role": "assistant", "content": ""}))]
            piece = first
            while piece is not None:
                out.append(content(piece))
                try:
                    self._ready_pieces(out, content)
                except Exception:
                    yield "".join(out), False      # what was generated before the error, then the error
                    out = []
                    raise
                if self.done:
                    break
                yield "".join(out), False
                out = []
                piece = await self.next_piece()
            self._finished()
            out.append(_sse(oa.chunk(self.chat, self.name, {}, self.finish_reason)))
            if self.chat.include_usage:
                out.append(_sse(oa.chunk(self.chat, self.name, {}, usage_=oa.usage(self.prompt_tokens,
                                                                                 len(self.sub.tokens)))))
            out.append(_sse("[DONE]"))
            outcome = "ok"
            yield "".join(out), True
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"        # the client went away mid-stream
            raise
        except Exception as e:          # e.g. the deadline passed mid-answer: tell the client in the stream
            problem = problem_for(e)
            outcome = problem.outcome
            yield _sse(oa.error_body(problem.message, problem.type, problem.code)) + _sse("[DONE]"), True
        finally:
            self.sub.cancel()
            self.metrics.requests.labels(self.name, outcome).inc()


def page_path() -> Path:
    """The web page's file inside the installed package."""
    return Path(str(resources.files("edgevl.serving").joinpath("static/index.html")))
