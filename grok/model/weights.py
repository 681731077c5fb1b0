"""The one description of Grok-1's weights, and the map between the model's and the checkpoint's trees.

Shapes come from the Haiku modules themselves (`jax.eval_shape` of `init`); this module adds
which weights are stored 8-bit and with how many scale blocks (the release's layout; a checkpoint
may store any number of row blocks that divides a weight's input size, see `with_scale_blocks_of`),
and converts between
- the *model tree*: layers stacked for the scan, `transformer/decoder_layer/...` with a leading
  layer axis, and
- the *checkpoint tree*: one entry per layer, `transformer/decoder_layer_{i}/...`, as released.
"""

from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from grok.model import transformer
from grok.model.config import GrokConfig
from grok.model.quant import QuantizedWeight8bit

Params = dict[str, dict[str, object]]

# Module path (inside a decoder layer) -> number of row blocks of its bf16 scales in the release, for
# 8-bit weights. Checkpoints may hold other counts (read from each file); this is the layout written.
SCALE_BLOCKS = {
    "multi_head_attention/query": 1,
    "multi_head_attention/key": 1,
    "multi_head_attention/value": 1,
    "multi_head_attention/linear": 8,
    "moe/linear": 1,
    "moe/linear_v": 1,
    "moe/linear_1": 8,
    "dense_mlp/linear": 1,  # Grok-2's (released in bf16): as the experts' when quantized
    "dense_mlp/linear_v": 1,
    "dense_mlp/linear_1": 8,
}

_STACKED = "transformer/decoder_layer/"
_PER_LAYER = re.compile(r"^transformer/decoder_layer_(\d+)/(.+)$")


def model_shapes(config: GrokConfig, scale_blocks: Mapping[str, int] = SCALE_BLOCKS) -> Params:
    """Abstract model tree: float weights as `ShapeDtypeStruct`s in the release's float dtype
    (`config.release_dtype`), 8-bit ones as `QuantizedWeight8bit` of them.

    `scale_blocks` says which modules are 8-bit and how many row blocks their scales have (by
    default as Grok-1 is released, and as Grok-2 is held quantized; {}: every weight float).
    """
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(transformer.build(config).init, jax.random.key(0), tokens)
    dtype = jnp.dtype(config.release_dtype)
    tree: Params = {}
    for path, leaves in shapes.items():
        blocks = scale_blocks.get(path.removeprefix(_STACKED))
        tree[path] = {
            name: jax.ShapeDtypeStruct(leaf.shape, dtype) if blocks is None else quantized_shape(leaf.shape, blocks)
            for name, leaf in leaves.items()
        }
    return tree


def quantized_shape(shape: tuple[int, ...], blocks: int) -> QuantizedWeight8bit:
    """Abstract 8-bit weight of `shape` [..., in, out]: int8 values, bf16 scales [..., blocks, out]."""
    *lead, _, n_out = shape
    return QuantizedWeight8bit(
        weight=jax.ShapeDtypeStruct(tuple(shape), jnp.int8),
        scales=jax.ShapeDtypeStruct((*lead, blocks, n_out), jnp.bfloat16),
    )


def as_stored(want, weight):
    """Abstract weight `want` as `weight` (what a file holds) stores it: 8-bit with its scales in as
    many row blocks as `weight` has, or float in `weight`'s dtype (Grok-2's release: bf16 matrices).

    Shardings of the scales depend on their block count (`grok.parallel.sharding.Sharder`), so they
    are computed from this rather than from the release's layout.
    """
    if isinstance(weight, QuantizedWeight8bit):
        return quantized_shape(want.shape, scale_block_count(weight)) if isinstance(want, QuantizedWeight8bit) else want
    if not hasattr(weight, "dtype"):
        return want
    return jax.ShapeDtypeStruct(tuple(want.shape), weight.dtype)


def scale_block_count(weight: QuantizedWeight8bit) -> int:
    """Number of row blocks of an 8-bit weight's scales [..., nb, out] (abstract or not)."""
    return weight.scales.shape[-2]


