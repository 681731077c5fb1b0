"""The device side of an engine, and the one place where its programs run.

An `Executor` holds what lives on the devices (the KV cache of every slot, the prefix cache's store
of blocks, the jitted programs of `grok.serving.programs`) and runs the engine's four device calls:
`prefill` a prompt chunk into a slot, `decode` every slot a step, `restore` stored blocks into a
slot and `save` a slot's blocks into the store. Each call takes host values only (token ids, slot
and row indices, lengths, per-row sampling settings), never a device array, so that on a pod every
process can run the same calls in the same order from a copy of their arguments. The engine keeps
all scheduling state; on one process it calls an executor directly.

Every call is numbered. With a `send` hook (a pod's leader, `grok.serving.pod`), each call is first
handed to it as a message (`grok.parallel.wire`: its executor, number, name and arguments); `replay`
runs such a message on another executor (a follower's), and refuses one out of sequence, so a lost
or reordered message is an error, never a silent divergence. Such an executor also announces itself
(`open`, with its sizes) and, once dropped, its end (`close`); a `Mirror` makes, runs and drops a
follower's executors as these messages say. `issue` sends and runs each call as one step, whatever
thread calls it, so every process runs the same programs in the same order.
"""

from __future__ import annotations

import collections
import itertools
import threading
import weakref
from typing import Callable, Sequence, TypeVar

import jax
import numpy as np

from grok.checkpoint.loader import place
from grok.model import transformer
from grok.parallel import wire
from grok.serving.prefix_cache import Blocks, restore, save
from grok.serving.programs import step_functions

CALLS = ("prefill", "decode", "restore", "save")
T = TypeVar("T")
_ORDER = threading.Lock()  # held while a call is sent and dispatched
_DROPPED: collections.deque[int] = collections.deque()  # executors the leader let go of, not yet told
_IDS = itertools.count(1)


def issue(send: Callable[[bytes], None] | None, message: dict, run: Callable[[], T]) -> T:
    """`run()`, after sending `message` when there is a `send` hook: the two as one step among every
    thread's calls, with the news of dropped executors first."""
    if send is None:
        return run()
    with _ORDER:
        while _DROPPED:
            send(wire.encode({"op": "close", "executor": _DROPPED.popleft()}))
        send(wire.encode(message))
        return run()


class ReplayError(RuntimeError):
    """A message a follower cannot replay: out of sequence, or not an executor call."""


