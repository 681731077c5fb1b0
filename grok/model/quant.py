"""8-bit weights as released: int8 values with bf16 per-column scales, optionally in row blocks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
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
    if isinstance(w, Int8RowsWeight):  # (defined below) a transpose a product folds into its operand
        return jnp.swapaxes(dequantize_t_to_f32(w), -1, -2).astype(dtype)
    if dtype == jnp.bfloat16:
        # The bf16 product, computed exactly in f32 and rounded once (`dequantize_to_f32`). A bf16
        # multiply gives the same numbers, but under jit XLA may drop its rounding when the result
        # is later cast to f32 (convert pairs are simplified away), as W_linear_1's is.
        return dequantize_to_f32(w).astype(dtype)
    return w.weight.astype(dtype) * _row_scales(w.scales.astype(dtype), w.weight.shape[-2])


def _row_scales(scales: Array, n_in: int) -> Array:
    """[..., blocks, out] scales repeated to one row per input row [..., n_in, out].

    Repeating the scales rather than reshaping the weight into blocks keeps the weight's layout, so
    a weight split over any number of devices dequantizes in place.
    """
    *lead, blocks, n_out = scales.shape
    if n_in % blocks:
        raise ValueError(f"input size {n_in} is not divisible into {blocks} scale blocks")
    # A broadcast, not `jnp.repeat`: its repeat counts become a cumsum that XLA:GPU folds as a
    # constant for minutes.
    rows = jnp.broadcast_to(scales[..., None, :], (*lead, blocks, n_in // blocks, n_out))
    return rows.reshape(*lead, n_in, n_out)


def dequantize_to_f32(w: QuantizedWeight8bit) -> Shaped[Array, "*e n_in n_out"]:
    """The bf16 values of `dequantize(w)`, held as float32 (bit for bit the same numbers).

    int8 times a bf16 scale is exact in f32 (at most 16 significant bits), so rounding that product
    to bf16 once gives exactly bf16's own `bf16(weight) * bf16(scales)`. XLA:CPU runs an f32 matmul
    of bf16-valued operands several times faster than the bf16 matmul and with the same result.
    """
    if isinstance(w, Int8RowsWeight):
        return jnp.swapaxes(dequantize_t_to_f32(w), -1, -2)
    scales = _row_scales(_round_to_bf16(w.scales), w.weight.shape[-2])
    return _round_to_bf16(w.weight.astype(jnp.float32) * scales)


def _round_to_bf16(x: Array) -> Array:
    info = jnp.finfo(jnp.bfloat16)
    return jax.lax.reduce_precision(x.astype(jnp.float32), exponent_bits=info.nexp, mantissa_bits=info.nmant)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8RowsWeight:
    """An 8-bit weight held transposed for GPUs: the released int8 values as [..., out, in], so that
    each output's weights are contiguous and a product summed over the input axis is a row
    reduction (XLA:GPU would otherwise transpose the weight once per step); scales as released.
    The same numbers as the `QuantizedWeight8bit` it came from (`to_rows_weight`)."""

    weight_t: Int8[Array, "*e n_out n_in"]
    scales: Shaped[Array, "*e nb n_out"]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dequantized weight, [..., in, out], as for `QuantizedWeight8bit`."""
        *lead, n_out, n_in = self.weight_t.shape
        return (*lead, n_in, n_out)

    @property
    def dtype(self):
        return self.weight_t.dtype


def to_rows_weight(w: QuantizedWeight8bit) -> Int8RowsWeight:
    """The GPU format of a weight (arrays on devices or on the host)."""
    return Int8RowsWeight(weight_t=w.weight.swapaxes(-1, -2), scales=w.scales)


def rows_weight_spec(spec: jax.sharding.PartitionSpec, ndim: int) -> jax.sharding.PartitionSpec:
    """The PartitionSpec of an `Int8RowsWeight`'s `weight_t` whose released weight has `spec`."""
    *lead, rows, cols = (*spec, *(None,) * (ndim - len(spec)))
    return jax.sharding.PartitionSpec(*lead, cols, rows)


