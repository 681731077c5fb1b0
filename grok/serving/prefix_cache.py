"""Prefix caching: keys and values of earlier prompts, reused by requests that start the same way.

A cache row's positions are cut into blocks of `block_size` tokens. A full block is named by a
hash of every token from the start of the sequence to its end (each block's hash chains its
predecessor's), so equal names mean equal prefixes, and so equal keys and values. The blocks
live in a store shaped like the KV cache itself (`Blocks`: `capacity` rows of `block_size`
positions, laid out and sharded as the cache is) under a least-recently-used index.

Reuse copies: on admission the longest run of stored blocks that starts the prompt is copied into
the request's cache row (`restore`), and the prompt is prefilled from there; when a row's blocks
are computed they are copied into the store (`save`). A row never points into the store, so
evicting a block can never change a running request. The copy costs one pass over the reused
keys and values, a small fraction of recomputing them (the README has the measurements).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from grok.model import transformer

DEFAULT_BLOCK_SIZE = 16  # tokens per block
DEFAULT_SHARE = 0.25  # serve's default prefix-cache memory, as a share of the KV cache's


class Blocks(NamedTuple):
    """The store: `k`/`v` as a KV cache of `capacity` rows of `block_size` positions
    (`grok.model.transformer.Cache`), and each position's key mask."""

    k: transformer.Cache
    v: transformer.Cache
    mask: Bool[Array, "capacity block"]


def block_hashes(tokens: list[int], block_size: int, known: list[bytes] = ()) -> list[bytes]:
    """The names of the full blocks of `tokens`: hash i covers tokens[: (i + 1) * block_size].
    `known` are the names of the first blocks, already computed; only the rest are hashed."""
    hashes = list(known)
    for i in range(len(hashes), len(tokens) // block_size):
        block = np.asarray(tokens[i * block_size : (i + 1) * block_size], np.int64).tobytes()
        previous = hashes[-1] if hashes else b""
        hashes.append(hashlib.sha256(previous + block).digest())
    return hashes


class PrefixCache:
    """The LRU index of a store of `capacity` blocks (host side); `restore`/`save` move the blocks on
    device (`grok.serving.executor.Executor` holds the store)."""

    def __init__(self, capacity: int, block_size: int):
        self.block_size = block_size
        self.capacity = capacity
        self._index: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # least recent first
        self._free = list(range(self.capacity))
        self.hits = 0  # blocks reused, counted over the cache's life
        self.stored = 0  # blocks written
        self.evicted = 0

    @property
    def used(self) -> int:
        return len(self._index)

    def match(self, hashes: list[bytes]) -> list[int]:
        """Store rows of the longest run of `hashes` from the first that are all stored; they become
        the most recently used, the first blocks most of all (a prefix outlives its extensions)."""
        rows = []
        for h in hashes:
            row = self._index.get(h)
            if row is None:
                break
            rows.append(row)
        for h in reversed(hashes[: len(rows)]):
            self._index.move_to_end(h)
        self.hits += len(rows)
        return rows

    def allocate(self, hashes: list[bytes], keep: set[bytes]) -> list[tuple[int, int]]:
        """Rows for the blocks among `hashes` not stored yet, as (index in `hashes`, row), evicting the
        least recently used blocks outside `keep`; stops early when nothing can be evicted. The
        caller must then copy each block into its row (`save`)."""
        out = []
        for i, h in enumerate(hashes):
            if h in self._index:
                continue
            if not self._free:
                victim = next((v for v in self._index if v not in keep), None)
                if victim is None:
                    break
                self._free.append(self._index.pop(victim))
                self.evicted += 1
            row = self._free.pop()
            self._index[h] = row
            out.append((i, row))
        self.stored += len(out)
        for h in reversed(hashes):  # the first blocks are the last to go
            if h in self._index:
                self._index.move_to_end(h)
        return out


def bytes_per_block(config, block_size: int, kv_heads: int, dtype) -> int:
    """Device bytes of one stored block: keys and values of every layer, and the mask."""
    _, _, heads, _, size = transformer.cache_shape(config, 1, block_size, kv_heads)
    return 2 * config.num_layers * heads * block_size * size * jnp.dtype(dtype).itemsize + block_size


def default_bytes(config, batch: int, cache_len: int, kv_heads: int, dtype) -> int:
    """serve's default prefix-cache memory: DEFAULT_SHARE of the KV cache's (keys and values)."""
    return int(DEFAULT_SHARE * 2 * math.prod(transformer.cache_shape(config, batch, cache_len, kv_heads)) * jnp.dtype(dtype).itemsize)


def _axes(x: Array) -> tuple[int, int]:
    """(row axis, position axis) of a cache array ([layers,] b, kv, s, d) or a mask [b, s]."""
    return (x.ndim - 4, x.ndim - 2) if x.ndim >= 4 else (0, 1)


def _copy(dst: Array, src: Array, dst_row, dst_pos, src_row, src_pos, size: int) -> Array:
    """Copy `size` positions of one row of `src` into one row of `dst` (same kind of array)."""
    row, pos = _axes(src)
    start = [jnp.int32(0)] * src.ndim
    start[row], start[pos] = jnp.int32(src_row), jnp.int32(src_pos)
    shape = list(src.shape)
    shape[row], shape[pos] = 1, size
    piece = jax.lax.dynamic_slice(src, start, shape)
    at = [jnp.int32(0)] * dst.ndim
    at[row], at[pos] = jnp.int32(dst_row), jnp.int32(dst_pos)
    return jax.lax.dynamic_update_slice(dst, piece, at)


def _copy_all(dst, src, dst_row, dst_pos, src_row, src_pos, size):
    """`_copy` over every cache array of a pair of (k, v, mask) trees."""
    return jax.tree.map(lambda d, s: _copy(d, s, dst_row, dst_pos, src_row, src_pos, size), dst, src)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def restore(
    block_size: int, memory: transformer.KVMemory, blocks: Blocks, slot: Int[Array, ""], rows: Int[Array, "n"], count: Int[Array, ""]
) -> transformer.KVMemory:
    """Empty cache row `slot`, then fill its first `count` blocks from the store's `rows[:count]`;
    the row's step becomes count * block_size."""
    mine = (memory.k, memory.v, memory.mask)

    def body(j, trees):
        return _copy_all(trees, tuple(blocks), slot, j * block_size, rows[j], 0, block_size)

    k, v, mask = jax.lax.fori_loop(0, count, body, mine)
    length = count * block_size
    row = jax.lax.dynamic_index_in_dim(mask, slot, keepdims=False)
    row = jnp.where(jnp.arange(row.shape[0]) < length, row, False)
    mask = jax.lax.dynamic_update_index_in_dim(mask, row, slot, axis=0)
    return memory._replace(k=k, v=v, mask=mask, step=memory.step.at[slot].set(length))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def save(
    block_size: int, blocks: Blocks, memory: transformer.KVMemory, slot: Int[Array, ""],
    indices: Int[Array, "n"], rows: Int[Array, "n"], count: Int[Array, ""],
) -> Blocks:
    """Copy block `indices[j]` of cache row `slot` into store row `rows[j]`, for j < count."""

    def body(j, store):
        return Blocks(*_copy_all(tuple(store), (memory.k, memory.v, memory.mask), rows[j], 0, slot, indices[j] * block_size, block_size))

    return jax.lax.fori_loop(0, count, body, blocks)