class Executor:
    """`rows` KV-cache slots of `cache_len` positions for `model` (a `grok.serving.engine.Model`),
    and a store of `store_blocks` prefix-cache blocks of `block_size` tokens (none when 0).
    `send`: called with each call's message before the call runs (see the module's docstring)."""

    def __init__(
        self, model, rows: int, cache_len: int, store_blocks: int = 0, block_size: int = 1,
        send: Callable[[bytes], None] | None = None,
    ):
        config, sharder = model.config, model.sharder
        self.send = send
        self.id = next(_IDS)
        self.calls = 0  # calls run so far: the next one's number
        kv_heads = sharder.cache_heads(config)
        self.model = model
        self.cache_len = cache_len
        self.block_size = block_size

        def cache(count: int, length: int) -> transformer.Cache:
            return transformer.empty_cache(config, count, length, model.scan_layers, sharder.zeros_cache, kv_heads)

        self.memory = transformer.KVMemory(
            k=cache(rows, cache_len),
            v=cache(rows, cache_len),
            mask=sharder.put(np.zeros((rows, cache_len), bool), "tokens"),
            step=sharder.put(np.zeros((rows, 1), np.int32), "tokens")[:, 0],
        )
        self.blocks: Blocks | None = None
        if store_blocks > 0:
            self.blocks = Blocks(k=cache(store_blocks, block_size), v=cache(store_blocks, block_size),
                                 mask=sharder.put(np.zeros((store_blocks, block_size), bool), "tokens"))
        self._prefill_program, self._decode_program = step_functions(model.apply, sharder.replicated())
        if send is not None:  # the followers make their own executor of these sizes
            sizes = {"rows": rows, "cache_len": cache_len, "store_blocks": store_blocks, "block_size": block_size}
            issue(send, {"op": "open", "executor": self.id, "sizes": sizes}, lambda: None)
            weakref.finalize(self, _DROPPED.append, self.id)

    def prefill(self, slot: int, tokens: np.ndarray, length: int, reset: bool, settings: dict[str, np.ndarray]) -> tuple:
        """Run tokens [1, T] (the first `length` real) into `slot`'s cache row, emptied first when
        `reset`; returns the sampled outputs after them (device arrays). `settings`: the row's."""
        return self._issue("prefill", slot=int(slot), tokens=np.asarray(tokens, np.int32), length=int(length),
                           reset=bool(reset), settings=settings)

    def decode(self, tokens: np.ndarray, lengths: np.ndarray, settings: dict[str, np.ndarray]) -> tuple:
        """One decode step of every slot: tokens [rows, T] in, row b feeding its first `lengths[b]`;
        returns the chosen tokens and their log-probabilities (device arrays)."""
        return self._issue("decode", tokens=np.asarray(tokens, np.int32), lengths=np.asarray(lengths, np.int32),
                           settings=settings)

    def restore(self, slot: int, rows: Sequence[int]) -> None:
        """Copy the stored blocks `rows` into `slot`'s cache row, from its first position on."""
        self._issue("restore", slot=int(slot), rows=[int(r) for r in rows])

    def save(self, slot: int, indices: Sequence[int], rows: Sequence[int]) -> None:
        """Copy `slot`'s blocks `indices` (counted from its first position) into the store's `rows`."""
        self._issue("save", slot=int(slot), indices=[int(i) for i in indices], rows=[int(r) for r in rows])

    def replay(self, message: bytes | dict):
        """Run a call another executor sent (`send`), which must be the next in its sequence."""
        call = wire.decode(message) if isinstance(message, bytes) else message
        if call.get("op") != "call" or call.get("call") not in CALLS or not isinstance(call.get("args"), dict):
            raise ReplayError(f"not an executor call: {call.get('call')!r}")
        if call.get("seq") != self.calls:
            raise ReplayError(f"call {call.get('seq')} arrived where call {self.calls} was due")
        return self._run(call["call"], call["args"])

    def _issue(self, name: str, **args):
        message = {"op": "call", "executor": self.id, "seq": self.calls, "call": name, "args": args}
        return issue(self.send, message, lambda: self._run(name, args))

    def _run(self, name: str, args: dict):
        self.calls += 1
        return getattr(self, f"_{name}")(**args)

    def _prefill(self, slot, tokens, length, reset, settings) -> tuple:
        put = self._replicated
        out, self.memory = self._prefill_program(
            self.model.params, self.memory, put(np.int32(slot)), put(tokens), put(np.int32(length)),
            put(np.bool_(reset)), {k: put(v) for k, v in settings.items()},
        )
        return out

    def _decode(self, tokens, lengths, settings) -> tuple:
        out, self.memory = self._decode_program(
            self.model.params, self.memory, self.model.sharder.put(tokens, "tokens"), self._replicated(lengths),
            {k: self._replicated(v) for k, v in settings.items()},
        )
        return out

    def _restore(self, slot, rows) -> None:
        self.memory = restore(self.block_size, self.memory, self.blocks, self._replicated(np.int32(slot)),
                              self._block_list(rows), self._replicated(np.int32(len(rows))))

    def _save(self, slot, indices, rows) -> None:
        self.blocks = save(self.block_size, self.blocks, self.memory, self._replicated(np.int32(slot)),
                           self._block_list(indices), self._block_list(rows), self._replicated(np.int32(len(rows))))

    def _block_list(self, values: Sequence[int]) -> jax.Array:
        """Block indices padded to one length (a row's block count), so one program serves all."""
        padded = np.zeros(self.cache_len // self.block_size, np.int32)
        padded[: len(values)] = values
        return self._replicated(padded)

    def _replicated(self, x) -> jax.Array:
        return place(np.asarray(x), self.model.sharder.replicated())


class Mirror:
    """A follower's executors for `model`, made, run and dropped as the leader's messages say (pass
    each to `__call__`); `programs` runs the other ops the leader issues, by name (e.g. "logits")."""

    def __init__(self, model, programs: dict[str, Callable[[dict], object]] | None = None):
        self.model = model
        self.programs = programs or {}
        self.executors: dict[int, Executor] = {}

    def __call__(self, message: dict) -> None:
        op, key = message.get("op"), message.get("executor")
        if op == "open":
            self.executors[key] = Executor(self.model, **message["sizes"])
        elif op == "close":
            self.executors.pop(key, None)
        elif op == "call" and key in self.executors:
            self.executors[key].replay(message)
        elif op in self.programs:
            self.programs[op](message)
        else:
            raise ReplayError(f"cannot replay op {op!r} (executor {key!r})")
