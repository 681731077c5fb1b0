"""Request bodies: the OpenAI-style error every bad request is answered with (`APIError`), the JSON
helpers that parse a body and bound its cost, and the pydantic models of the two generating
endpoints, which refuse bad input field by field before anything reaches the engine."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.responses import Response

from grok.serving.programs import MAX_TOP_LOGPROBS

MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_CHOICES = 64  # prompts x n per request (and never more than max_queue)
MAX_TEMPERATURE = 1e4  # far beyond any useful value, well inside float32


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
