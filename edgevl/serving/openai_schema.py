"""The OpenAI chat-completions format: what a request may hold, and the shapes of answers.

A request is validated with pydantic (``ChatRequest``, unknown fields forbidden) after a first
pass that names the OpenAI features edgevl does not implement (``n > 1``, tools, logprobs...),
so a client gets one 400 that says which field to drop instead of a silently different answer.

Messages map onto the bundle's single-turn prompt template: the text of the system/developer and
user messages, in order, becomes ``{prompt}`` (parts of one message joined by a space, messages
by a newline) and the ``image_url`` parts become the images, in order. A conversation with
earlier assistant turns cannot be expressed by such a template and is refused.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgevl.errors import InputError

# field -> (value that is fine, why it is not supported otherwise)
UNSUPPORTED = {
    "n": (1, "edgevl serve returns one choice per request; send n=1 (or leave it out) and repeat the request"),
    "tools": (None, "tool calling is not supported by edgevl's vision-language models; remove `tools`"),
    "tool_choice": (None, "tool calling is not supported; remove `tool_choice`"),
    "functions": (None, "function calling is not supported; remove `functions`"),
    "function_call": (None, "function calling is not supported; remove `function_call`"),
    "parallel_tool_calls": (None, "tool calling is not supported; remove `parallel_tool_calls`"),
    "logprobs": (False, "log probabilities are not returned; remove `logprobs`"),
    "top_logprobs": (None, "log probabilities are not returned; remove `top_logprobs`"),
    "logit_bias": (None, "`logit_bias` is not supported; remove it"),
    "presence_penalty": (0, "`presence_penalty` is not supported; remove it or send 0"),
    "frequency_penalty": (0, "`frequency_penalty` is not supported; remove it or send 0"),
    "audio": (None, "audio output is not supported; remove `audio`"),
    "prediction": (None, "predicted outputs are not supported; remove `prediction`"),
    "web_search_options": (None, "web search is not supported; remove `web_search_options`"),
    "reasoning_effort": (None, "`reasoning_effort` is not supported; remove it"),
}
# accepted and ignored: they describe the caller, not the answer
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "verbosity"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None      # the openai client may send it; nothing to obfuscate here


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text"]] | None = None
    n: int | None = None
    logprobs: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass
class ParsedChat:
    """A validated request, reduced to what generation needs."""
    model: str | None
    prompt: str
    image_urls: list[str]
    sampling: dict                       # SamplingParams fields given by the client (others: bundle defaults)
    stop: list[str]
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


def _format_validation(error: ValidationError) -> str:
    parts = []
    for e in error.errors()[:3]:
        where = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("list[", "str", "function-")))
        parts.append(f"{where or 'body'}: {e['msg']}")
    more = len(error.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_chat_request(body) -> ParsedChat:
    """The JSON body of POST /v1/chat/completions -> ParsedChat, or InputError naming the problem."""
    if not isinstance(body, dict):
        raise InputError(f"the request body must be a JSON object, got {type(body).__name__}")
    for name, (fine, why) in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != fine and not (fine is None and value in ([], {})):
            raise InputError(f"`{name}`={value!r} is not supported: {why}")
    try:
        req = ChatRequest.model_validate({k: v for k, v in body.items() if k not in IGNORED})
    except ValidationError as e:
        raise InputError(f"invalid chat completion request: {_format_validation(e)}") from None
    if any(m.role == "assistant" for m in req.messages):
        raise InputError("conversation history (assistant messages) is not supported: the bundle's prompt "
                         "template takes one question; send the system and user messages of one turn")
    if req.messages[-1].role != "user":
        raise InputError(f"the last message must come from the user, got role {req.messages[-1].role!r}")
    texts, images = [], []
    for m in req.messages:
        if isinstance(m.content, str):
            texts.append(m.content)
        elif m.content:
            texts.append(" ".join(p.text for p in m.content if isinstance(p, TextPart)))
            images += [p.image_url.url for p in m.content if isinstance(p, ImagePart)]
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise InputError(f"`stop` takes up to 4 non-empty strings, got {stop!r}")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise InputError("`max_tokens` and `max_completion_tokens` disagree; send one of them")
    sampling = {"max_new_tokens": req.max_completion_tokens or req.max_tokens, "temperature": req.temperature,
                "top_p": req.top_p, "seed": req.seed}
    return ParsedChat(model=req.model, prompt="\n".join(t for t in texts if t), image_urls=images,
                      sampling={k: v for k, v in sampling.items() if v is not None}, stop=stop, stream=req.stream,
                      include_usage=bool(req.stream_options and req.stream_options.include_usage))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(chat: ParsedChat, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {"id": chat.id, "object": "chat.completion", "created": chat.created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(chat: ParsedChat, model: str, delta: dict, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    """One streamed ``chat.completion.chunk``; the usage chunk has no choices, as OpenAI sends it."""
    out = {"id": chat.id, "object": "chat.completion.chunk", "created": chat.created, "model": model,
           "system_fingerprint": None,
           "choices": [] if usage_ is not None else
           [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
