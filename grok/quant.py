"""8-bit weights as released: int8 values with bf16 per-column scales, optionally in row blocks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int8, Shaped


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight8bit:
    """A weight whose value is `weight * scales`, scales broadcast per column or per row block.

    `scales` is [..., 1, out] (one scale per column) or [..., nb, out] (the input rows split into
    nb equal contiguous blocks, each with its own column scales; the release uses nb = 8).
    The class name matches the release's pickles (`__main__.QuantizedWeight8bit`).
    """

    weight: Int8[Array, "*e n_in n_out"]
    scales: Shaped[Array, "*e nb n_out"]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dequantized weight (lets Haiku check it like a float parameter)."""
        return tuple(self.weight.shape)

    @property
    def dtype(self):
        return self.weight.dtype


def dequantize(w: QuantizedWeight8bit, dtype=jnp.bfloat16) -> Shaped[Array, "*e n_in n_out"]:
    """`dtype(weight) * dtype(scales)`, each row block of the input axis with its own scales."""
    n_in = w.weight.shape[-2]
    blocks = w.scales.shape[-2]
    if n_in % blocks:
        raise ValueError(f"input size {n_in} is not divisible into {blocks} scale blocks")
    # Repeat each block's scales over its rows rather than reshaping the weight into blocks: the
    # weight keeps its layout, so a weight split over any number of devices dequantizes in place.
    scales = jnp.repeat(w.scales.astype(dtype), n_in // blocks, axis=-2, total_repeat_length=n_in)
    return w.weight.astype(dtype) * scales


def quantize(value: np.ndarray, blocks: int = 1) -> QuantizedWeight8bit:
    """Symmetric int8 quantization of a float [..., in, out] array with `blocks` row blocks (NumPy)."""
    import ml_dtypes

    value = np.asarray(value, np.float32)
    *lead, n_in, n_out = value.shape
    if n_in % blocks:
        raise ValueError(f"input size {n_in} is not divisible into {blocks} scale blocks")
    grouped = value.reshape(*lead, blocks, n_in // blocks, n_out)
    scales = (np.abs(grouped).max(axis=-2) / 127.0).astype(ml_dtypes.bfloat16)
    safe = np.where(scales == 0, 1, scales.astype(np.float32))[..., None, :]
    weight = np.clip(np.round(grouped / safe), -127, 127).astype(np.int8).reshape(value.shape)
    return QuantizedWeight8bit(weight=weight, scales=scales)
