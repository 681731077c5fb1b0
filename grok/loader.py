"""Loading a checkpoint straight onto a device mesh, shard by shard.

Files are read one at a time; each process keeps only the slices its own devices hold and places
them there, so no host ever holds more than one tensor file (plus those slices) at once. Per-layer
weights are written into their stacked device arrays in place (the update donates its input).
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
    """A global array from a host array that every process holds the same (only local slices move)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_params(params: weights.Params, shardings: weights.Params) -> weights.Params:
    """Place a whole model tree of host arrays (for small models and tests)."""
    return jax.tree.map(lambda x, s: place(np.asarray(x), s), params, shardings)


def load_sharded(directory: str | Path, config: GrokConfig, sharder: Sharder, progress: bool = True) -> weights.Params:
    """Read a release checkpoint into the model tree, every weight placed by the sharder's rules."""
    shapes = weights.model_shapes(config)
    shardings = sharder.param_shardings(shapes)
    params: weights.Params = {path: {} for path in shapes}
    for name, weight in checkpoint.iter_checkpoint(directory, config, progress=progress):
        path, leaf = name.rsplit("/", 1)
        stacked, layer = weights.model_path(path)
        target = shardings[stacked][leaf]
        if layer is None:
            params[path][leaf] = jax.tree.map(place, weight, target)
            continue
        if leaf not in params[stacked]:
            params[stacked][leaf] = jax.tree.map(_zeros, shapes[stacked][leaf], target)
        params[stacked][leaf] = jax.tree.map(
            lambda into, host, sharding: _set_layer(into, place(host, _drop_layer_axis(sharding)), layer),
            params[stacked][leaf], weight, target,
        )
    return params


def _drop_layer_axis(sharding: NamedSharding) -> NamedSharding:
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


def _zeros(shape: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.Array:
    return jax.jit(lambda: jnp.zeros(shape.shape, shape.dtype), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, index: int) -> jax.Array:
    return stacked.at[index].set(layer)
