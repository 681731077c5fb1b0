"""The answers' formats: what a choice has produced so far (`_Choice`), and how `/v1/completions`
(`_TextFormat`) and `/v1/chat/completions` (`_ChatFormat`) write it, whole or streamed as
server-sent events. Both endpoints run the same generation; only these formats differ."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

from grok.serving.engine import TokenEvent

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


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


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event_line(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
