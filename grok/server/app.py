"""OpenAI-compatible HTTP server over a shared `Engine` (Starlette on uvicorn).

    from grok.server.lifecycle import serve
    serve(engine, host="0.0.0.0", port=8000, model_name="grok-1", api_key="sk-...",
          chat_template="my_template.json")  # optional; see `grok.serving.chat` for the format

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
  accepted and not used) is rendered to one prompt by the chat template (`grok.serving.chat`: a file
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

import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from grok.server.body import _DrainBody
from grok.server.handlers import _Server
from grok.server.metrics import _CountRequests
from grok.server.schema import APIError
from grok.serving.chat import ChatTemplate
from grok.serving.engine import Engine

logger = logging.getLogger(__name__)


def create_app(
    engine: Engine, model_name: str, api_key: str | None = None, max_queue: int = 64,
    chat_template: ChatTemplate | str | Path | None = None,
) -> Starlette:
    """The ASGI app. Its lifespan starts the engine (and stops it if it started it). `chat_template`:
    a `ChatTemplate` or its file (None: the default, `grok.serving.chat.DEFAULT_TEMPLATE`)."""
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
