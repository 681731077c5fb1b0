"""Serving many requests at once: a fixed set of KV-cache slots with continuous batching.

Each request gets a slot (one row of the KV cache). An engine step admits queued requests into
free slots, prefills a bounded number of prompt tokens (in chunks of bucketed length,
right-padded, padding never attended to), then runs one jitted decode step that advances every
slot past its prompt by a token. So a long prompt never holds up the running streams for more
than one chunk per step. A finished slot is refilled at the next step, so the batch stays full.
Every request samples with its own settings and a key derived from its seed and position only,
so its output does not depend on what else is in the batch.

Two more features leave every output unchanged (`Scheduling`): a prefix cache
(`grok.serving.prefix_cache`) restores the keys and values of blocks of earlier prompts that a new prompt
starts with, and prompt-lookup speculative decoding feeds a greedy stream's latest token together
with tokens proposed from its own earlier text, keeping those the model agrees with.

Context policy: a prompt must leave room for at least one new token in the cache
(`ValueError` otherwise); generation that reaches the end of the cache stops with
`finish_reason == "context"`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator, Protocol, Sequence

import jax
import numpy as np

from grok.model import transformer
from grok.model.config import GrokConfig
from grok.parallel.sharding import Sharder
from grok.serving.executor import Executor
from grok.serving.pod import Pod
from grok.serving.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache, block_hashes, bytes_per_block
from grok.serving.programs import MAX_TOP_LOGPROBS, row_settings
from grok.serving.sampling import SamplingParams
from grok.serving.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # prompt tokens prefilled per call, at most (the largest bucket)
MAX_REST = 16  # decode steps a stream whose proposals keep failing waits before proposing again


class Model(Protocol):
    """What an engine needs of a loaded model: a `grok.serving.api.Grok`, declared here so that the
    engine does not import the API that builds on it."""

    config: GrokConfig
    tokenizer: Tokenizer | None
    sharder: Sharder
    params: Any  # the model tree, as `apply` takes it
    apply: Callable
    scan_layers: bool
    pod: Pod | None  # on several processes: this one's part (only a leader runs an engine)

    def encode(self, prompt: str | Sequence[int]) -> list[int]: ...


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
    position: int  # tokens in the cache row: the prompt prefilled so far, then prompt + tokens[:-1]
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far (none while prefilling)
    emitted: int = 0  # characters of the decoded text already streamed
    blocks: list[bytes] = dataclasses.field(default_factory=list)  # names of the row's stored full blocks
    rest: int = 0  # decode steps to go before proposing again, after proposals that all failed
    backoff: int = 1  # the next such rest

    @property
    def prefilling(self) -> bool:
        return not self.tokens

    def note_proposals(self, accepted: int) -> None:
        """After a verify step: proposals that all failed earn a rest from proposing, doubling (up
        to MAX_REST steps) while they keep failing, so text without repeats costs little."""
        if accepted:
            self.backoff = 1
        else:
            self.rest, self.backoff = self.backoff, min(2 * self.backoff, MAX_REST)

    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values the cache row holds, in order."""
        return (self.stream.prompt_ids + self.tokens[:-1])[: self.position]


