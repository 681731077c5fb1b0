"""OpenAI-compatible HTTP server over a shared `Engine` (Starlette on uvicorn).

    from grok.server import serve
    serve(engine, host="0.0.0.0", port=8000, model_name="grok-1", api_key="sk-...",
          chat_template="my_template.json")  # optional; see `grok.chat` for the format

Endpoints:
- `POST /v1/completions`: the legacy completions API. `prompt` is text, token ids, or a list of
  either (one choice per prompt and per `n`); `max_tokens` (default 16), `temperature` (default 1),
  `top_p` (default 1), `top_k` (an extension; 0 is off), `seed` (choice i of a prompt samples with
  `seed + i`; no seed means a random one), `stop` (up to 4 strings), `n`, `logprobs` (0..8,
  OpenAI's legacy format), `echo` (the prompt's text starts each choice's text: the prompt string
  as sent, or token ids decoded; streamed, it is each choice's first chunk), `stream` (server-sent
  events ending in `data: [DONE]`, with a usage chunk when `stream_options.include_usage`).
  `echo` with `logprobs` is refused (400, param "echo"): the engine does not score prompt tokens.
  `best_of`, `suffix`, penalties and `logit_bias` are accepted only at their neutral values.
  Unknown fields are refused.
- `POST /v1/chat/completions`: the chat API. `messages` (roles system, user and assistant; content
  a string or a list of `{"type": "text", "text": ...}` parts, joined with "\n"; `name` is
  accepted and not used) is rendered to one prompt by the chat template (`grok.chat`: a file
  given to `serve`, by default "System: ...", "User: ...", "Assistant: ..." lines and then
  "Assistant:"), and the template's stop strings (by default "\nUser:") join the request's `stop`.
  Then it is generated as a completion: the same sampling fields, `n`, `seed`, `stream`,
  `stream_options` and errors; `max_tokens` or `max_completion_tokens` (default: up to the end of
  the context), `logprobs: true` with `top_logprobs` (0..8) in the chat format. Answers are
  `chat.completion` objects (`choices[i].message`), or streamed `chat.completion.chunk`s: first
  each choice's role delta, then content deltas, then a chunk with its `finish_reason`, then
  `data: [DONE]`. `tools`, `tool_choice` and `response_format` are accepted at their neutral values.
- `GET /v1/models` (and `/v1/models/{id}`), `GET /health`, `GET /metrics` (Prometheus text).

Every request goes through the one engine (continuous batching); the event loop only waits.
A client that goes away cancels its streams at once, which frees their batch slots. Bad input is
answered with a 4xx and an OpenAI-style error naming the field, before anything reaches the
engine, so it never disturbs other requests. When `engine.queued` plus the new request's choices
would exceed `max_queue`, the answer is 429 at once (with `Retry-After`).

Life cycle: at start-up the engine compiles every program it runs (`Engine.warm_up`); until then
`/health` and completions answer 503 "loading" (an engine that was already running is taken as
warm). Told to stop (SIGTERM, or `should_exit` on the `uvicorn_server`), the server admits nothing
more (503 "shutting down"), lets open requests run for `graceful_shutdown_s`, then ends each with a
final "shutting down" error (a streamed event, or the JSON answer), and `serve` returns.

With an `api_key`, every `/v1/...` request needs `Authorization: Bearer <key>` (else 401).
`/health` and `/metrics` stay open: load balancers and Prometheus probe them without secrets,
and they reveal no request content.

`max_tokens` may be at most the engine's `cache_len`; a prompt must leave room for one new token.
A generation that fills the context ends with finish_reason "length". Bodies over 4 MiB get 413, a
body not received within `BODY_TIMEOUT_S` 408. The work a body may cause is bounded before it is
parsed: one with more JSON values than the request could use (prompts x tokens) is refused unread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import secrets
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Sequence, TypeVar

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from grok.chat import ChatTemplate
from grok.engine import MAX_TOP_LOGPROBS, Engine, Stream, TokenEvent
from grok.engine import Request as EngineRequest
from grok.sampling import SamplingParams
from grok.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

API_KEY_ENV = "GROK_API_KEY"  # where the CLI reads the key from when `--api-key` is not given
MAX_BODY_BYTES = 4 << 20
BODY_TIMEOUT_S = 60.0  # for the whole body to arrive (else 408)
DRAIN_MAX_BYTES = 64 << 20  # of an unread body, read and dropped after an early answer (413, 408, 401)
DRAIN_TIMEOUT_S = 5.0  # ... for at most this long, then the connection is closed
MAX_OTHER_VALUES = 1024  # JSON values a request may hold besides its prompts' token ids (see `_Server._parse`)
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_CHOICES = 64  # prompts x n per request (and never more than max_queue)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_TEMPERATURE = 1e4  # far beyond any useful value, well inside float32
SHUTDOWN_WAIT_S = 10.0  # how long shutdown waits for cancelled streams to end
UNAVAILABLE = {  # `_Server.status` other than "ok": what a refused request is told
    "loading": "the model is loading (compiling its programs); retry shortly",
    "shutting down": "the server is shutting down",
    "engine stopped": "the engine is not running",
}

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# ---------------------------------------------------------------------------------- errors


class APIError(Exception):
    """Answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII JSON: a message may quote the request, and so hold a lone surrogate, which UTF-8 cannot
        return Response(json.dumps(self.body(), separators=(",", ":")), status_code=self.status, headers=self.headers,
                        media_type="application/json")