def dequantize_t_to_f32(w: Int8RowsWeight) -> Shaped[Array, "*e n_out n_in"]:
    """`dequantize_to_f32` of the weight, transposed: [..., out, in]."""
    scales = jnp.swapaxes(_row_scales(_round_to_bf16(w.scales), w.weight_t.shape[-1]), -1, -2)
    return _round_to_bf16(w.weight_t.astype(jnp.float32) * scales)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class F32Weight:
    """An 8-bit weight dequantized once, at load time, to float32 values that are exactly its bf16
    values (`dequantize_to_f32`), stored transposed: `value_t` is [..., out, in].

    This is the CPU format. The model runs its bf16 matmuls with such a weight as f32 matmuls (the
    same numbers: XLA:CPU computes bf16 matmuls that way), at 4 bytes per weight instead of 1 but
    with no int8 conversion per step (about 1 G elements/s on 2 cores, slower than reading the
    f32 copy). Transposed, because XLA:CPU's products of a few rows with an [out, in] weight run
    two to three times faster than with [in, out] (`grok.model.ops.matmul_t`).
    """

    value_t: Shaped[Array, "... n_out n_in"]

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's own shape [..., in, out] (what Haiku checks)."""
        *lead, n_out, n_in = self.value_t.shape
        return (*lead, n_in, n_out)

    @property
    def dtype(self):
        return self.value_t.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class F32Experts:
    """Stacked expert weights [E, in, out] in the `F32Weight` format, one separate array per expert.

    Separate arrays let a computation read a selected expert in place: on XLA:CPU a slice of a
    stacked array is copied before a matmul can use it, which would cost more than the matmul.
    """

    values_t: tuple[Shaped[Array, "... n_out n_in"], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, n_out, n_in = self.values_t[0].shape
        return (*lead, len(self.values_t), n_in, n_out)

    @property
    def dtype(self):
        return self.values_t[0].dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class F32Table:
    """The embedding table [V, D] rounded to bf16 values once, kept in float32: both its uses (rows
    cast to bf16; the tied output projection, a bf16 matmul) only ever see the bf16 values, and the
    output projection then runs as an f32 matmul with no per-step cast of the table."""

    value: Shaped[Array, "v d"]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self):
        return self.value.dtype


def to_f32_weight(w: QuantizedWeight8bit | Array, experts_axis: int | None = None) -> F32Weight | F32Experts:
    """An 8-bit (or float) weight in the CPU format; `experts_axis` splits stacked experts apart.

    Converted one expert at a time, so the peak extra memory is one expert's f32 copy.
    """
    if experts_axis is None:
        return F32Weight(_to_f32_t(w))
    take = lambda a, e: np.take(a, e, axis=experts_axis) if isinstance(a, np.ndarray) else jnp.take(a, e, axis=experts_axis)
    return F32Experts(tuple(_to_f32_t(jax.tree.map(lambda a: take(a, e), w)) for e in range(w.shape[experts_axis])))


def to_f32_table(embeddings: Array) -> F32Table:
    return F32Table(_round_to_bf16(jnp.asarray(embeddings)))


@jax.jit
def _to_f32_t(w: QuantizedWeight8bit | Array) -> Array:
    value = dequantize_to_f32(w) if isinstance(w, QuantizedWeight8bit) else _round_to_bf16(w)
    return jnp.swapaxes(value, -1, -2)


def quantize(value: np.ndarray, blocks: int = 1) -> QuantizedWeight8bit:
    """Symmetric int8 quantization of a float [..., in, out] array with `blocks` row blocks (NumPy)."""
    value = np.asarray(value, np.float32)
    *lead, n_in, n_out = value.shape
    if n_in % blocks:
        raise ValueError(f"input size {n_in} is not divisible into {blocks} scale blocks")
    grouped = value.reshape(*lead, blocks, n_in // blocks, n_out)
    scales = (np.abs(grouped).max(axis=-2) / 127.0).astype(ml_dtypes.bfloat16)
    safe = np.where(scales == 0, 1, scales.astype(np.float32))[..., None, :]
    weight = np.clip(np.round(grouped / safe), -127, 127).astype(np.int8).reshape(value.shape)
    return QuantizedWeight8bit(weight=weight, scales=scales)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8CpuWeight(QuantizedWeight8bit):
    """A released 8-bit weight, the same int8 and bf16 arrays, marked for the native CPU kernels
    (`grok.native.int8_matmul`), which read it as stored: the int8 CPU format, 1 byte per weight.

    Only a model on one CPU device holds these (`grok.model.transformer.cpu_int8_params`); anything that does
    not know the class sees a `QuantizedWeight8bit` and dequantizes it with XLA.
    """


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BF16Table:
    """The embedding table [V, D] rounded to bf16 once and kept so (the int8 CPU format): both its
    uses only see bf16 values (rows cast to bf16; the tied output projection, a bf16 matmul), and
    the output projection reads 2 bytes per element instead of the f32 table's 4."""

    value: Shaped[Array, "v d"]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self):
        return self.value.dtype


def to_int8_cpu_weight(w: QuantizedWeight8bit) -> Int8CpuWeight:
    """The same arrays, where they are (a loader places host arrays itself), scales in bf16."""
    return Int8CpuWeight(weight=w.weight, scales=_as_bf16(w.scales))


def to_bf16_table(embeddings: Array) -> BF16Table:
    """The table rounded to bf16 (to nearest even, as `astype` rounds), where it is."""
    return BF16Table(_as_bf16(embeddings))


def _as_bf16(x: Array) -> Array:
    """x in bf16; a NumPy array is converted on the host, so only the bf16 copy reaches a device."""
    if x.dtype == jnp.bfloat16:
        return x
    return x.astype(ml_dtypes.bfloat16) if isinstance(x, np.ndarray) else x.astype(jnp.bfloat16)
