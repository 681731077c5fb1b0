"""Loading a checkpoint straight onto a device mesh, shard by shard.

Weights come one at a time from `read.iter_checkpoint(..., lazy=True)`, each array as a source
that answers "slice `index` of this weight" (`host[index]`), and each process asks only for the
slices its own devices hold:
- release pickles must be read whole, so the source is the file's NumPy array, sliced in memory:
  a host holds at most one tensor file (plus its slices) at a time;
- the safetensors format reads only the bytes of each slice from the memory-mapped file
  (`grok.checkpoint.safetensors_format.StoredArray`), so a host never holds a whole weight it only
  partly needs.
Per-layer weights are written into their stacked device arrays in place (the update donates its
input).

`load_layers` is the single-device path: the checkpoint tree (one entry per layer, as released, what
the CPU weight formats run) on the default device, each weight converted and placed as soon as it is
read, so that loading holds at most one tensor file beyond what it keeps.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from grok.checkpoint import pickles
from grok.checkpoint.files import (
    LayerScaleBlocks,
    Weight,
    check_files_present,
    check_weight,
    checkpoint_format,
    expected_weights,
    resolve_checkpoint_dir,
    tensor_file_name,
)
from grok.checkpoint.read import iter_checkpoint
from grok.checkpoint.safetensors_format import StoredArray
from grok.model import weights
from grok.model.config import GrokConfig
from grok.parallel.sharding import Sharder


def place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds the same (only local slices move).

    `host` may be any array-like with `shape`, `dtype` and `host[index] -> np.ndarray` (a lazily
    read `StoredArray`): only the slices of this process's devices are asked for.
    """
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_params(params: weights.Params, shardings: weights.Params) -> weights.Params:
    """Place a whole model tree of host arrays (for small models and tests)."""
    return jax.tree.map(lambda x, s: place(np.asarray(x), s), params, shardings)