def _from_validation(err: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming its field."""
    first = err.errors(include_url=False)[0]
    kind, loc = first["type"], first["loc"]
    if kind == "string_unicode" and not loc:  # pydantic cannot even name such a field
        return APIError(400, "A field name holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                        "which is not a character")
    if not loc:
        return APIError(400, "The request body must be a JSON object")
    param = str(loc[0])
    if param in ("stream_options", "messages"):  # named to the field inside: messages[1].role
        param += "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])
        if kind == "content_part":  # named to the part: messages[1].content[0].type
            param += first["ctx"]["part"]
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param)
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'", param)
    if isinstance(first.get("input"), _LongInteger):
        digits = first["input"].digits
        return APIError(400, f"Invalid value for '{param}': an integer of {digits} digits is out of range", param)
    return APIError(400, f"Invalid value for '{param}': {first['msg']}", param)


# ---------------------------------------------------------------------------------- JSON


@dataclasses.dataclass(frozen=True)
class _LongInteger:
    """A JSON integer too long for Python to convert (`sys.get_int_max_str_digits`); left in the
    parsed body so that validation refuses it by its field."""

    digits: int


def _integer(text: str) -> int | _LongInteger:
    try:
        return int(text)
    except ValueError:
        return _LongInteger(len(text.lstrip("-")))


def _load_json(text: str) -> Any:
    """The body parsed by the standard library, which keeps what validation should refuse by field
    (a lone surrogate escape, an integer out of range, NaN) rather than failing the whole document."""
    try:
        return json.loads(text, parse_int=_integer)
    except RecursionError:
        raise APIError(400, "The request body is not valid JSON: it is nested too deeply") from None
    except json.JSONDecodeError as err:
        raise APIError(400, f"The request body is not valid JSON: {err}") from None


def _json_values(text: str, limit: int) -> int:
    """About how many values a JSON text holds: one per `,` `[` `{` outside its strings, which is
    what parsing it costs. Only a count over `limit` cuts the strings out to count again (escaped
    backslashes and quotes dropped first, the remaining quotes delimit the strings)."""

    def count(part: str) -> int:
        return part.count(",") + part.count("[") + part.count("{")

    values = count(text)
    if values > limit:
        values = count("".join(text.replace("\\\\", "").replace('\\"', "").split('"')[::2]))
    return values


def _text(value: str) -> str:
    """A string that UTF-8 can hold: JSON can escape a lone UTF-16 surrogate (`\\ud800`), no character."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PydanticCustomError(
            "lone_surrogate", "a lone surrogate (\\u{code}) at character {at} is not a character",
            {"code": f"{ord(value[err.start]):04x}", "at": err.start},
        ) from None
    return value


Text = Annotated[str, AfterValidator(_text)]


# ---------------------------------------------------------------------------------- request schema


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # sent by some clients; nothing to obfuscate here


