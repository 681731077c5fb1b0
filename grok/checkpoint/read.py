"""Reading a checkpoint of either format, every weight checked against the config."""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np
from tqdm import tqdm

from grok.checkpoint import grok2_release, pickles, safetensors_format
from grok.checkpoint.files import PathLike, Weight, checkpoint_format, expected_weights, resolve_checkpoint_dir
from grok.model.config import GrokConfig
from grok.model.weights import Params


def iter_checkpoint(
    directory: PathLike, config: GrokConfig, *, progress: bool = True, lazy: bool = False, quantize: bool = False
) -> Iterator[tuple[str, Weight]]:
    """Yield (parameter path, weight) in release file order, each checked against what `config` expects.

    An 8-bit weight's scales may come in any number of row blocks that divides its input size, as
    the file has them (`check_weight`), the same number in every layer of a parameter.

    Reads either format (see `checkpoint_format`). Only one weight is in memory at a time (plus
    whatever the caller keeps). With `lazy`, a safetensors weight's arrays are
    `grok.checkpoint.safetensors_format.StoredArray`s, which read only the bytes of the slice they are
    indexed with (`stored[index]`), so a caller that needs only some shards reads only those;
    a pickle has to be read whole, so its arrays are NumPy arrays either way. Both have `shape`,
    `dtype` and `[index]`; a lazy weight stays readable after the iteration moves on.

    Grok-2's release (`grok.checkpoint.grok2_release`) is read lazily too: bf16 as released, or with
    `quantize` its matrices as int8 with per-column scales (Grok-1's checkpoints are 8-bit already).
    """
    directory = resolve_checkpoint_dir(directory)
    names, expected, _ = expected_weights(config)
    form = checkpoint_format(directory)
    if form == "grok2-release":
        weights = grok2_release.iter_weights(directory, names, grok2_release.expected_release(expected, quantize),
                                             quantize)
    elif form == "safetensors":
        weights = safetensors_format.iter_weights(directory, names, expected)
    else:
        weights = pickles.iter_pickles(directory, names, expected)
    for name, weight in tqdm(weights, total=len(names), desc=f"reading {directory}", unit="file", disable=not progress):
        yield name, weight if lazy else jax.tree.map(np.asarray, weight)


def read_checkpoint(directory: PathLike, config: GrokConfig, *, progress: bool = True) -> Params:
    """Load a checkpoint of either format as a checkpoint tree of NumPy arrays.

    `directory` holds the checkpoint, or is a directory above it (see `resolve_checkpoint_dir`).
    """
    loaded = [weight for _, weight in iter_checkpoint(directory, config, progress=progress)]
    return jax.tree_util.tree_unflatten(expected_weights(config)[2], loaded)

