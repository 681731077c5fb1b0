"""The device side of an engine, and the one place where its programs run.

An `Executor` holds what lives on the devices (the KV cache of every slot, the prefix cache's store
of blocks, the jitted programs of `grok.serving.programs`) and runs the engine's four device calls:
`prefill` a prompt chunk into a slot, `decode` every slot a step, `restore` stored blocks into a
slot and `save` a slot's blocks into the store. Each call takes host values only (token ids, slot
and row indices, lengths, per-row sampling settings), never a device array, so that on a pod every
process can run the same calls in the same order from a copy of their arguments. The engine keeps
all scheduling state; on one process it calls an executor directly.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from grok.checkpoint.loader import place
from grok.model import transformer
from grok.serving.prefix_cache import Blocks, restore, save
from grok.serving.programs import step_functions


class Executor:
    """`rows` KV-cache slots of `cache_len` positions for `model` (a `grok.serving.engine.Model`),
    and a store of `store_blocks` prefix-cache blocks of `block_size` tokens (none when 0)."""

    def __init__(self, model, rows: int, cache_len: int, store_blocks: int = 0, block_size: int = 1):
        config, sharder = model.config, model.sharder
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
        self._prefill, self._decode = step_functions(model.apply, sharder.replicated())

    def prefill(self, slot: int, tokens: np.ndarray, length: int, reset: bool, settings: dict[str, np.ndarray]) -> tuple:
        """Run tokens [1, T] (the first `length` real) into `slot`'s cache row, emptied first when
        `reset`; returns the sampled outputs after them (device arrays). `settings`: the row's."""
        put = self._replicated
        out, self.memory = self._prefill(
            self.model.params, self.memory, put(np.int32(slot)), put(tokens), put(np.int32(length)),
            put(np.bool_(reset)), {k: put(v) for k, v in settings.items()},
        )
        return out

    def decode(self, tokens: np.ndarray, lengths: np.ndarray, settings: dict[str, np.ndarray]) -> tuple:
        """One decode step of every slot: tokens [rows, T] in, row b feeding its first `lengths[b]`;
        returns the chosen tokens and their log-probabilities (device arrays)."""
        out, self.memory = self._decode(
            self.model.params, self.memory, self.model.sharder.put(tokens, "tokens"), self._replicated(lengths),
            {k: self._replicated(v) for k, v in settings.items()},
        )
        return out

    def restore(self, slot: int, rows: Sequence[int]) -> None:
        """Copy the stored blocks `rows` into `slot`'s cache row, from its first position on."""
        self.memory = restore(self.block_size, self.memory, self.blocks, self._replicated(np.int32(slot)),
                              self._block_list(rows), self._replicated(np.int32(len(rows))))

    def save(self, slot: int, indices: Sequence[int], rows: Sequence[int]) -> None:
        """Copy `slot`'s blocks `indices` (counted from its first position) into the store's `rows`."""
        self.blocks = save(self.block_size, self.blocks, self.memory, self._replicated(np.int32(slot)),
                           self._block_list(indices), self._block_list(rows), self._replicated(np.int32(len(rows))))

    def _block_list(self, values: Sequence[int]) -> jax.Array:
        """Block indices padded to one length (a row's block count), so one program serves all."""
        padded = np.zeros(self.cache_len // self.block_size, np.int32)
        padded[: len(values)] = values
        return self._replicated(padded)

    def _replicated(self, x) -> jax.Array:
        return place(np.asarray(x), self.model.sharder.replicated())