class _GenerationRequest(BaseModel):
    """The fields both generating endpoints take, validated strictly (no "16" for 16, no true for 1)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: Any = Field(None, validate_default=True)  # normalized by `_stop` to a tuple of strings
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Accepted at their neutral values only (clients such as LangChain always send them).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[Text, float] | None = None
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        stops = [value] if isinstance(value, str) else [] if value is None else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise PydanticCustomError("stop", "must be a string or a list of strings")
        if len(stops) > MAX_STOP:
            raise PydanticCustomError("stop", f"at most {MAX_STOP} stop strings are allowed, got {len(stops)}")
        if "" in stops:
            raise PydanticCustomError("stop", "stop strings must not be empty")
        return tuple(map(_text, stops))

    def _refusals(self) -> list[tuple[str, bool, str]]:
        """(param, refused, message) of each option this server does not do."""
        return [
            ("presence_penalty", bool(self.presence_penalty), "presence_penalty is not supported (use 0)"),
            ("frequency_penalty", bool(self.frequency_penalty), "frequency_penalty is not supported (use 0)"),
            ("logit_bias", any((self.logit_bias or {}).values()), "logit_bias is not supported (use 0 biases)"),
        ]

    def unsupported(self) -> APIError | None:
        """The first option set to something this server does not do."""
        for param, refused, message in self._refusals():
            if refused:
                return APIError(400, message, param)
        if self.stream_options is not None and not self.stream:
            return APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        return None


class CompletionRequest(_GenerationRequest):
    """The body of `POST /v1/completions`."""

    prompt: Any  # normalized by `_prompts` to a list of texts and token-id lists
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = None  # accepted at neutral values only, as below
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> list[str | list[int]]:
        if isinstance(value, str):
            return [_text(value)]
        if isinstance(value, list) and value:
            if all(_is_token(x) for x in value):
                return [value]
            if all(isinstance(x, str) for x in value):
                return [_text(x) for x in value]
            if all(isinstance(x, list) and all(_is_token(t) for t in x) for x in value):
                return value
        raise PydanticCustomError(
            "prompt", "must be a string, a list of strings, a list of token ids or a list of token-id lists"
        )

    def _refusals(self) -> list[tuple[str, bool, str]]:
        return [
            ("echo", bool(self.echo) and self.logprobs is not None,
             "echo with logprobs is not supported: this server does not score prompt tokens (leave out one of them)"),
            ("best_of", self.best_of not in (None, self.n or 1), "best_of must equal n (or be left out)"),
            ("suffix", bool(self.suffix), "suffix is not supported"),
            *super()._refusals(),
        ]


class ChatMessage(BaseModel):
    """One of `messages`: its content normalized to a string."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: Any
    name: Text | None = None  # accepted (OpenAI allows it); the template does not use it

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str:
        if isinstance(value, str):
            return _text(value)
        if not isinstance(value, list):
            raise PydanticCustomError("content", "must be a string or a list of text parts")
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                raise _part_error(i, "", 'a content part must be an object {"type": "text", "text": ...}')
            if part.get("type") != "text":
                kind = part.get("type")
                raise _part_error(i, ".type", f"only text parts are supported, got {kind!r}" if "type" in part
                                  else "a content part needs \"type\": \"text\"")
            for key in part:
                if key not in ("type", "text"):
                    raise _part_error(i, f".{key}", f"unknown field {key!r} in a text part")
            if not isinstance(part.get("text"), str):
                raise _part_error(i, ".text", "a text part needs \"text\": a string")
            texts.append(_text(part["text"]))
        return "\n".join(texts)


def _part_error(index: int, field: str, message: str) -> PydanticCustomError:
    """An error in one part of a message's content; `_from_validation` adds `part` to the param."""
    return PydanticCustomError("content_part", "{problem}", {"problem": message, "part": f"[{index}]{field}"})


class ChatRequest(_GenerationRequest):
    """The body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Accepted at their neutral values only.
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: Any = None

    @property
    def requested_tokens(self) -> tuple[int | None, str]:
        """The completion's token limit and the field that set it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def _refusals(self) -> list[tuple[str, bool, str]]:
        return [
            ("max_completion_tokens", None not in (self.max_tokens, self.max_completion_tokens)
             and self.max_tokens != self.max_completion_tokens,
             "max_tokens and max_completion_tokens differ; give one of them"),
            ("top_logprobs", self.top_logprobs is not None and not self.logprobs,
             "top_logprobs needs logprobs: true"),
            ("tools", bool(self.tools), "tools are not supported"),
            ("tool_choice", self.tool_choice not in (None, "none"), "tool_choice is not supported (use \"none\")"),
            ("response_format", self.response_format not in (None, {"type": "text"}),
             'response_format is not supported (use {"type": "text"})'),
            *super()._refusals(),
        ]


RequestBody = TypeVar("RequestBody", CompletionRequest, ChatRequest)


def _is_token(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics of one app, in their own registry."""

    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "grok_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter("grok_prompt_tokens", "Prompt tokens of accepted requests", registry=registry)
        self.generated_tokens = Counter("grok_generated_tokens", "Completion tokens generated", registry=registry)
        self.finished = Counter(
            "grok_choices_finished", "Choices (streams) ended, by engine finish reason", ["reason"], registry=registry
        )
        self.cancelled = Counter(
            "grok_requests_cancelled", "Requests ended early: client disconnected or server shutting down",
            registry=registry,
        )
        self.ttft = Histogram(
            "grok_time_to_first_token_seconds", "From acceptance to the first generated token, per choice",
            buckets=TTFT_BUCKETS, registry=registry,
        )
        Gauge("grok_queue_depth", "Streams waiting for a batch slot", registry=registry).set_function(
            lambda: engine.queued
        )
        Gauge("grok_active_slots", "Batch slots generating", registry=registry).set_function(lambda: engine.active)
        Gauge("grok_batch_slots", "Batch slots in the engine (max_batch)", registry=registry).set(engine.max_batch)
        Gauge("grok_batch_occupancy", "Active slots / max_batch", registry=registry).set_function(
            lambda: engine.active / max(engine.max_batch, 1)
        )
        registry.register(_EngineCounts(engine))
        if engine.prefix_cache is not None:
            cache = engine.prefix_cache
            Gauge("grok_prefix_cache_blocks", "Blocks the prefix cache holds", registry=registry).set_function(
                lambda: cache.used
            )
            Gauge("grok_prefix_cache_capacity_blocks", "Blocks the prefix cache can hold", registry=registry).set(
                cache.capacity
            )


class _EngineCounts(Collector):
    """The engine's own counts (`Engine.stats`) as Prometheus counters."""

    HELP = {
        "prefill_tokens": "Prompt tokens prefilled (computed)",
        "prefix_hit_tokens": "Prompt tokens restored from the prefix cache instead of computed",
        "decode_steps": "Decode steps run",
        "speculative_steps": "Decode steps that verified proposed tokens",
        "proposed": "Tokens proposed by prompt lookup",
        "accepted": "Proposed tokens accepted",
    }

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        for key, text in self.HELP.items():
            name = "grok_speculative_tokens_" + key if key in ("proposed", "accepted") else "grok_" + key
            yield CounterMetricFamily(name, text, value=self.engine.stats[key])


class _CountRequests:
    """ASGI middleware: counts every HTTP response by endpoint and status (500 if none was sent)."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()


class _DrainBody:
    """ASGI middleware for answers sent before the request body was read (413, 408, 401, 404...):
    they say `Connection: close`, and before they end, the rest of the body is read and dropped
    (up to DRAIN_MAX_BYTES, for up to DRAIN_TIMEOUT_S). Closing a socket with unread bytes resets
    the connection, and a client still sending its body would see that reset, not the answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers", ())) if scope["type"] == "http" else {}
        if headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # no body to read
        unread = True

        async def tracking_receive():
            nonlocal unread
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                unread = False
            return message

        async def draining_send(message):
            if unread and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            elif unread and message["type"] == "http.response.body" and not message.get("more_body", False):
                await send({**message, "more_body": True})
                await _drain(tracking_receive)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, tracking_receive, draining_send)