@dataclasses.dataclass(frozen=True)
class Scheduling:
    """How the engine shares its steps between prompts and running streams (see the module doc).

    - `prefill_chunk`: prompt tokens per prefill call, at most (the largest compiled bucket).
    - `prefill_budget`: prompt tokens prefilled per engine step while other streams decode, so a
      long newcomer delays each of their tokens by one bounded chunk. None is automatic: the
      largest bucket whose measured prefill time is at most the measured decode step's, so a
      newcomer at most doubles the running streams' inter-token latency on any hardware. With
      no stream decoding, prompts prefill `prefill_chunk` tokens per step.
    - `prefix_cache_bytes`: device memory for stored prompt blocks (`grok.serving.prefix_cache`); 0 is off.
    - `block_size`: tokens per stored block.
    - `speculate`: tokens proposed by prompt lookup per greedy stream and step (0 is off).
    - `speculate_max_batch`: speculate only while at most this many streams decode (a verify step
      costs more than a decode step once the batch is compute-bound).
    - `lookup_ngram`, `lookup_min_ngram`: the longest and shortest runs of latest tokens looked up
      in the stream's earlier tokens (a single token recurs in any text, and proposes mostly
      wrong tokens).
    """

    prefill_chunk: int = PREFILL_CHUNK
    prefill_budget: int | None = None
    prefix_cache_bytes: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    speculate: int = 0
    speculate_max_batch: int = 1
    lookup_ngram: int = 3
    lookup_min_ngram: int = 2

    def __post_init__(self) -> None:
        for name in ("prefill_chunk", "block_size", "speculate_max_batch", "lookup_ngram", "lookup_min_ngram"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_budget is not None and self.prefill_budget < 1:
            raise ValueError(f"prefill_budget must be >= 1, got {self.prefill_budget}")
        for name in ("prefix_cache_bytes", "speculate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class Engine:
    """Continuous batching over `max_batch` slots of `cache_len` positions each."""

    def __init__(
        self, grok: Model, max_batch: int = 8, cache_len: int | None = None, prefill_chunk: int | None = None,
        scheduling: Scheduling = Scheduling(),
    ):
        config = grok.config
        self.grok = grok
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.cache_len = config.sequence_len if cache_len is None else cache_len
        if not 1 <= self.cache_len <= config.sequence_len:
            raise ValueError(f"cache_len must be in 1..{config.sequence_len}, got {cache_len}")
        if prefill_chunk is not None:
            scheduling = dataclasses.replace(scheduling, prefill_chunk=prefill_chunk)
        self.scheduling = scheduling
        self.prefill_chunk = min(scheduling.prefill_chunk, self.cache_len)
        self._buckets = sorted({_bucket(1 << k, self.prefill_chunk) for k in range(self.prefill_chunk.bit_length() + 1)})
        self._seconds: dict[str, float] = {}  # running means of the decode step's and each bucket's time
        self._ran: set[str] = set()  # programs timed once (their first run may have compiled)
        self.running = False
        self.error: BaseException | None = None  # what stopped the background loop, if it failed
        self._pending: queue.Queue[Stream] = queue.Queue()
        self._wake = threading.Event()  # set by `submit`: the background loop has work
        self._slots: list[_Slot | None] = [None] * max_batch
        self._admitted: list[int] = []  # slots still prefilling, first admitted first
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # Counts over the engine's life: prompt tokens prefilled and restored from the prefix cache,
        # decode steps (and how many speculated), tokens proposed and accepted.
        self.stats: collections.Counter[str] = collections.Counter()

        block = scheduling.block_size
        capacity = scheduling.prefix_cache_bytes // bytes_per_block(
            config, block, grok.sharder.cache_heads(config), transformer.cache_dtype())
        if capacity <= 0 or block >= self.cache_len:
            capacity = 0
        # Every device call goes through the executor: the engine holds host state only.
        # On a pod's leader it sends each call to the followers first (`grok.serving.pod`).
        pod = grok.pod
        send = pod.send if pod is not None and pod.leader else None
        self.executor = Executor(grok, max_batch, self.cache_len, capacity, block, send)
        if send is not None:
            pod.watch(self.abort)
        self.prefix_cache = PrefixCache(capacity, block) if capacity else None
        self._settings = row_settings(max_batch)

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
        prompt chunk can fall in, the decode step (and the verify step when speculating), and the
        prefix cache's block copies; then no request waits for the compiler.
        Needs an idle engine (a server calls it before `start()`): it prefills slot 0, whose row the
        next request there empties, and the decode steps advance no row."""
        with self._lock:
            if self.active:
                raise RuntimeError("warm_up needs an idle engine: a request is in a slot")
            longest = min(self.prefill_chunk, self.cache_len - 1)  # the longest chunk a prompt can have
            token = self.grok.config.pad_token + 1  # any token that is not padding
            buckets = {_bucket(n, self.prefill_chunk): n for n in range(1, longest + 1)}  # the longest chunk of each
            outputs = [self._prefill_chunk(0, [token] * n, reset=True) for n in buckets.values()]
            idle = np.zeros(self.max_batch, np.int32)
            for width in {1, 1 + self.scheduling.speculate}:
                tokens = np.full((self.max_batch, width), self.grok.config.pad_token, np.int32)
                outputs.append(self._decode_rows(tokens, idle))
            if self.prefix_cache is not None:
                self.executor.restore(0, [])
                self.executor.save(0, [], [])
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
            if self.error is not None:  # aborted (a lost pod process), and the device call failed for it
                logger.error("the engine loop stopped: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
            else:
                logger.exception("the engine loop failed; ending every request with finish_reason 'error'")
                self.error = err
            self.running = False
            self._fail_all()

    def _fail_all(self) -> None:
        with self._lock:
            for i, slot in enumerate(self._slots):
                if slot is not None:
                    self._finish(i, "error", keep_blocks=False)
            self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            try:
                stream = self._pending.get_nowait()
            except queue.Empty:
                return
            stream.done = True
            stream._put(TokenEvent(-1, "", 0.0, (), "error"))

    def abort(self, reason: str) -> None:
        """End every request with an error at once, without the engine's lock: its loop may be stuck
        in a device call that never returns (a pod's process was lost). The engine stays stopped."""
        logger.error("ending every request: %s", reason)
        self.error, self.running = RuntimeError(reason), False
        for slot in list(self._slots):
            if slot is not None:
                slot.stream.done = True
                slot.stream._put(TokenEvent(-1, "", 0.0, (), "error"))
        self._fail_pending()

    def step(self) -> bool:
        """One engine step: admit queued requests into free slots, advance prompts by a bounded
        amount of prefill, then decode one token (or, speculating, several) for every stream past
        its prompt. Returns whether there was anything to do."""
        with self._lock:
            self._drop_cancelled()
            admitted = self._admit()
            decoding = any(slot is not None and not slot.prefilling for slot in self._slots)
            prefilled = self._prefill_some(self.prefill_budget() if decoding else self.prefill_chunk)
            if not any(slot is not None and not slot.prefilling for slot in self._slots):
                return admitted or prefilled
            self._decode_step()
            return True

    def _drop_cancelled(self) -> None:
        for i, slot in enumerate(self._slots):
            if slot is not None and slot.stream.cancelled:
                self._finish(i, "cancelled")

    def _admit(self) -> bool:
        """Give queued requests the free slots, restoring what the prefix cache holds of each prompt."""
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
            sampling = stream.request.sampling
            for name in self._settings:
                self._settings[name][i] = getattr(sampling, name)
            slot = self._slots[i] = _Slot(stream=stream, position=0)
            if self.prefix_cache is not None:
                ids = stream.prompt_ids
                usable = (len(ids) - 1) // self.prefix_cache.block_size  # at least one token left to prefill
                names = block_hashes(ids[: usable * self.prefix_cache.block_size], self.prefix_cache.block_size)
                rows = self.prefix_cache.match(names)
                self.executor.restore(i, rows)
                slot.position, slot.blocks = len(rows) * self.prefix_cache.block_size, names[: len(rows)]
                self.stats["prefix_hit_tokens"] += slot.position
            self._admitted.append(i)
            admitted = True
        return admitted

    def prefill_budget(self) -> int:
        """Prompt tokens to prefill in a step while streams decode: the set budget, or the largest
        bucket whose time (measured, or scaled up from a smaller one's per token) is at most a
        decode step's; the smallest bucket until both have been measured."""
        if self.scheduling.prefill_budget is not None:
            return self.scheduling.prefill_budget
        decode, best, per_token = self._seconds.get("decode"), self._buckets[0], None
        for bucket in self._buckets:
            seconds = self._seconds.get(f"prefill {bucket}")
            per_token = seconds / bucket if seconds is not None else per_token
            if decode is None or per_token is None or per_token * bucket > decode:
                break
            best = bucket
        return best

    def _timed(self, key: str, start: float) -> None:
        """Fold a program's time into its running mean (its first run, which may compile, is skipped)."""
        seconds, mean = time.perf_counter() - start, self._seconds.get(key)
        if key not in self._ran:
            self._ran.add(key)
        else:
            self._seconds[key] = seconds if mean is None else 0.7 * mean + 0.3 * seconds

    def _prefill_some(self, budget: int) -> bool:
        """Prefill up to `budget` prompt tokens, oldest admission first, in chunks of at most
        `prefill_chunk`; a prompt that completes emits its first token."""
        done = False
        while budget > 0 and self._admitted:
            i = self._admitted[0]
            slot = self._slots[i]
            ids = slot.stream.prompt_ids
            chunk = ids[slot.position : slot.position + min(budget, self.prefill_chunk)]
            start = time.perf_counter()
            out = jax.block_until_ready(self._prefill_chunk(i, chunk, reset=slot.position == 0))
            self._timed(f"prefill {_bucket(len(chunk), self.prefill_chunk)}", start)
            slot.position += len(chunk)
            budget -= len(chunk)
            self.stats["prefill_tokens"] += len(chunk)
            done = True
            if slot.position == len(ids):
                self._admitted.pop(0)
                self._store_blocks(i)
                self._emit(i, *(np.asarray(x)[0] for x in out))
        return done

    def _prefill_chunk(self, i: int, chunk: Sequence[int], reset: bool) -> tuple:
        """Run one prompt chunk (padded to its bucket) into slot i's cache row; returns the
        sampled outputs after it."""
        tokens = np.full((1, _bucket(len(chunk), self.prefill_chunk)), self.grok.config.pad_token, np.int32)
        tokens[0, : len(chunk)] = chunk
        return self.executor.prefill(i, tokens, len(chunk), reset, {k: v[i : i + 1] for k, v in self._settings.items()})

    def _decode_step(self) -> None:
        """Feed every decoding stream its latest token, with the tokens prompt lookup proposes to
        follow it when speculating, and emit what the model chose after each accepted one."""
        rows = [i for i, slot in enumerate(self._slots) if slot is not None and not slot.prefilling]
        proposals = {i: self._propose(self._slots[i]) for i in rows} if len(rows) <= self.scheduling.speculate_max_batch else {}
        width = 1 + self.scheduling.speculate if any(proposals.values()) else 1
        tokens = np.full((self.max_batch, width), self.grok.config.pad_token, np.int32)
        lengths = np.zeros(self.max_batch, np.int32)
        for i in rows:
            fed = [self._slots[i].tokens[-1], *proposals.get(i, [])][:width]
            tokens[i, : len(fed)] = fed
            lengths[i] = len(fed)
        start = time.perf_counter()
        chosen, logprob, top_ids, top_logprobs, accepted = (np.asarray(x) for x in self._decode_rows(tokens, lengths))
        if width == 1:
            self._timed("decode", start)
        self.stats["decode_steps"] += 1
        if width > 1:
            self.stats["speculative_steps"] += 1
            self.stats["proposed"] += int(lengths.sum()) - len(rows)
            self.stats["accepted"] += int(accepted.sum())
        for i in rows:
            if proposals.get(i):
                self._slots[i].note_proposals(int(accepted[i]))
            for j in range(int(accepted[i]) + 1):
                self._slots[i].position += 1
                self._emit(i, chosen[i, j], logprob[i, j], top_ids[i, j], top_logprobs[i, j])
                if self._slots[i] is None:  # finished: the rest of its accepted tokens are dropped
                    break

    def _propose(self, slot: _Slot) -> list[int]:
        """Prompt lookup: the tokens that followed the latest earlier occurrence of the stream's last
        few tokens (longest match first), for greedy streams with room left to use them."""
        request = slot.stream.request
        room = min(request.max_tokens - len(slot.tokens), self.cache_len - 1 - slot.position) - 1
        if self.scheduling.speculate == 0 or request.sampling.temperature != 0 or room < 1:
            return []
        if slot.rest:
            slot.rest -= 1
            return []
        return prompt_lookup(slot.stream.prompt_ids + slot.tokens, self.scheduling.lookup_ngram,
                             min(self.scheduling.speculate, room), self.scheduling.lookup_min_ngram)

    def _decode_rows(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple:
        """Run the decode step: tokens [max_batch, T] in, row b feeding its first `lengths[b]`."""
        return self.executor.decode(tokens, lengths, self._settings)

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
            self._release(i)

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

    def _finish(self, i: int, reason: str, keep_blocks: bool = True) -> None:
        stream = self._slots[i].stream
        self._release(i, keep_blocks)
        stream._put(TokenEvent(-1, "", 0.0, (), reason))

    def _release(self, i: int, keep_blocks: bool = True) -> None:
        """Free slot i, first storing its row's full blocks in the prefix cache (generated tokens
        included, so a conversation's next turn finds them)."""
        slot = self._slots[i]
        if keep_blocks:
            self._store_blocks(i)
        self._slots[i] = None
        if i in self._admitted:
            self._admitted.remove(i)
        slot.stream.done = True

    # ------------------------------------------------------------------ prefix cache

    def _store_blocks(self, i: int) -> None:
        """Copy slot i's full blocks that the prefix cache does not hold yet into it."""
        cache, slot = self.prefix_cache, self._slots[i]
        if cache is None:
            return
        slot.blocks = block_hashes(slot.cached_tokens(), cache.block_size, slot.blocks)
        placed = cache.allocate(slot.blocks, keep=set(slot.blocks))
        if placed:
            self.executor.save(i, *zip(*placed))


def prompt_lookup(history: Sequence[int], ngram: int, count: int, min_ngram: int = 1) -> list[int]:
    """`count` tokens proposed to follow `history`: those that followed the latest earlier
    occurrence of its last n tokens, for the largest n in `min_ngram`..`ngram` that occurs
    earlier ([] if none does). Where that continuation reaches the end of `history`, it goes on as the repeat it then
    is: the tokens from the occurrence on, again."""
    seq = np.asarray(history, np.int64)
    for n in range(min(ngram, len(seq) - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # every earlier run of n tokens
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            period = len(seq) - start
            return [int(seq[start + j % period]) for j in range(count)]
    return []


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