def checkpoint_shapes(config: GrokConfig, scale_blocks: Mapping[str, int] = SCALE_BLOCKS) -> Params:
    """Abstract checkpoint tree (per-layer paths): the shapes and dtypes of a checkpoint whose scales have
    `scale_blocks` row blocks (by default a release checkpoint's)."""
    return unstack_layers(model_shapes(config, scale_blocks), config.num_layers)


def unstack_layers(params: Params, num_layers: int) -> Params:
    """Model tree -> checkpoint tree: split the leading layer axis into `decoder_layer_{i}` entries."""
    out: Params = {}
    for path, leaves in params.items():
        if not path.startswith(_STACKED):
            out[path] = leaves
            continue
        for i in range(num_layers):
            out[f"transformer/decoder_layer_{i}/{path.removeprefix(_STACKED)}"] = {
                name: jax.tree.map(lambda a: _index(a, i), leaf) for name, leaf in leaves.items()
            }
    return out


def model_path(checkpoint_path: str) -> tuple[str, int | None]:
    """Checkpoint path -> (model path, layer index); the index is None outside the decoder layers."""
    match = _PER_LAYER.match(checkpoint_path)
    if match is None:
        return checkpoint_path, None
    return _STACKED + match.group(2), int(match.group(1))


def stack_layers(params: Params, num_layers: int) -> Params:
    """Checkpoint tree -> model tree: stack `decoder_layer_{i}` entries along a new leading axis."""
    out: Params = {}
    per_layer: dict[str, list] = {}
    for path, leaves in params.items():
        stacked, layer = model_path(path)
        if layer is None:
            out[path] = leaves
        else:
            per_layer.setdefault(stacked, [None] * num_layers)[layer] = leaves
    for stacked, layers in per_layer.items():
        missing = [i for i, leaves in enumerate(layers) if leaves is None]
        if missing:
            raise ValueError(f"checkpoint has no layer {missing[0]} entry for {stacked}")
        out[stacked] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return out


def _index(leaf, i: int):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[i]


def is_weight(x) -> bool:
    """A checkpoint file's unit: one array or one 8-bit weight (never split into its two arrays)."""
    return isinstance(x, QuantizedWeight8bit) or not isinstance(x, dict)


def flatten(params: Params) -> tuple[list[str], list]:
    """Checkpoint tree -> (names, weights) in release file order: keys sorted as strings at each level."""
    leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_weight)
    names = ["/".join(str(k.key) for k in path) for path, _ in leaves_with_paths]
    return names, [leaf for _, leaf in leaves_with_paths]


def random_params(config: GrokConfig, seed: int = 0, scale_blocks: Mapping[str, int] = SCALE_BLOCKS) -> Params:
    """Random checkpoint tree with the release's dtypes: int8 weights with bf16 scales, fp32 others.

    Values are scaled so activations stay O(1) through the layers; every scale block differs, so
    tests notice a dequantization that puts scales on the wrong rows. `scale_blocks` as in `model_shapes`.
    """
    rng = np.random.default_rng(seed)

    def make(leaf, name: str):
        if isinstance(leaf, QuantizedWeight8bit):
            n_in = leaf.weight.shape[-2]
            weight = rng.integers(-127, 128, size=leaf.weight.shape, dtype=np.int8)
            scales = rng.uniform(0.5, 1.5, size=leaf.scales.shape) / (73.0 * np.sqrt(n_in))
            return QuantizedWeight8bit(weight=weight, scales=scales.astype(ml_dtypes.bfloat16))
        if name == "scale":
            return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
        if name in ("embeddings", "unembeddings"):
            return rng.standard_normal(leaf.shape).astype(np.float32)
        return (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)

    shapes = checkpoint_shapes(config, scale_blocks)
    return {path: {name: make(leaf, name) for name, leaf in leaves.items()} for path, leaves in shapes.items()}