async def _drain(receive: Callable) -> None:
    """Read and drop the rest of a request body, within DRAIN_MAX_BYTES and DRAIN_TIMEOUT_S."""
    dropped = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while dropped <= DRAIN_MAX_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                dropped += len(message.get("body", b""))


# ---------------------------------------------------------------------------------- serving


@dataclasses.dataclass(frozen=True)
class _Token:
    """A generated token as `logprobs` reports it."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the engine's alternatives: (token id, logprob)
    offset: int  # characters of the choice's text before this token's


@dataclasses.dataclass(frozen=True)
class _Step:
    """What one engine event added to a choice."""

    text: str
    tokens: tuple[_Token, ...]  # the token it generated, when logprobs are asked for and it counts
    finish_reason: str | None  # the engine's


@dataclasses.dataclass
class _Choice:
    """What one stream has produced so far, whatever the endpoint."""

    index: int
    logprobs: bool  # whether the answer reports logprobs
    text: list[str] = dataclasses.field(default_factory=list)
    chars: int = 0
    tokens: list[_Token] = dataclasses.field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None  # the engine's

    def add(self, event: TokenEvent) -> _Step:
        counted = event.finish_reason not in ("stop", "cancelled")  # as `Stream.result` counts tokens
        tokens: tuple[_Token, ...] = ()
        if counted:
            self.completion_tokens += 1
            if self.logprobs:
                tokens = (_Token(event.token_id, event.logprob, event.top_logprobs, self.chars),)
                self.tokens.extend(tokens)
        self.text.append(event.text)
        self.chars += len(event.text)
        self.finish_reason = event.finish_reason
        return _Step(event.text, tokens, event.finish_reason)


class _TextFormat:
    """`/v1/completions` answers: `text_completion` objects, logprobs in OpenAI's legacy format."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, token_name: Callable[[int], str], echo: list[str] | None = None):
        self.name = token_name
        self.echo = echo  # each choice's prompt text, with `echo`

    def opening(self, choices: list[_Choice]) -> list[dict[str, Any]]:
        """Streamed before any token: each choice's prompt, with `echo`."""
        if self.echo is None:
            return []
        return [{"index": c.index, "text": self.echo[c.index], "logprobs": None, "finish_reason": None}
                for c in choices]

    def deltas(self, choice: _Choice, step: _Step) -> list[dict[str, Any]]:
        logprobs = self._logprobs(step.tokens) if choice.logprobs else None
        return [{"index": choice.index, "text": step.text, "logprobs": logprobs,
                 "finish_reason": FINISH_REASONS.get(step.finish_reason)}]

    def final(self, choice: _Choice) -> dict[str, Any]:
        text = "".join(choice.text)
        return {
            "index": choice.index, "text": text if self.echo is None else self.echo[choice.index] + text,
            "logprobs": self._logprobs(choice.tokens) if choice.logprobs else None,
            "finish_reason": FINISH_REASONS.get(choice.finish_reason),
        }

    def _logprobs(self, tokens: Sequence[_Token]) -> dict[str, list]:
        name = self.name
        tops = []
        for token in tokens:
            top = {name(t): lp for t, lp in token.top}
            top.setdefault(name(token.id), token.logprob)  # OpenAI always reports the chosen token
            tops.append(top)
        return {
            "tokens": [name(t.id) for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": tops, "text_offset": [t.offset for t in tokens],
        }


class _ChatFormat:
    """`/v1/chat/completions` answers: `chat.completion` objects (`chat.completion.chunk` streamed)."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, token_name: Callable[[int], str], token_bytes: Callable[[int], list[int] | None]):
        self.name, self.bytes = token_name, token_bytes

    def opening(self, choices: list[_Choice]) -> list[dict[str, Any]]:
        """Streamed before any token: each choice's role."""
        return [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for c in choices]

    def deltas(self, choice: _Choice, step: _Step) -> list[dict[str, Any]]:
        """A content delta (if the step has text or a token to report), then a finish delta at the end."""
        deltas = []
        if step.text or step.tokens:
            logprobs = {"content": self._content(step.tokens), "refusal": None} if choice.logprobs else None
            deltas.append({"index": choice.index, "delta": {"content": step.text}, "logprobs": logprobs,
                           "finish_reason": None})
        if step.finish_reason is not None:
            deltas.append({"index": choice.index, "delta": {}, "logprobs": None,
                           "finish_reason": FINISH_REASONS.get(step.finish_reason)})
        return deltas

    def final(self, choice: _Choice) -> dict[str, Any]:
        logprobs = {"content": self._content(choice.tokens), "refusal": None} if choice.logprobs else None
        return {
            "index": choice.index, "message": {"role": "assistant", "content": "".join(choice.text)},
            "logprobs": logprobs, "finish_reason": FINISH_REASONS.get(choice.finish_reason),
        }

    def _content(self, tokens: Sequence[_Token]) -> list[dict[str, Any]]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            return {"token": self.name(token_id), "logprob": logprob, "bytes": self.bytes(token_id)}

        return [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in tokens]


_Format = _TextFormat | _ChatFormat


class _Server:
    """The app's state and handlers."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None, max_queue: int,
                 chat_template: ChatTemplate):
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.max_queue = max_queue
        self.chat_template = chat_template
        self.max_choices = max(1, min(MAX_CHOICES, max_queue))
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.streams: set[Stream] = set()  # submitted and not yet ended
        self.pumps: set[asyncio.Task] = set()
        self.token_name = functools.lru_cache(maxsize=1 << 16)(self._token_name)
        self.token_bytes = functools.lru_cache(maxsize=1 << 16)(self._token_bytes)
        self.ready = False  # the engine is warm and running
        self.closing = False  # shutting down: nothing more is admitted

    @property
    def status(self) -> str:
        """What `/health` says: "ok", or why requests are refused (a key of UNAVAILABLE)."""
        if self.closing:
            return "shutting down"
        if not self.ready:
            return "loading"
        return "ok" if self.engine.running else "engine stopped"

    # ------------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        # `Stream.__aiter__` waits in the loop's default executor, one thread per waiting stream:
        # size it for every stream that can be in flight (the default has only cpu_count + 4).
        workers = self.engine.max_batch + self.max_queue + MAX_CHOICES + 8
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grok-server")
        )
        started_here = not self.engine.running
        # An engine started elsewhere is its owner's to warm; this one is warmed before it starts.
        warming = asyncio.create_task(self._warm_up()) if started_here else None
        self.ready = not started_here
        logger.info("serving %s: %d slots of %d tokens", self.model_name, self.engine.max_batch, self.engine.cache_len)
        try:
            yield
        finally:
            self.closing = True
            if warming is not None:
                warming.cancel()  # the engine is not started; a warm-up under way finishes in its thread
            self.cancel_streams()
            if self.pumps:  # the engine ends each cancelled stream at its next step
                await asyncio.wait(list(self.pumps), timeout=SHUTDOWN_WAIT_S)
            if started_here:
                await asyncio.to_thread(self.engine.stop)

    async def _warm_up(self) -> None:
        start = time.monotonic()
        try:
            await asyncio.to_thread(self.engine.warm_up)
        except Exception:  # serve anyway: then the first requests compile what they run
            logger.exception("warming up the engine failed")
        self.engine.start()
        self.ready = True
        logger.info("ready: the engine's programs compiled in %.1f s", time.monotonic() - start)

    def close(self, grace_s: float | None) -> None:
        """Begin shutting down: admit nothing more; after `grace_s` (None: never), end every open
        request (each gets a final "shutting down" error)."""
        self.closing = True
        if grace_s is not None:
            asyncio.get_running_loop().call_later(grace_s, self.cancel_streams)

    def cancel_streams(self) -> None:
        for stream in list(self.streams):
            stream.cancel()

    # ------------------------------------------------------------------ endpoints

    async def health(self, request: Request) -> Response:
        status = self.status
        body = {"status": status, "active": self.engine.active, "queued": self.engine.queued}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    async def metrics_text(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        self._check_model(request.path_params["model"])
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._parse(request, CompletionRequest)
        count = len(body.prompt)
        max_tokens = self._check(body, body.max_tokens, "max_tokens", DEFAULT_MAX_TOKENS, count)
        prompts = [await self._encode(p, f"prompt {i}" if count > 1 else "the prompt", "prompt")
                   for i, p in enumerate(body.prompt)]
        echo = None
        if body.echo:
            tokenizer = self.engine.grok.tokenizer
            if tokenizer is None and not all(isinstance(p, str) for p in body.prompt):
                raise APIError(400, "echo of token ids needs a tokenizer, which this model has not", "echo")
            texts = [p if isinstance(p, str) else tokenizer.decode(ids) for p, ids in zip(body.prompt, prompts)]
            echo = [text for text in texts for _ in range(body.n or 1)]  # choice i is of prompt i // n
        return await self._generate(request, body, prompts, max_tokens, body.stop, body.logprobs,
                                    _TextFormat(self.token_name, echo))

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._parse(request, ChatRequest)
        max_tokens = self._check(body, *body.requested_tokens, self.engine.cache_len, 1)
        if self.engine.grok.tokenizer is None:
            raise APIError(400, "chat needs a tokenizer to encode the messages, which this model has not", "messages")
        template = self.chat_template
        prompt = template.render((m.role, m.content) for m in body.messages)
        ids = await self._encode(prompt, "the chat prompt (the messages in the chat template)", "messages")
        stop = body.stop + tuple(s for s in template.stop if s not in body.stop)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await self._generate(request, body, [ids], max_tokens, stop, logprobs,
                                    _ChatFormat(self.token_name, self.token_bytes))

    def _check(self, body: _GenerationRequest, max_tokens: int | None, param: str, default: int, prompts: int) -> int:
        """What the engine would refuse (or choke on) in the fields both endpoints share, as a 4xx
        naming the field; returns max_tokens (`default` when not given)."""
        self._check_model(body.model)
        error = body.unsupported()
        if error is not None:
            raise error
        cache_len = self.engine.cache_len
        max_tokens = default if max_tokens is None else max_tokens
        if max_tokens > cache_len:
            raise APIError(400, f"{param} is {max_tokens}; the context holds {cache_len} tokens", param)
        if body.stop and self.engine.grok.tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer, which this model has not", "stop")
        choices = prompts * (body.n or 1)
        if choices > self.max_choices:
            param = "n" if prompts == 1 else "prompt"
            raise APIError(400, f"prompts x n is {choices}; at most {self.max_choices} are served", param)
        return max_tokens

    async def _generate(
        self, request: Request, body: _GenerationRequest, prompts: list[list[int]], max_tokens: int,
        stop: tuple[str, ...], logprobs: int | None, answer: _Format,
    ) -> Response:
        """Run checked prompts (`n` choices each) and answer in the endpoint's format, streamed or not."""
        run = _Run(self, self._submit(body, prompts, max_tokens, stop, logprobs), request, logprobs is not None)
        head = {"id": f"{answer.id_prefix}{uuid.uuid4().hex}", "object": answer.object, "created": int(time.time()),
                "model": self.model_name}
        prompt_tokens = sum(map(len, prompts))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._sse(run, answer, {**head, "object": answer.chunk_object}, prompt_tokens, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        async for _ in run.events():
            pass
        if run.disconnected:  # nobody reads this answer; 499 (nginx's "client closed request") for the metrics
            return Response(status_code=499)
        for choice in run.choices:
            if choice.finish_reason not in FINISH_REASONS:
                raise _ended_early(choice.finish_reason)
        usage = _usage(prompt_tokens, sum(c.completion_tokens for c in run.choices))
        return JSONResponse({**head, "choices": [answer.final(c) for c in run.choices], "usage": usage})

    def _submit(
        self, body: _GenerationRequest, prompts: list[list[int]], max_tokens: int, stop: tuple[str, ...],
        logprobs: int | None,
    ) -> list[Stream]:
        """One stream per prompt and choice (choice i samples with seed + i), or 429/503 at once."""
        engine = self.engine
        n = body.n or 1
        status = self.status
        if status != "ok":
            raise APIError(503, UNAVAILABLE[status], type="server_error", code=status.replace(" ", "_"),
                           headers={"Retry-After": "1"} if status == "loading" else None)
        # Synchronous from this check to the submits: no other request can take the room checked here.
        if engine.queued + len(prompts) * n > self.max_queue:
            raise APIError(
                429, f"the queue is full ({engine.queued} waiting); retry shortly", type="rate_limit_error",
                code="queue_full", headers={"Retry-After": "1"},
            )
        seed = secrets.randbits(32) if body.seed is None else body.seed
        sampling = [
            SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=min(body.top_k or 0, engine.grok.config.vocab_size),  # the engine holds it as int32
                seed=(seed + i) % (1 << 32),  # the engine holds it as uint32
            )
            for i in range(n)
        ]
        streams: list[Stream] = []
        try:
            for ids in prompts:
                for params in sampling:
                    streams.append(engine.submit(EngineRequest(ids, max_tokens, params, stop, logprobs or 0)))
        except ValueError as err:  # `_check` should have caught it; never leave half a request running
            for stream in streams:
                stream.cancel()
            raise APIError(400, str(err)) from None
        self.metrics.prompt_tokens.inc(sum(map(len, prompts)))
        return streams

    async def _sse(
        self, run: _Run, answer: _Format, head: dict, prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[str]:
        extra = {"usage": None} if include_usage else {}
        try:
            for choice in answer.opening(run.choices):
                yield _event_line({**head, "choices": [choice], **extra})
            async for choice, step in run.events():
                if step.finish_reason is not None and step.finish_reason not in FINISH_REASONS:
                    yield _event_line(_ended_early(step.finish_reason).body())
                    return
                for delta in answer.deltas(choice, step):
                    yield _event_line({**head, "choices": [delta], **extra})
        except Exception:
            logger.exception("streaming failed")
            yield _event_line(APIError(500, "internal error while generating", type="server_error").body())
            return
        if include_usage:
            completion_tokens = sum(c.completion_tokens for c in run.choices)
            yield _event_line({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ helpers

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(
                401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           "model", code="model_not_found")

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "grok",
                "max_model_len": self.engine.cache_len}

    async def _parse(self, request: Request, schema: type[RequestBody]) -> RequestBody:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
                    chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the request") from None
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
                           code="request_timeout") from None
        try:
            text = b"".join(chunks).decode("utf-8")
        except UnicodeDecodeError as err:
            raise APIError(400, f"The request body is not valid UTF-8 (byte {err.start})") from None
        # Parsing costs about one unit per JSON value; a request uses at most `max_choices` prompts of
        # `cache_len` token ids, and a few other values. Beyond that the body is refused unparsed.
        limit = self.max_choices * self.engine.cache_len + MAX_OTHER_VALUES
        values = _json_values(text, limit)
        if values > limit:
            raise APIError(
                400, f"the request body holds about {values} JSON values; at most {limit} are accepted "
                f"({self.max_choices} prompts of {self.engine.cache_len - 1} token ids, and the other fields)",
            )
        try:
            return schema.model_validate(_load_json(text))
        except ValidationError as err:
            raise _from_validation(err) from None

    async def _encode(self, prompt: str | list[int], where: str, param: str) -> list[int]:
        """Token ids of one prompt (`where` names it in errors), checked against the vocabulary and the context."""
        try:
            ids = await asyncio.to_thread(self.engine.grok.encode, prompt) if isinstance(prompt, str) else (
                self.engine.grok.encode(prompt)
            )
        except ValueError as err:
            raise APIError(400, f"{where}: {err}", param) from None
        if not ids:
            raise APIError(400, f"{where} is empty", param)
        if len(ids) >= self.engine.cache_len:
            raise APIError(
                400, f"{where} has {len(ids)} tokens; this model's context holds {self.engine.cache_len}, "
                "and at least one must be left for the completion", param,
            )
        return ids

    def _token_name(self, token_id: int) -> str:
        """A token as named in `logprobs`: its text; a lone byte of a UTF-8 character as
        OpenAI writes it (`bytes:\\xNN`); `<|token:ID|>` when it has no text of its own."""
        tokenizer = self.engine.grok.tokenizer
        text = tokenizer.decode([token_id]) if tokenizer is not None else ""
        if text and "\ufffd" not in text:
            return text
        if isinstance(tokenizer, ByteTokenizer) and 0 <= token_id - tokenizer.BYTE_OFFSET < 256:
            return f"bytes:\\x{token_id - tokenizer.BYTE_OFFSET:02x}"
        return f"<|token:{token_id}|>"

    def _token_bytes(self, token_id: int) -> list[int] | None:
        """A token's UTF-8 bytes, as chat `logprobs` report them (None for a token with no text)."""
        tokenizer = self.engine.grok.tokenizer
        if isinstance(tokenizer, ByteTokenizer) and 0 <= token_id - tokenizer.BYTE_OFFSET < 256:
            return [token_id - tokenizer.BYTE_OFFSET]
        name = self.token_name(token_id)
        return None if name.startswith("<|token:") else list(name.encode("utf-8"))


class _Run:
    """The streams of one HTTP request, merged into one sequence of streamed choices.

    Each stream is read (`async for`) by its own task that runs to the stream's last event, so a
    stream's thread never waits forever; the request's client going away cancels them all.
    """

    def __init__(self, server: _Server, streams: list[Stream], request: Request, logprobs: bool):
        self.server = server
        self.streams = streams
        self.request = request
        self.choices = [_Choice(i, logprobs) for i in range(len(streams))]
        self.disconnected = False
        self._queue: asyncio.Queue[tuple[int, TokenEvent | BaseException]] = asyncio.Queue()
        self._accepted = time.monotonic()
        server.streams.update(streams)
        for i, stream in enumerate(streams):
            task = asyncio.create_task(self._pump(i, stream))
            server.pumps.add(task)
            task.add_done_callback(server.pumps.discard)
        # Watched from now on, even if the response never starts (the client left before).
        self._watcher = asyncio.create_task(self._watch_disconnect())

    async def _pump(self, index: int, stream: Stream) -> None:
        metrics = self.server.metrics
        first = True
        try:
            async for event in stream:
                if first and event.token_id >= 0:
                    metrics.ttft.observe(time.monotonic() - self._accepted)
                first = False
                if event.finish_reason not in ("stop", "cancelled"):
                    metrics.generated_tokens.inc()
                if event.finish_reason is not None:
                    metrics.finished.labels(event.finish_reason).inc()
                self._queue.put_nowait((index, event))
        except Exception as err:  # never expected; reported to the request, not lost
            self._queue.put_nowait((index, err))
        finally:
            self.server.streams.discard(stream)

    async def _watch_disconnect(self) -> None:
        """Cancel the streams as soon as the client goes away (also for non-streamed requests)."""
        while (await self.request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.01)
        if not all(stream.done for stream in self.streams):
            self.disconnected = True
        for stream in self.streams:
            stream.cancel()

    async def events(self) -> AsyncIterator[tuple[_Choice, _Step]]:
        """Each event as what it added to its choice (see `_Choice.add`), until every stream has ended."""
        remaining = len(self.streams)
        try:
            while remaining:
                index, event = await self._queue.get()
                if isinstance(event, BaseException):
                    raise event
                if event.finish_reason is not None:
                    remaining -= 1
                choice = self.choices[index]
                yield choice, choice.add(event)
        finally:
            self._watcher.cancel()
            early = remaining > 0 or any(c.finish_reason == "cancelled" for c in self.choices)
            if early:
                self.server.metrics.cancelled.inc()
            for stream in self.streams:  # the engine drops cancelled streams at its next step
                stream.cancel()


def _ended_early(reason: str) -> APIError:
    """The error for a choice that the engine ended without a result ("cancelled", or a failure)."""
    if reason == "cancelled":  # a client that went away reads nothing, so this is for a shutdown
        return APIError(503, "the request was cancelled: the server is shutting down", type="server_error")
    return APIError(500, f"generation failed ({reason})", type="server_error")


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event_line(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------- app


def create_app(
    engine: Engine, model_name: str, api_key: str | None = None, max_queue: int = 64,
    chat_template: ChatTemplate | str | Path | None = None,
) -> Starlette:
    """The ASGI app. Its lifespan starts the engine (and stops it if it started it). `chat_template`:
    a `ChatTemplate` or its file (None: the default, `grok.chat.DEFAULT_TEMPLATE`)."""
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if not isinstance(chat_template, ChatTemplate):
        chat_template = ChatTemplate.load(chat_template)
    server = _Server(engine, model_name, api_key or None, max_queue, chat_template)

    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code in (404, 405) else exc.detail
        return APIError(exc.status_code, message, headers=exc.headers).response()

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal server error", type="server_error").response()

    app = Starlette(
        routes=[
            Route("/v1/completions", server.completions, methods=["POST"]),
            Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/v1/models/{model:path}", server.model, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
            Route("/metrics", server.metrics_text, methods=["GET"]),
        ],
        middleware=[Middleware(_CountRequests, metrics=server.metrics), Middleware(_DrainBody)],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error},
        lifespan=server.lifespan,
    )
    app.state.server = server  # for tests and embedding: metrics registry, live streams
    return app


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, which tells the app when its shutdown begins."""

    def __init__(self, config: uvicorn.Config, server: _Server, grace_s: float | None):
        super().__init__(config)
        self.app_server, self.grace_s = server, grace_s

    async def shutdown(self, sockets=None) -> None:
        self.app_server.close(self.grace_s)
        await super().shutdown(sockets)


def uvicorn_server(app: Starlette, graceful_shutdown_s: float | None = 30, **config: Any) -> uvicorn.Server:
    """A uvicorn server for an app of `create_app` (`config`: `uvicorn.Config`'s arguments). Told to
    stop (SIGINT, SIGTERM, `should_exit`), it admits no new request, gives open ones
    `graceful_shutdown_s` (None: as long as they take), then ends each with a final "shutting down"
    error; uvicorn's own limit, SHUTDOWN_WAIT_S later, cuts what is still left."""
    timeout = None if graceful_shutdown_s is None else graceful_shutdown_s + SHUTDOWN_WAIT_S
    config = uvicorn.Config(app, lifespan="on", timeout_graceful_shutdown=timeout, **config)
    return _Uvicorn(config, app.state.server, graceful_shutdown_s)


@contextlib.contextmanager
def _sigterm_returns():
    """Once it has shut down, uvicorn raises the signal that stopped it again, with the handler that
    was there before: for SIGTERM, how process managers stop a server, the default one would end
    the process with status 143 after a clean stop. A handler that does nothing lets `serve` return."""
    if threading.current_thread() is not threading.main_thread():  # uvicorn handles no signal there
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "grok-1",
    api_key: str | None = None,
    max_queue: int = 64,
    log_level: str = "info",
    graceful_shutdown_s: float | None = 30,
    chat_template: ChatTemplate | str | Path | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (see `uvicorn_server` for the shutdown); returns after SIGTERM.
    `chat_template`: as `create_app` takes it."""
    app = create_app(engine, model_name, api_key, max_queue, chat_template)
    server = uvicorn_server(app, graceful_shutdown_s, host=host, port=port, log_level=log_level)
    with _sigterm_returns():
        server.run()
