"""Serving many requests at once: a fixed set of KV-cache slots with continuous batching.

Each request gets a slot (one row of the KV cache). Its prompt is prefilled alone, in chunks of
bucketed length (right-padded, padding never attended to); then one jitted decode step advances
every active slot by a token. A finished slot is refilled from the queue at the next step, so the
batch stays full. Every request samples with its own settings and a key derived from its seed and
position only, so its output does not depend on what else is in the batch.

Context policy: a prompt must leave room for at least one new token in the cache
(`ValueError` otherwise); generation that reaches the end of the cache stops with
`finish_reason == "context"`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import queue
import threading
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from grok import model
from grok.loader import place
from grok.sampling import SamplingParams, sample

if TYPE_CHECKING:
    from grok.api import Grok

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 8  # alternatives reported per token, at most (the reference reports 8)
PREFILL_CHUNK = 512  # prompt tokens prefilled per call, at most (the largest bucket)


@dataclasses.dataclass(frozen=True)
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]  # the generated continuation, without the prompt
    text: str | None  # the continuation decoded, when the model has a tokenizer
    finish_reason: str  # "eos", "length" (max_new_tokens) or "context" (sequence_len reached)


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate. `prompt` is text (needs a tokenizer) or token ids."""

    prompt: str | Sequence[int]
    max_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    logprobs: int = 0  # how many top alternatives to report per token (0..MAX_TOP_LOGPROBS)


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token, as streamed to the caller."""

    token_id: int
    text: str  # text this token made final (held back while it might start a stop string)
    logprob: float  # log-probability of this token under the model (before temperature)
    top_logprobs: tuple[tuple[int, float], ...]  # the `logprobs` likeliest tokens and theirs
    finish_reason: str | None  # on the last event: "eos", "stop", "length", "context", "cancelled" or "error"


class Stream:
    """A submitted request: iterate (or `async for`) over its `TokenEvent`s; `cancel()` frees its slot."""

    def __init__(self, engine: Engine, request: Request, prompt_ids: list[int]):
        self.request = request
        self.prompt_ids = prompt_ids
        self._engine = engine
        self._events: queue.Queue[TokenEvent] = queue.Queue()
        self._wakers: list[Callable[[], None]] = []  # one per `async for` waiting on this stream
        self.cancelled = False
        self.done = False

    def _put(self, event: TokenEvent) -> None:
        """Called by the engine: queue an event and wake any async reader."""
        self._events.put(event)
        for wake in list(self._wakers):
            wake()

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            while self._events.empty() and not self._engine.running:
                self._engine.step()  # nobody else drives the engine: do it here
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self):
        """Waits on the event loop itself (no thread per waiting stream)."""
        loop, ready = asyncio.get_running_loop(), asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(ready.set)

        self._wakers.append(wake)
        try:
            while True:
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    await ready.wait()
                    ready.clear()  # then look again: an event put before the clear is in the queue
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self._wakers.remove(wake)

    def result(self) -> Generation:
        """Wait for the whole generation."""
        events = list(self)
        tokens = [e.token_id for e in events if e.finish_reason not in ("stop", "cancelled")]
        text = "".join(e.text for e in events) if self._engine.grok.tokenizer is not None else None
        return Generation(self.prompt_ids, tokens, text, events[-1].finish_reason)


@dataclasses.dataclass
class _Slot:
    stream: Stream
    tokens: list[int]  # generated so far
    position: int  # cache position of the next token to feed
    emitted: int = 0  # characters of the decoded text already streamed


class Engine:
    """Continuous batching over `max_batch` slots of `cache_len` positions each."""

    def __init__(self, grok: Grok, max_batch: int = 8, cache_len: int | None = None, prefill_chunk: int = PREFILL_CHUNK):
        config = grok.config
        self.grok = grok
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.cache_len = config.sequence_len if cache_len is None else cache_len
        if not 1 <= self.cache_len <= config.sequence_len:
            raise ValueError(f"cache_len must be in 1..{config.sequence_len}, got {cache_len}")
        self.prefill_chunk = min(prefill_chunk, self.cache_len)
        self.running = False
        self.error: BaseException | None = None  # what stopped the background loop, if it failed
        self._pending: queue.Queue[Stream] = queue.Queue()
        self._wake = threading.Event()  # set by `submit`: the background loop has work
        self._slots: list[_Slot | None] = [None] * max_batch
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

        sharder = grok.sharder

        def cache() -> model.Cache:
            return model.empty_cache(
                config, max_batch, self.cache_len, grok.scan_layers, sharder.zeros_cache, sharder.cache_heads(config)
            )

        self._memory = model.KVMemory(
            k=cache(),
            v=cache(),
            mask=sharder.put(np.zeros((max_batch, self.cache_len), bool), "tokens"),
            step=sharder.put(np.zeros((max_batch, 1), np.int32), "tokens")[:, 0],
        )
        self._settings = row_settings(max_batch)
        self._prefill, self._decode = step_functions(grok.apply, sharder.replicated())

    # ------------------------------------------------------------------ public API

    def submit(self, request: Request) -> Stream:
        """Queue a request; returns its stream at once. Bad requests raise `ValueError` here."""
        ids = self.grok.encode(request.prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.cache_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the context holds {self.cache_len}, leaving no room to generate"
            )
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {request.logprobs}")
        if request.stop and self.grok.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if not all(isinstance(s, str) and s for s in request.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {request.stop!r}")
        stream = Stream(self, request, ids)
        self._pending.put(stream)
        self._wake.set()
        return stream

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Run requests to completion together; results in order."""
        streams = [self.submit(r) for r in requests]
        return [s.result() for s in streams]

    def start(self) -> None:
        """Drive the engine from a background thread (for servers); `stop()` ends it."""
        if self._thread is None:
            self.running = True
            self._thread = threading.Thread(target=self._loop, name="grok-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self.running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def warm_up(self) -> None:
        """Compile every program the engine runs by running each once: the prefill of each bucket a
        prompt chunk can fall in, and the decode step; then no request waits for the compiler.
        Needs an idle engine (a server calls it before `start()`): it prefills slot 0, whose row the
        next request there empties, and the decode step advances no row."""
        with self._lock:
            if self.active:
                raise RuntimeError("warm_up needs an idle engine: a request is in a slot")
            longest = min(self.prefill_chunk, self.cache_len - 1)  # the longest chunk a prompt can have
            token = self.grok.config.pad_token + 1  # any token that is not padding
            buckets = {_bucket(n, self.prefill_chunk): n for n in range(1, longest + 1)}  # the longest chunk of each
            outputs = [self._prefill_chunk(0, [token] * n, reset=True) for n in buckets.values()]
            idle = np.zeros(self.max_batch, np.int32)
            outputs.append(self._decode_rows(np.full((self.max_batch, 1), self.grok.config.pad_token, np.int32), idle))
            jax.block_until_ready(outputs)

    @property
    def active(self) -> int:
        return sum(slot is not None for slot in self._slots)

    @property
    def queued(self) -> int:
        return self._pending.qsize()

    # ------------------------------------------------------------------ scheduling

    def _loop(self) -> None:
        try:
            while self.running:
                self._wake.clear()
                if not self.step() and self._pending.empty():
                    self._wake.wait()  # idle until a submit (or stop)
        except Exception as err:  # a bug, or a device failure: end every request rather than hang them
            logger.exception("the engine loop failed; ending every request with finish_reason 'error'")
            self.error, self.running = err, False
            self._fail_all()

    def _fail_all(self) -> None:
        with self._lock:
            for i, slot in enumerate(self._slots):
                if slot is not None:
                    self._finish(i, "error")
            while True:
                try:
                    stream = self._pending.get_nowait()
                except queue.Empty:
                    break
                stream.done = True
                stream._put(TokenEvent(-1, "", 0.0, (), "error"))

    def step(self) -> bool:
        """Admit queued requests into free slots, then decode one token for every active slot.

        Returns whether there was anything to do.
        """
        with self._lock:
            self._drop_cancelled()
            admitted = self._admit()
            if self.active == 0:
                return admitted
            self._decode_step()
            return True

    def _drop_cancelled(self) -> None:
        for i, slot in enumerate(self._slots):
            if slot is not None and slot.stream.cancelled:
                self._finish(i, "cancelled")

    def _admit(self) -> bool:
        admitted = False
        for i in range(self.max_batch):
            if self._slots[i] is not None:
                continue
            try:
                stream = self._pending.get_nowait()
            except queue.Empty:
                break
            if stream.cancelled:
                stream._put(TokenEvent(-1, "", 0.0, (), "cancelled"))
                continue
            self._start(i, stream)
            admitted = True
        return admitted

    def _start(self, i: int, stream: Stream) -> None:
        """Prefill a request's prompt into slot i (in chunks) and emit its first token."""
        sampling = stream.request.sampling
        for name in self._settings:
            self._settings[name][i] = getattr(sampling, name)
        ids = stream.prompt_ids
        for start in range(0, len(ids), self.prefill_chunk):
            out = self._prefill_chunk(i, ids[start : start + self.prefill_chunk], reset=start == 0)
        self._slots[i] = _Slot(stream=stream, tokens=[], position=len(ids))
        self._emit(i, *(np.asarray(x)[0] for x in out))

    def _prefill_chunk(self, i: int, chunk: Sequence[int], reset: bool) -> tuple:
        """Run one prompt chunk (padded to its bucket) into slot i's cache row; returns the
        sampled outputs after it."""
        tokens = np.full((1, _bucket(len(chunk), self.prefill_chunk)), self.grok.config.pad_token, np.int32)
        tokens[0, : len(chunk)] = chunk
        out, self._memory = self._prefill(
            self.grok.params, self._memory, self._replicated(np.int32(i)), self._replicated(tokens),
            self._replicated(np.int32(len(chunk))), self._replicated(np.bool_(reset)), self._row_settings(i),
        )
        return out

    def _decode_step(self) -> None:
        tokens = np.full((self.max_batch, 1), self.grok.config.pad_token, np.int32)
        active = np.zeros(self.max_batch, np.int32)
        for i, slot in enumerate(self._slots):
            if slot is not None:
                tokens[i, 0] = slot.tokens[-1]
                active[i] = 1
        out = [np.asarray(x) for x in self._decode_rows(tokens, active)]
        for i, slot in enumerate(self._slots):
            if slot is not None:
                slot.position += 1
                self._emit(i, *(x[i] for x in out))

    def _decode_rows(self, tokens: np.ndarray, active: np.ndarray) -> tuple:
        """Run the decode step: tokens [max_batch, 1] in, the rows with `active` 1 advance."""
        settings = {k: self._replicated(v) for k, v in self._settings.items()}
        out, self._memory = self._decode(
            self.grok.params, self._memory, self.grok.sharder.put(tokens, "tokens"), self._replicated(active), settings
        )
        return out

    def _emit(self, i: int, token, logprob, top_ids, top_logprobs) -> None:
        """Record slot i's new token, stream it, and finish the request if it is done."""
        slot = self._slots[i]
        request = slot.stream.request
        token = int(token)
        slot.tokens.append(token)
        top = tuple((int(t), float(lp)) for t, lp in zip(top_ids[: request.logprobs], top_logprobs))
        finish = None
        if token == self.grok.config.eos_token:
            finish = "eos"
        elif len(slot.tokens) >= request.max_tokens:
            finish = "length"
        elif slot.position + 1 >= self.cache_len:  # prompt + output fill the context
            finish = "context"
        text, stopped = self._new_text(slot, final=finish is not None)
        if stopped:
            finish = "stop"
        slot.stream._put(TokenEvent(token, text, float(logprob), top, finish))
        if finish is not None:
            self._slots[i] = None
            slot.stream.done = True

    def _new_text(self, slot: _Slot, final: bool) -> tuple[str, bool]:
        """Text that became final with the newest token, and whether a stop string was reached."""
        tokenizer = self.grok.tokenizer
        if tokenizer is None:
            return "", False
        ids = slot.tokens[:-1] if slot.tokens[-1] == self.grok.config.eos_token else slot.tokens
        text = tokenizer.decode(ids)
        stops = slot.stream.request.stop
        hits = [text.find(s, max(0, slot.emitted - len(s) + 1)) for s in stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            end, stopped = min(hits), True
        elif final:
            end, stopped = len(text), False
        else:
            end, stopped = len(text) - _held_back(text, stops), False
        new = text[slot.emitted : max(end, slot.emitted)]
        slot.emitted = max(end, slot.emitted)
        return new, stopped

    def _finish(self, i: int, reason: str) -> None:
        slot = self._slots[i]
        self._slots[i] = None
        slot.stream.done = True
        slot.stream._put(TokenEvent(-1, "", 0.0, (), reason))

    def _replicated(self, x) -> jax.Array:
        return place(np.asarray(x), self.grok.sharder.replicated())

    def _row_settings(self, i: int) -> dict[str, jax.Array]:
        return {k: self._replicated(v[i : i + 1]) for k, v in self._settings.items()}


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` to hold back: an incomplete UTF-8 character, or the start
    of a stop string that the next tokens may complete."""
    held = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                held = max(held, n)
                break
    return held


def _bucket(n: int, limit: int) -> int:
    """Prefill lengths are padded to powers of two (at least 16), so few shapes are compiled."""
    return min(max(16, 1 << (n - 1).bit_length()), limit)


def _choose(logits, positions, settings):
    """Sample each row's token; also its log-probability and the top alternatives (pre-temperature)."""
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(settings["seed"], positions)
    tokens = sample(logits, keys, settings["temperature"], settings["top_p"], settings["top_k"])
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, MAX_TOP_LOGPROBS)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen, top_ids, top_logprobs


def row_settings(rows: int) -> dict[str, np.ndarray]:
    """Per-row sampling settings as the step functions take them, set to greedy decoding."""
    return {
        "seed": np.zeros(rows, np.uint32),
        "temperature": np.zeros(rows, np.float32),
        "top_p": np.ones(rows, np.float32),
        "top_k": np.zeros(rows, np.int32),
    }


def step_functions(apply: Callable, replicated: NamedSharding) -> tuple[Callable, Callable]:
    """The engine's two jitted programs, the cache donated and sampled outputs replicated:
    `prefill(params, memory, slot, tokens [1, T], length, reset, settings of the row)` and
    `decode(params, memory, tokens [B, 1], active [B], settings)` (also compiled by `grok.plan`)."""
    jit = functools.partial(jax.jit, out_shardings=(replicated, None), donate_argnums=1)
    return jit(functools.partial(_prefill_slot, apply)), jit(functools.partial(_decode_all, apply))


def _prefill_slot(apply, params, memory, slot, tokens, length, reset, settings):
    """Run a prompt chunk for one cache row (emptied first when `reset`) and sample after it."""

    # The batch axis of every cache array: after the layer axis (stacked caches), else first;
    # mask [b, s] and step [b] have it first.
    def batch_axis(x):
        return max(x.ndim - 4, 0)

    def row(x):
        return jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=batch_axis(x))

    def put(x, new_row):
        return jax.lax.dynamic_update_slice_in_dim(x, new_row, slot, axis=batch_axis(x))

    mine = jax.tree.map(row, memory)
    mine = mine._replace(mask=jnp.where(reset, False, mine.mask), step=jnp.where(reset, 0, mine.step))
    out = apply(params, tokens, mine, length[None])
    new = out.memory
    memory = jax.tree.map(put, memory, new)
    last = jax.lax.dynamic_index_in_dim(out.logits[0], length - 1, keepdims=True)
    return _choose(last, new.step, settings), memory


def _decode_all(apply, params, memory, tokens, active, settings):
    """One token for every slot; inactive slots do not advance."""
    out = apply(params, tokens, memory, active)
    return _choose(out.logits[:, -1], out.memory.step, settings), out.memory