def load_sharded(
    directory: str | Path, config: GrokConfig, sharder: Sharder, progress: bool = True, quantize: bool = False
) -> weights.Params:
    """Read a checkpoint (any format) into the model tree, every weight placed by the sharder's rules.

    8-bit weights keep the scale blocks the files have; their scales are laid out for that count.
    Float weights keep their dtype (Grok-2's bf16), unless `quantize` makes int8 of them
    (`grok.checkpoint.read.iter_checkpoint`).
    """
    shapes = weights.model_shapes(config)
    shardings = sharder.param_shardings(shapes)  # every rule checked before anything is read
    params: weights.Params = {path: {} for path in shapes}
    for name, weight in iter_checkpoint(directory, config, progress=progress, lazy=True, quantize=quantize):
        path, leaf = name.rsplit("/", 1)
        stacked, layer = weights.model_path(path)
        shape = weights.as_stored(shapes[stacked][leaf], weight)
        if shape != shapes[stacked][leaf]:
            # Scales in other row blocks than the release's (the same in every layer: `iter_checkpoint`
            # checks), or a float weight where Grok-1 has an 8-bit one: learnt from the parameter's
            # first file, before its stacked array is made.
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
    it read. A weight composed of several files' tensors (Grok-2's release) is always read slice by
    slice, so that no process holds a whole expert stack.
    """
    composed = not isinstance(host, (np.ndarray, StoredArray))  # Grok-2's release: pieces of several files
    if composed or (not isinstance(host, np.ndarray) and not sharding.is_fully_addressable):
        return place(host, sharding)  # reads only the slices of this process's devices, one at a time
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


Convert = Callable[[str, str, Weight], object]


def load_layers(
    directory: str | Path, config: GrokConfig, convert: Convert | None = None, progress: bool = True,
    quantize: bool = False,
) -> weights.Params:
    """Read a checkpoint (either format) into the checkpoint tree (`transformer/decoder_layer_{i}/...`,
    what `weights.unstack_layers` makes of the model tree), every weight on the default device.

    Weights are read one at a time in release file order, checked as `load_sharded` checks them (the
    same errors: `CheckpointError` naming the file and the parameter), and each is
    - passed through `convert(path, name, weight)` when given (`path` like
      `transformer/decoder_layer_3/moe/linear`, `name` like `w`; `weight` a NumPy array or a
      `QuantizedWeight8bit` of two, its scales in the row blocks the file has); it returns the leaf
      to keep, any pytree of NumPy or JAX arrays (a JAX array is kept where it is: `jnp` operations
      on NumPy inputs run on the default device);
    - placed on the default device (NumPy leaves; JAX arrays as they come), waited for, and only then
      is the next file read. Nothing keeps the file's NumPy arrays after that.
    So at any time loading holds at most one tensor file beyond the result: the file being read and
    placed (plus whatever `convert` makes while it runs). Placed leaves are uncommitted arrays with a
    `SingleDeviceSharding`.

    NumPy to device on the CPU backend (JAX 0.10.2, measured): `jax.device_put(a)` aliases `a` when
    its data is 64-byte aligned and C-contiguous (the device buffer then keeps `a`, and whatever `a`
    is a view of, alive: `may_alias=False` does not prevent it for a NumPy input), and copies it once
    otherwise. A release pickle's arrays sit inside `bytes` objects whose data start 48 bytes past a
    64-byte boundary whenever malloc maps them (large tensors), a freshly allocated large NumPy
    array 16 past, so real checkpoints' tensors are copied, once. `jnp.asarray(a)` / `jnp.array(a)`
    never alias: they copy, and may peak at two copies beside `a` (a misaligned 400 MB f32 array:
    +800 MB peak RSS, against +400 MB for `device_put`), so a `convert` should bring NumPy leaves
    over with `jax.device_put` rather than `jnp.asarray`. Here every placed leaf gets a buffer of its
    own (an aliased one is copied once on the device), so no host array outlives its placement and
    each file's memory is freed before the next is read. Measured on a 393 MB checkpoint (largest
    file 128 MB): peak RSS is the result + 36 MB (+52 MB converting to the f32 CPU format), where
    `unstack_layers(load_sharded(...))` peaks at the result + 309 MB.

    Only one weight's scales are needed at a time, but every layer of a parameter must still have its
    scales in the same number of row blocks (as for the stacked model tree; `LayerScaleBlocks`).
    """
    params: weights.Params = {}
    for name, read in _weight_readers(directory, config, progress, quantize):
        path, leaf = name.rsplit("/", 1)
        host = read()
        if convert is not None:
            host = convert(path, leaf, host)  # the file's arrays go here, unless `convert` keeps them
        placed = jax.tree.map(_own_device_buffer, host)
        del host
        params.setdefault(path, {})[leaf] = jax.block_until_ready(placed)  # then the next file is read
    return params


def _weight_readers(
    directory: str | Path, config: GrokConfig, progress: bool, quantize: bool = False
) -> Iterator[tuple[str, Callable[[], Weight]]]:
    """(parameter path, read) for each weight in release file order, as `iter_checkpoint`
    yields them (same checks, same progress bar), except that `read()` gives the weight (NumPy
    arrays) and nothing here keeps it.

    `iter_checkpoint`'s generators (and tqdm's) hold the weight they last yielded until asked for the
    next, so a caller of it still has the previous file in memory while the next is read. A
    safetensors weight comes from it lazily (`StoredArray`s, no data) and is read by `read`; a
    pickle is read by `read` with the pieces `iter_checkpoint` uses (`load_tensor`, `check_weight`,
    `LayerScaleBlocks`).
    """
    directory = resolve_checkpoint_dir(directory)
    if checkpoint_format(directory) != "pickle":  # lazy: read by `read`
        for name, stored in iter_checkpoint(directory, config, progress=progress, lazy=True, quantize=quantize):
            yield name, functools.partial(jax.tree.map, np.asarray, stored)
        return
    names, expected, _ = expected_weights(config)
    check_files_present(directory, names)
    layers = LayerScaleBlocks()
    files = tqdm(range(len(names)), desc=f"reading {directory}", unit="file", disable=not progress)
    for i in files:
        path = directory / tensor_file_name(i)
        yield names[i], functools.partial(_read_pickle, path, names[i], expected[i], layers)


def _read_pickle(path: Path, name: str, want, layers: LayerScaleBlocks) -> Weight:
    label = f"{path} ({name})"
    weight = pickles.load_tensor(path)
    check_weight(label, want, weight)
    layers.check(label, name, weight)
    return weight


def _own_device_buffer(leaf) -> jax.Array:
    """`leaf` on the default device in a buffer that aliases no host memory (a JAX array as it is)."""
    if isinstance(leaf, jax.Array):
        return leaf
    host = np.asarray(leaf)
    placed = jax.device_put(host)
    if host.size and placed.unsafe_buffer_pointer() == host.ctypes.data:
        # A device copy (waited for: it reads `host`, which the caller may then free or change); the
        # alias, and with it `host`, go.
        placed = jax.block_until_ready(jax.device_put(placed, may_alias=False))
    return placed
