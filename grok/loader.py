"""Loading a checkpoint straight onto a device mesh, shard by shard.

Weights come one at a time from `checkpoint.iter_checkpoint(..., lazy=True)`, each array as a source
that answers "slice `index` of this weight" (`host[index]`), and each process asks only for the
slices its own devices hold:
- release pickles must be read whole, so the source is the file's NumPy array, sliced in memory:
  a host holds at most one tensor file (plus its slices) at a time;
- the safetensors format reads only the bytes of each slice from the memory-mapped file
  (`grok.safetensors_checkpoint.StoredArray`), so a host never holds a whole weight it only
  partly needs.
Per-layer weights are written into their stacked device arrays in place (the update donates its
input).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from grok import checkpoint, weights
from grok.config import GrokConfig
from grok.sharding import Sharder


def place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds the same (only local slices move).

    `host` may be any array-like with `shape`, `dtype` and `host[index] -> np.ndarray` (a lazily
    read `StoredArray`): only the slices of this process's devices are asked for.
    """
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_params(params: weights.Params, shardings: weights.Params) -> weights.Params:
    """Place a whole model tree of host arrays (for small models and tests)."""
    return jax.tree.map(lambda x, s: place(np.asarray(x), s), params, shardings)


def load_sharded(directory: str | Path, config: GrokConfig, sharder: Sharder, progress: bool = True) -> weights.Params:
    """Read a checkpoint (either format) into the model tree, every weight placed by the sharder's rules.

    8-bit weights keep the scale blocks the files have; their scales are laid out for that count.
    """
    shapes = weights.model_shapes(config)
    shardings = sharder.param_shardings(shapes)  # every rule checked before anything is read
    params: weights.Params = {path: {} for path in shapes}
    for name, weight in checkpoint.iter_checkpoint(directory, config, progress=progress, lazy=True):
        path, leaf = name.rsplit("/", 1)
        stacked, layer = weights.model_path(path)
        shape = weights.with_scale_blocks_of(shapes[stacked][leaf], weight)
        if shape != shapes[stacked][leaf]:
            # Scales in other row blocks than the release's, the same in every layer (`iter_checkpoint`
            # checks): learnt from the parameter's first file, before its stacked array is made.
            shapes[stacked][leaf] = shape
            shardings = sharder.param_shardings(shapes)
        target = shardings[stacked][leaf]
        if layer is None:
            params[path][leaf] = jax.tree.map(_place_from_file, weight, target)
            continue
        if leaf not in params[stacked]:
            params[stacked][leaf] = jax.tree.map(_zeros, shapes[stacked][leaf], target)
        params[stacked][leaf] = jax.tree.map(
            lambda into, host, sharding: _set_layer(into, _place_from_file(host, _drop_layer_axis(sharding)), layer),
            params[stacked][leaf], weight, target,
        )
    return params


def _place_from_file(host, sharding: NamedSharding) -> jax.Array:
    """`place` for a weight read from a file, reading each byte once and keeping no file alive.

    A `StoredArray` is read slice by slice when this process's devices hold only part of the
    weight; when they hold all of it (one process), it is read whole in one sequential read, which
    is faster than gathering every slice separately. Slices of a whole array in memory are copied
    out of it: CPU devices may alias a host buffer instead of copying it, and a device buffer
    aliasing a slice (a view) would keep the whole array alive, so the host would hold every file
    it read.
    """
    if not isinstance(host, np.ndarray) and not sharding.is_fully_addressable:
        return place(host, sharding)  # reads only the slices of this process's devices
    whole = np.asarray(host)
    return jax.make_array_from_callback(whole.shape, sharding, lambda index: np.array(whole[index]))


def _drop_layer_axis(sharding: NamedSharding) -> NamedSharding:
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


def _zeros(shape: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.Array:
    return _zeros_function(tuple(shape.shape), np.dtype(shape.dtype), sharding)()


@functools.cache
def _zeros_function(shape: tuple[int, ...], dtype: np.dtype, sharding: NamedSharding):
    """A compiled function that makes zeros straight into their shards.

    One per (shape, dtype, sharding), kept for every later load in this process: a new function
    each time would be traced and compiled each time.
    """
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, index: int) -> jax.Array:
    return stacked.at[index].set(layer)
