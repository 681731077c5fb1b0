"""The app's state and request handlers (`_Server`): the engine's life cycle under the app (warm-up,
admission, shutdown), each endpoint, and the checks that turn a parsed request into engine
streams or a 4xx naming the field."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from grok.server.formats import FINISH_REASONS, _ChatFormat, _event_line, _Format, _TextFormat, _usage
from grok.server.metrics import Metrics
from grok.server.schema import (
    MAX_CHOICES,
    APIError,
    ChatRequest,
    CompletionRequest,
    RequestBody,
    _from_validation,
    _GenerationRequest,
    _json_values,
    _load_json,
)
from grok.server.streams import _Run
from grok.serving.chat import ChatTemplate
from grok.serving.engine import Engine
from grok.serving.engine import Request as EngineRequest
from grok.serving.engine import Stream
from grok.serving.sampling import SamplingParams
from grok.serving.tokenizer import ByteTokenizer

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
BODY_TIMEOUT_S = 60.0  # for the whole body to arrive (else 408)
MAX_OTHER_VALUES = 1024  # JSON values a request may hold besides its prompts' token ids (see `_Server._parse`)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
SHUTDOWN_WAIT_S = 10.0  # how long shutdown waits for cancelled streams to end
UNAVAILABLE = {  # `_Server.status` other than "ok": what a refused request is told
    "loading": "the model is loading (compiling its programs); retry shortly",
    "shutting down": "the server is shutting down",
    "engine stopped": "the engine is not running",
}


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
        if status == "engine stopped" and self.engine.error is not None:
            body["error"] = str(self.engine.error)  # e.g. which process of a pod was lost
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
                raise _ended_early(choice.finish_reason, self.engine.error)
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
                    yield _event_line(_ended_early(step.finish_reason, self.engine.error).body())
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


def _ended_early(reason: str, error: BaseException | None) -> APIError:
    """The error for a choice that the engine ended without a result ("cancelled", or a failure;
    `error`: what stopped the engine, if it stopped)."""
    if reason == "cancelled":  # a client that went away reads nothing, so this is for a shutdown
        return APIError(503, "the request was cancelled: the server is shutting down", type="server_error")
    cause = f": {error}" if error is not None else ""
    return APIError(500, f"generation failed ({reason}){cause}", type="server_error")
