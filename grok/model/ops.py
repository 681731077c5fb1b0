"""Pure numerical building blocks of Grok-1 (GROK1.md "Forward pass"), free of Haiku state.

Haiku modules in `grok.model.transformer` own the parameters and call these; tests call them directly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from grok import native
from grok.model.platform import on_cpu, platform
from grok.model.quant import (
    F32Experts,
    Int8CpuWeight,
    Int8RowsWeight,
    QuantizedWeight8bit,
    dequantize,
    dequantize_t_to_f32,
    dequantize_to_f32,
    rows_weight_spec,
)

MOE_IMPLS = ("auto", "all_experts", "ragged", "gather")
# Up to this many tokens, a mixture over CPU-format weights runs natively (`moe_grouped`): each
# expert gets about tokens * k / E rows, where XLA:CPU's dot reads a weight at half the memory speed.
NATIVE_MOE_TOKENS = 64

RMS_NORM_EPS = 1e-5
ATTN_SOFTCAP = 30.0
MASK_VALUE = -1e30
ROPE_BASE = 10000.0


def rms_norm(x: Float[Array, "... d"], scale: Float[Array, "d"]) -> Float[Array, "... d"]:
    """RMSNorm in float32 with a plain (not 1 + scale) multiplier, cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_NORM_EPS)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rotate_half(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    """[x1, x2] -> [-x2, x1] over the two halves of the last axis (not interleaved pairs)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(
    x: Float[Array, "b t h d"], positions: Int[Array, "b t"], base: float = ROPE_BASE
) -> Float[Array, "b t h d"]:
    """Rotary embedding (rotate-half, Grok-1's base 10000 by default) at absolute positions, in float32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    phase = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]  # [b, t, 1, d]
    x32 = x.astype(jnp.float32)
    return (x32 * jnp.cos(phase) + rotate_half(x32) * jnp.sin(phase)).astype(x.dtype)


def attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b kv s d"],
    v: Float[Array, "b kv s d"],
    mask: Bool[Array, "b t s"],
    multiplier: float,
    native_kernels: bool = True,
    temperature: Float[Array, "b t"] | None = None,
) -> Float[Array, "b t h d"]:
    """Grouped-query attention with Grok's soft-capped logits; query head h reads kv head h // G.
    `temperature`: each query's factor on its capped logits (Grok-2's, `length_temperature`).

    Both products are matmuls in q's dtype (for bf16: bf16 results of f32 sums). A float32 cache
    under bf16 queries (the CPU format: it holds bf16 values) runs them as f32 matmuls rounded to
    bf16: the same numbers, without converting the cache, which XLA:CPU would do every step.
    `native_kernels`: whether the logits of a decode step may use the native CPU kernel
    (`batched_matmul_t`); pass False for a computation sharded over devices, which XLA cannot split
    a custom call over.
    """
    b, t, h, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    q = q.reshape(b, t, kv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, d)
    logits = _product_as(q.dtype, q, k, functools.partial(batched_matmul_t, native_kernels=native_kernels))
    logits = logits.reshape(b, kv, t, g, s) * multiplier
    logits = ATTN_SOFTCAP * jnp.tanh(logits / ATTN_SOFTCAP)
    if temperature is not None:
        logits = logits * temperature[:, None, :, None, None]
    logits = jnp.where(mask[:, None, :, None, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).reshape(b, kv, t * g, s)
    weigh_values = functools.partial(jax.lax.dot_general, dimension_numbers=(((3,), (2,)), ((0, 1), (0, 1))))
    out = _product_as(q.dtype, probs, v, weigh_values).astype(q.dtype)
    return out.reshape(b, kv, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def _product_as(dtype, a: Array, b: Array, product: Callable[[Array, Array], Array]) -> Float[Array, "..."]:
    """`product(a, b)` (a matmul) in `dtype`, as float32 holding its `dtype` result (rounded even
    where XLA would keep the f32 sum because the consumer upcasts). A float32 `b` under a narrower
    `dtype` holds `dtype` values: the product then runs in f32 on the same numbers."""
    if b.dtype == dtype:
        a = a.astype(dtype)
    else:
        a, b = _f32_rounded_as(a, dtype), b.astype(jnp.float32)
    return _f32_rounded_as(product(a, b), dtype)


def batched_matmul_t(
    x: Float[Array, "*batch m k"], w_t: Float[Array, "*batch n k"], native_kernels: bool = True
) -> Float[Array, "*batch m n"]:
    """x @ w_t.T for each element of the leading batch dimensions (a decode step's queries times
    each sequence's cached keys). A few float32 rows go to the native kernel where it is built and
    allowed: XLA:CPU's batched dot of this shape runs about ten times slower than reading w_t."""
    if native_kernels and x.dtype == w_t.dtype == jnp.float32 and _native_rows(x.shape[-2], minimum=1):
        return native.matmul_t(x, w_t)
    batch = tuple(range(x.ndim - 2))
    return jax.lax.dot_general(x, w_t, (((x.ndim - 1,), (x.ndim - 1,)), (batch, batch)))


def _native_rows(rows: int, minimum: int, limit: int = native.MAX_ROWS) -> bool:
    """Whether a product with this many rows of x (`minimum` to `limit`) goes to the native kernel."""
    return minimum <= rows <= limit and on_cpu() and native.available()


def attention_mask(
    key_valid: Bool[Array, "b s"], query_positions: Int[Array, "b t"]
) -> Bool[Array, "b t s"]:
    """Causal mask (key position <= query position) AND the key is a real (non-pad) token."""
    key_positions = jnp.arange(key_valid.shape[1])
    causal = key_positions[None, None, :] <= query_positions[:, :, None]
    return causal & key_valid[:, None, :]


def length_temperature(positions: Int[Array, "b t"], length: int) -> Float[Array, "b t"]:
    """Grok-2's attention temperature: log2(p) / log2(length) for a query at position p > length, else 1."""
    p = jnp.maximum(positions, 1).astype(jnp.float32)
    return jnp.where(positions > length, jnp.log2(p) / np.float32(np.log2(length)), 1.0)


def softcap(x: Float[Array, "..."], cap: float) -> Float[Array, "..."]:
    """cap * tanh(x / cap) in float32 (cap 0: x unchanged)."""
    x = x.astype(jnp.float32)
    return cap * jnp.tanh(x / cap) if cap else x


def route(
    x: Float[Array, "... d"], router_w: Float[Array, "d e"], num_selected: int, cap: float = 0.0
) -> tuple[Float[Array, "... k"], Int[Array, "... k"]]:
    """Router: softmax over all experts in f32 of the logits (soft-capped at `cap`, Grok-2's); the
    top-k raw probabilities are the gates (not renormalized)."""
    probs = jax.nn.softmax(softcap(x.astype(jnp.float32) @ router_w.astype(jnp.float32), cap), axis=-1)
    return jax.lax.top_k(probs, num_selected)


def expert_hidden(
    x: Float[Array, "n d"], w_in: Float[Array, "d f"], w_gate: Float[Array, "d f"]
) -> Float[Array, "n f"]:
    """One expert's gated hidden activations gelu(x @ W_linear) * (x @ W_linear_v), in f32 (both
    matmul outputs rounded to x's dtype first)."""
    hidden = jax.nn.gelu(_f32_rounded_as(x @ w_in, x.dtype), approximate=True)
    return hidden * _f32_rounded_as(x @ w_gate, x.dtype)


def expert_ffn(
    x: Float[Array, "n d"],
    w_in: Float[Array, "d f"],
    w_gate: Float[Array, "d f"],
    w_out: Float[Array, "f d"],
) -> Float[Array, "n d"]:
    """One expert: `expert_hidden` (f32), then an f32 matmul with W_linear_1."""
    return expert_hidden(x, w_in, w_gate) @ w_out.astype(jnp.float32)


def expert_ffn_t(
    x: Float[Array, "n d"],
    w_in_t: Float[Array, "f d"],
    w_gate_t: Float[Array, "f d"],
    w_out_t: Float[Array, "d f"],
    product: Callable[[Array, Any], Array] | None = None,
) -> Float[Array, "n d"]:
    """`expert_ffn` with weights in the CPU format: float32 holding bf16 values, stored transposed
    [out, in] (`grok.model.quant.F32Weight`). The same roundings: both input matmuls rounded to x's dtype.
    `product(x, w_t)` computes x @ w_t.T (default `matmul_t`; `moe_grouped` passes every expert's
    weights at once)."""
    product = product or matmul_t
    hidden = jax.nn.gelu(_f32_rounded_as(product(x, w_in_t), x.dtype), approximate=True)
    gated = hidden * _f32_rounded_as(product(x, w_gate_t), x.dtype)
    return product(gated, w_out_t)


# Up to this many rows, XLA:CPU multiplies [out, in] @ x.T (then transposes the small result)
# faster than x @ [out, in].T; beyond, the other way round (measured on a 2-core x86 machine).
_FEW_ROWS = 32


def matmul_t(x: Float[Array, "... d_in"], w_t: Float[Array, "d_out d_in"]) -> Float[Array, "... d_out"]:
    """x @ w_t.T in float32 (x is cast exactly), for a weight stored transposed, [out, in].

    A few rows (decoding a batch) go to the native kernel where it is built (`grok.native`), which
    reads the weight once for all of them; otherwise XLA:CPU's dot, oriented as it runs fastest."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    contract = (((1,), (1,)), ((), ()))
    if _native_rows(rows.shape[0], minimum=2):  # one row: XLA's GEMV matches the kernel
        y = native.matmul_t(rows, w_t)
    elif rows.shape[0] == 1:  # a matrix-vector product: XLA:CPU's own GEMV, which reads w_t at memory speed
        y = (w_t @ rows[0])[None, :]
    elif rows.shape[0] <= _FEW_ROWS:
        y = jax.lax.dot_general(w_t, rows, contract).T
    else:
        y = jax.lax.dot_general(rows, w_t, contract)
    return y.reshape(*x.shape[:-1], w_t.shape[0])


def int8_native() -> bool:
    """Whether products with `Int8CpuWeight`s run on the native int8 kernels: on a CPU backend
    where they are built (else XLA dequantizes the weights, with the same numbers)."""
    return on_cpu() and native.int8_available()


def int8_matmul(
    x: Float[Array, "... d_in"], w: QuantizedWeight8bit, group_sizes: Int[Array, "e"] | None = None
) -> Float[Array, "... d_out"]:
    """x @ w in float32 for an 8-bit weight in the int8 CPU format, its values rounded to bf16 as
    GROK1.md dequantizes them; x's values (bf16 or f32) are used exactly. With stacked weights
    [e, in, out], x's rows come grouped by weight (`native.int8_matmul`). By the native kernel
    where `int8_native()`, else by XLA."""
    rows = x.reshape(-1, x.shape[-1])
    if int8_native():
        y = native.int8_matmul(rows, w.weight, w.scales, group_sizes)
    elif group_sizes is None:
        y = rows.astype(jnp.float32) @ dequantize_to_f32(w)
    else:
        y = _grouped_by_xla(rows.astype(jnp.float32), group_sizes, dequantize_to_f32(w))
    return y.reshape(*x.shape[:-1], w.shape[-1])


# Up to this many rows (a decode batch), an accelerator multiplies by an 8-bit weight as one fused
# reduction (`int8_rows_product`): the int8 weight is read once, no dequantized copy is written. More
# rows (a prefill chunk) dequantize the weight and run a GEMM, which their arithmetic pays for.
DECODE_ROWS = 16


def rows_product(rows: int, w) -> bool:
    """Whether a product of `rows` rows with weight `w` runs as an `int8_rows_product`: an 8-bit
    weight as released or held for GPUs, a decode batch, traced for an accelerator
    (`grok.model.platform`)."""
    return isinstance(w, (QuantizedWeight8bit, Int8RowsWeight)) and rows <= DECODE_ROWS and not on_cpu()


def int8_rows_product(
    x: Float[Array, "*e n d_in"], w: QuantizedWeight8bit | Int8RowsWeight
) -> Float[Array, "*e n d_out"]:
    """x @ w in float32 for a few rows, written so that the accelerator's compiler fuses the weight's
    dequantization into the product: the int8 weight and its scales are read where they are (a
    layer's or an expert's slice of a stacked weight included) and no dequantized copy is written.
    - GPU (an `Int8RowsWeight`, transposed): an elementwise product summed over d_in, the weight's
      contiguous axis: one row-reduction kernel (XLA:GPU's GEMMs take an int8 operand's conversion
      but not its scales).
    - TPU: a dot of the bf16 values (f32 rows at full precision), whose operand XLA:TPU
      dequantizes inside the matrix unit's fusion.
    GROK1.md's numbers either way: the weight's bf16 values (`dequantize_to_f32`), x's values exactly,
    f32 accumulation (in the compiler's order). Leading axes `e` of x and w go together."""
    if isinstance(w, Int8RowsWeight):
        return jnp.sum(x.astype(jnp.float32)[..., :, None, :] * dequantize_t_to_f32(w)[..., None, :, :], axis=-1)
    if platform() == "tpu":
        lead = tuple(range(x.ndim - 2))
        dims = (((x.ndim - 1,), (x.ndim - 2,)), (lead, lead))
        if x.dtype == jnp.bfloat16:
            return jax.lax.dot_general(x, dequantize(w, jnp.bfloat16), dims, preferred_element_type=jnp.float32)
        return jax.lax.dot_general(x.astype(jnp.float32), dequantize_to_f32(w), dims,
                                   precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return jnp.sum(x.astype(jnp.float32)[..., :, :, None] * dequantize_to_f32(w)[..., None, :, :], axis=-2)


def _grouped_by_xla(rows: Float[Array, "r d_in"], group_sizes: Int[Array, "e"], w: Float[Array, "e d_in d_out"]):
    """`native.int8_matmul`'s grouped product without the kernel: every row times every weight,
    each row's own kept (rows past the groups zero). For tests and CPUs without a compiler."""
    ends = jnp.cumsum(group_sizes)
    group = jnp.searchsorted(ends, jnp.arange(rows.shape[0]), side="right")
    every = jnp.einsum("rd,edf->ref", rows, w, precision=jax.lax.Precision.HIGHEST)
    own = jnp.take_along_axis(every, jnp.minimum(group, w.shape[0] - 1)[:, None, None], axis=1)[:, 0]
    return jnp.where((group < w.shape[0])[:, None], own, 0.0)


def bf16_table_product(x: Float[Array, "... d"], table: Float[Array, "v d"]) -> Float[Array, "... v"]:
    """The bf16 matmul x @ table.T with a bf16 table (the tied output projection of the int8 CPU
    format), rounded to x's dtype: by the native kernel where `int8_native()`, else by XLA."""
    rows = x.reshape(-1, x.shape[-1])
    if int8_native():
        y = native.bf16_matmul_t(rows.astype(jnp.bfloat16), table)
    else:
        y = jnp.dot(rows.astype(jnp.float32), table.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    return _f32_rounded_as(y, x.dtype).astype(x.dtype).reshape(*x.shape[:-1], table.shape[0])


def bf16_matmul_t(x: Float[Array, "... d_in"], w_t: Float[Array, "d_out d_in"]) -> Float[Array, "... d_out"]:
    """The bf16 matmul `x @ w` for a CPU-format weight (bf16 values in f32, stored transposed):
    computed in f32, rounded to and returned in x's dtype; the bf16 matmul's numbers."""
    return _f32_rounded_as(matmul_t(x, w_t), x.dtype).astype(x.dtype)


def _f32_rounded_as(y: Float[Array, "..."], dtype) -> Float[Array, "..."]:
    """y as float32 holding `dtype` values. A plain `astype` would let XLA fuse the upcast into the
    matmul and skip the bf16 rounding of its output that the released model has."""
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(y.astype(jnp.float32), exponent_bits=info.nexp, mantissa_bits=info.nmant)


def moe_all_experts(
    x: Float[Array, "n d"],
    gates: Float[Array, "n k"],
    experts: Int[Array, "n k"],
    w_in: Float[Array, "e d f"],
    w_gate: Float[Array, "e d f"],
    w_out: Float[Array, "e f d"],
) -> Float[Array, "n d"]:
    """Mixture output as the reference computes it: every expert on every token, weighted by its gate.

    Unselected experts get weight 0; the gate is rounded to bf16 and products accumulate in f32.
    The gate scales each expert's f32 hidden activations before the W_linear_1 matmul, and one
    contraction over experts and F together gives the output (the same sum in f32, associated
    differently from gate * (hidden @ W_linear_1): an occasional last bf16 bit). So with F split
    over devices (tensor parallelism) the only partial sum to all-reduce is the [n, d] output,
    not every expert's [e, n, d] one.
    """
    num_experts = w_in.shape[0]
    weights = jnp.sum(
        jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)
        * gates.astype(jnp.bfloat16).astype(jnp.float32)[..., None],
        axis=-2,
    )  # [n, e]
    hidden = jax.vmap(expert_hidden, in_axes=(None, 0, 0))(x, w_in, w_gate)  # [e, n, f]
    weighted = hidden * weights.T[:, :, None]
    return jnp.einsum("enf,efd->nd", weighted, w_out.astype(jnp.float32)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Fast mixture of experts: only the selected experts run, and only their weights are dequantized.
# ---------------------------------------------------------------------------------------------

# Stacked expert weights [E, in, out] as the model holds them: 8-bit, float, or the CPU format.
ExpertWeights = QuantizedWeight8bit | F32Experts | Float[Array, "e n_in n_out"]


def num_experts(w: ExpertWeights) -> int:
    return len(w.values_t) if isinstance(w, F32Experts) else w.shape[0]


def choose_moe_impl(
    impl: str, num_tokens: int, num_selected: int, num_experts: int, experts_split: bool = False
) -> str:
    """Resolve "auto" by token count: "gather" while the token-expert pairs are no more than the
    experts (decoding a few sequences: one batched matmul per weight, no control flow, at most
    num_experts experts read), else "ragged" (each selected expert read once, however many tokens).

    `experts_split`: the expert axis of the weights is split over devices (expert parallelism).
    GSPMD partitions "gather" there without moving weights (each device gathers from its own
    experts, masked, and the outputs are summed), but "ragged" slices one expert at a time, which
    it can only do by all-gathering every expert's weights to every device; so beyond the gather
    range "auto" falls back to "all_experts", which keeps each device on its own experts.
    """
    if impl not in MOE_IMPLS:
        raise ValueError(f"unknown moe_impl {impl!r}: expected one of {MOE_IMPLS}")
    if impl != "auto":
        return impl
    if num_tokens * num_selected <= num_experts:
        return "gather"
    return "all_experts" if experts_split else "ragged"


def moe(
    x: Float[Array, "n d"],
    gates: Float[Array, "n k"],
    experts: Int[Array, "n k"],
    w_in: ExpertWeights,
    w_gate: ExpertWeights,
    w_out: ExpertWeights,
    impl: str = "auto",
    experts_split: bool | ExpertSplit = False,
) -> Float[Array, "n d"]:
    """The mixture output computed by strategy `impl` (see `choose_moe_impl`); all follow the same
    precision rules, so they agree up to f32 summation order (an occasional last bf16 bit).
    Either fast strategy runs as `moe_grouped` (the ragged product in one native call per weight,
    no row padding, no control flow) on the int8 CPU format, and on the f32 CPU format for a decode
    batch (at most NATIVE_MOE_TOKENS tokens) where its kernel is built. On an accelerator, "auto"
    runs a decode batch over released 8-bit weights as `moe_decode`."""
    n, k = experts.shape
    if impl == "auto" and rows_product(n, w_in):
        return moe_decode(x, gates, experts, w_in, w_gate, w_out, experts_split)
    impl = choose_moe_impl(impl, n, k, num_experts(w_in), experts_split)
    native_f32 = isinstance(w_in, F32Experts) and _native_rows(n, minimum=1, limit=NATIVE_MOE_TOKENS)
    if impl != "all_experts" and (isinstance(w_in, Int8CpuWeight) or native_f32):
        return moe_grouped(x, gates, experts, w_in, w_gate, w_out)
    if impl == "all_experts":
        dense = [_all_expert_matrices(w, x.dtype) for w in (w_in, w_gate, w_out)]
        return moe_all_experts(x, gates, experts, *dense)
    if impl == "gather":
        return moe_gather(x, gates, experts, w_in, w_gate, w_out)
    return moe_ragged(x, gates, experts, w_in, w_gate, w_out)


@dataclasses.dataclass(frozen=True)
class ExpertSplit:
    """Expert weights split over devices (expert parallelism), as a decode step of a token or two
    needs to know to read only the selected experts among each device's own (`moe_decode`): the
    mesh, and the per-layer PartitionSpecs of (w_in, w_gate, w_out), each a `QuantizedWeight8bit`
    of specs in the released layout (`grok.parallel.sharding.Sharder.expert_specs`)."""

    mesh: jax.sharding.Mesh
    specs: tuple


def moe_decode(
    x: Float[Array, "n d"],
    gates: Float[Array, "n k"],
    experts: Int[Array, "n k"],
    w_in: QuantizedWeight8bit | Int8RowsWeight,
    w_gate: QuantizedWeight8bit | Int8RowsWeight,
    w_out: QuantizedWeight8bit | Int8RowsWeight,
    experts_split: bool | ExpertSplit = False,
) -> Float[Array, "n d"]:
    """The mixture for a decode batch on an accelerator, every product an `int8_rows_product`.

    With a token-expert pair per expert at most (one or a few tokens), each pair reads its own
    expert's weights, sliced by its expert index inside the fused reduction: only the selected
    experts are read. With the experts split over devices that slice runs on each device's own
    experts (`ExpertSplit`; a slice over the split axis would gather them). Otherwise every expert
    runs on every token, each expert's weights read once for the whole batch, and each pair keeps
    its own expert's output. The same numbers as `moe_all_experts` (summation order aside).
    """
    n, k = experts.shape
    weights = (w_in, w_gate, w_out)
    few = n * k <= num_experts(w_in)  # at most one token-expert pair per expert
    if few and isinstance(experts_split, ExpertSplit):
        per_pair = _selected_on_each_device(x, experts, weights, experts_split)
    elif few and not experts_split:
        pairs = [_ffn_rows(x[i : i + 1], *(_index(w, experts[i, j]) for w in weights))[0]
                 for i in range(n) for j in range(k)]
        per_pair = jnp.stack(pairs).reshape(n, k, -1)
    elif isinstance(w_in, Int8RowsWeight) and not experts_split:  # GPU: the input products in a loop (XLA:GPU would lay a
        # batched reduction out by transposing the weights), the output product batched over experts
        hidden = [_hidden_rows(x, _index(w_in, e), _index(w_gate, e)) for e in range(num_experts(w_in))]
        per_pair = int8_rows_product(jnp.stack(hidden), w_out)[experts, jnp.arange(n)[:, None]]
    else:  # TPU, or experts split: batched over the experts, each device on its own
        every = jax.vmap(_ffn_rows, in_axes=(None, 0, 0, 0))(x, w_in, w_gate, w_out)  # [E, n, d]
        per_pair = every[experts, jnp.arange(n)[:, None]]
    return _combine(per_pair, gates, experts).astype(x.dtype)


def _selected_on_each_device(
    x: Float[Array, "n d"], experts: Int[Array, "n k"], weights: tuple, split: ExpertSplit
) -> Float[Array, "n k d"]:
    """Each token-expert pair's expert output, every device slicing the pair's expert from its own
    experts (its first index times their count onward; a pair whose expert lives elsewhere slices
    one of them and drops the result), then summed over the devices that split the experts and
    the ffn width. Each device reads at most n * k experts' shards."""
    n, k = experts.shape
    specs = tuple(_held_spec(w, spec) for w, spec in zip(weights, split.specs))
    released = split.specs[0].weight  # [experts, in, out]
    expert_axes, ffn_axes = _axes(released[0]), _axes(released[2])

    def local(x, experts, *weights):
        count = num_experts(weights[0])
        first = jax.lax.axis_index(expert_axes) * count
        pairs = []
        for i in range(n):
            for j in range(k):
                e = experts[i, j] - first
                at = jnp.clip(e, 0, count - 1)
                y = _ffn_rows(x[i : i + 1], *(_index(w, at) for w in weights))[0]
                pairs.append(jnp.where((e >= 0) & (e < count), y, 0.0))
        return jax.lax.psum(jnp.stack(pairs).reshape(n, k, -1), (*expert_axes, *ffn_axes))

    replicated = jax.sharding.PartitionSpec()
    return jax.shard_map(local, mesh=split.mesh, in_specs=(replicated, replicated, *specs), out_specs=replicated,
                         check_vma=False)(x, experts, *weights)


def _held_spec(w: QuantizedWeight8bit | Int8RowsWeight, spec: QuantizedWeight8bit):
    """The specs of a weight as held: the released ones, or the GPU format's (`rows_weight_spec`)."""
    if isinstance(w, Int8RowsWeight):
        return Int8RowsWeight(weight_t=rows_weight_spec(spec.weight, w.weight_t.ndim), scales=spec.scales)
    return spec


def _axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry."""
    return () if entry is None else tuple(entry) if isinstance(entry, tuple) else (entry,)


def _ffn_rows(x: Float[Array, "n d"], w_in, w_gate, w_out) -> Float[Array, "n d"]:
    """`expert_ffn` of one expert's 8-bit weights by `int8_rows_product`s, with its roundings."""
    return int8_rows_product(_hidden_rows(x, w_in, w_gate), w_out)


def _hidden_rows(x: Float[Array, "n d"], w_in, w_gate) -> Float[Array, "n f"]:
    """`expert_hidden` of one expert's 8-bit weights by `int8_rows_product`s, with its roundings."""
    hidden = jax.nn.gelu(_f32_rounded_as(int8_rows_product(x, w_in), x.dtype), approximate=True)
    return hidden * _f32_rounded_as(int8_rows_product(x, w_gate), x.dtype)


def moe_ragged(
    x: Float[Array, "n d"],
    gates: Float[Array, "n k"],
    experts: Int[Array, "n k"],
    w_in: ExpertWeights,
    w_gate: ExpertWeights,
    w_out: ExpertWeights,
) -> Float[Array, "n d"]:
    """Token-expert pairs sorted by expert; each expert with tokens runs once, on its own rows.

    Shapes must be static, so an expert with c rows runs on the smallest of a few fixed row counts
    >= c (`bucket_sizes`), picked by `lax.switch`; an expert with no rows runs nothing, so its
    weights are neither read nor dequantized. The rows past an expert's own are the next experts'
    (or zero padding at the end): it computes and writes them too, but every later expert then
    overwrites its own rows. Stacked weights are indexed by a loop over experts (one compiled
    expert per row count); `F32Experts` are separate arrays, read in place by an unrolled loop.

    (`jax.lax.ragged_dot` is the natural primitive, but on CPU it lowers to a masked dense
    product, every row times every expert, so it would run, and be poisoned by, unselected experts.)
    """
    n, k = experts.shape
    d = x.shape[-1]
    pairs = n * k
    count = num_experts(w_in)
    weights = (w_in, w_gate, w_out)
    order, counts = _grouped_by_expert(experts, count)
    starts = jnp.cumsum(counts) - counts
    sizes = bucket_sizes(min(n, pairs))  # a token picks distinct experts: at most n rows each
    rows = jnp.concatenate([x[order // k], jnp.zeros((sizes[-1], d), x.dtype)])
    out = jnp.zeros((pairs + sizes[-1], d), jnp.float32)
    how = _dequantized_as(x)

    def one_expert(e, out):
        def run(size, out):
            if size == 0:
                return out
            y = _run_expert(jax.lax.dynamic_slice_in_dim(rows, starts[e], size), weights, e, how)
            return jax.lax.dynamic_update_slice_in_dim(out, y, starts[e], axis=0)

        bucket = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), counts[e])
        return jax.lax.switch(bucket, [functools.partial(run, size) for size in sizes], out)

    if isinstance(w_in, F32Experts):
        for e in range(count):
            out = one_expert(e, out)
    else:
        out = jax.lax.fori_loop(0, count, one_expert, out)
    return _combine_grouped(out[:pairs], order, gates, experts).astype(x.dtype)


def moe_gather(
    x: Float[Array, "n d"],
    gates: Float[Array, "n k"],
    experts: Int[Array, "n k"],
    w_in: ExpertWeights,
    w_gate: ExpertWeights,
    w_out: ExpertWeights,
) -> Float[Array, "n d"]:
    """Each token-expert pair gathers its expert's weights (8-bit ones dequantized after the gather,
    so only those) and runs on its own token: n * k experts read, whatever the number of experts.

    Stacked weights: as in `moe_all_experts`, the gate scales the hidden activations and one
    contraction over a token's pairs (in increasing expert order) and F gives its output, so with
    F split over devices the partial sums to all-reduce are [n, d], not [n * k, d].
    `F32Experts` (the CPU format) are separate arrays and are not gathered: a loop over the pairs
    picks each one's expert with `lax.switch`, which reads it in place.
    """
    n, k = experts.shape
    d = x.shape[-1]
    rows = jnp.repeat(x, k, axis=0)[:, None, :]  # [pairs, 1, d]
    how = _dequantized_as(x)
    if isinstance(w_in, F32Experts):
        flat = experts.reshape(n * k)
        weights = (w_in, w_gate, w_out)
        branches = [functools.partial(_run_expert, weights=weights, e=e, how=how) for e in range(num_experts(w_in))]

        def one_pair(p, per_pair):
            return per_pair.at[p].set(jax.lax.switch(flat[p], branches, rows[p]))

        per_pair = jax.lax.fori_loop(0, n * k, one_pair, jnp.zeros((n * k, 1, d), jnp.float32))
        return _combine(per_pair.reshape(n, k, d), gates, experts).astype(x.dtype)
    by_expert = jnp.argsort(experts, axis=-1)
    index = jnp.take_along_axis(experts, by_expert, axis=-1).reshape(n * k)
    scale = _f32_rounded_as(jnp.take_along_axis(gates, by_expert, axis=-1), jnp.bfloat16)  # [n, k]
    hidden = jax.vmap(expert_hidden)(rows, _gathered(w_in, index, how), _gathered(w_gate, index, how))
    weighted = hidden.reshape(n, k, -1) * scale[..., None]  # [n, k, f]
    w_out = _gathered(w_out, index, how).astype(jnp.float32)
    out = jnp.einsum("nkf,nkfd->nd", weighted, w_out.reshape(n, k, *w_out.shape[1:]))
    return out.astype(x.dtype)


def moe_grouped(
    x: Float[Array, "n d"],
    gates: Float[Array, "n k"],
    experts: Int[Array, "n k"],
    w_in: F32Experts | Int8CpuWeight,
    w_gate: F32Experts | Int8CpuWeight,
    w_out: F32Experts | Int8CpuWeight,
) -> Float[Array, "n d"]:
    """Token-expert pairs sorted by expert, each expert's rows times its weights in one grouped
    native call per weight: `int8_matmul` for the int8 CPU format, `grok.native.grouped_matmul_t`
    for the f32 one (only where that kernel is built). Every selected expert's weights are read
    once, unselected ones never; `moe_ragged`'s numbers, without its row padding to fixed sizes."""
    order, sizes = _grouped_by_expert(experts, num_experts(w_in))
    if isinstance(w_in, Int8CpuWeight):
        grouped = lambda rows, w: int8_matmul(rows, w, sizes)
    else:
        grouped = lambda rows, w: native.grouped_matmul_t(rows, sizes, w.values_t)
    out = expert_ffn_t(x[order // experts.shape[1]], w_in, w_gate, w_out, product=grouped)
    return _combine_grouped(out, order, gates, experts).astype(x.dtype)


def bucket_sizes(limit: int) -> tuple[int, ...]:
    """The row counts an expert may run on: 0, 1, 4, 8, then steps of at most 50% (12, 16, 24, 32,
    48, ...), and `limit`. Up to 8 rows a matmul is bound by reading the weight, so padding is
    nearly free (and XLA:CPU multiplies 4 rows faster than 2 or 3); beyond, padding costs compute,
    on average about a fifth."""
    sizes = {0, 1, 4, limit}
    base = 8
    while base < limit:
        sizes.update((base, base + base // 2))
        base *= 2
    return tuple(sorted(s for s in sizes if s <= limit))


def _grouped_by_expert(experts: Int[Array, "n k"], count: int) -> tuple[Int[Array, "p"], Int[Array, "e"]]:
    """The token-expert pair slots (flattened [n * k]) in expert order, and each expert's count."""
    flat = experts.reshape(-1)
    return jnp.argsort(flat, stable=True), jnp.sum(jax.nn.one_hot(flat, count, dtype=jnp.int32), axis=0)


def _combine_grouped(
    out: Float[Array, "p d"], order: Int[Array, "p"], gates: Float[Array, "n k"], experts: Int[Array, "n k"]
) -> Float[Array, "n d"]:
    """`_combine` of per-pair outputs given in expert order (`_grouped_by_expert`)."""
    per_pair = jnp.zeros(out.shape, jnp.float32).at[order].set(out)
    return _combine(per_pair.reshape(*experts.shape, -1), gates, experts)


def _combine(per_pair: Float[Array, "n k d"], gates: Float[Array, "n k"], experts: Int[Array, "n k"]) -> Float[Array, "n d"]:
    """sum_j bf16(gate_j) * y_j in f32, added in increasing expert order like the all-experts sum."""
    by_expert = jnp.argsort(experts, axis=-1)
    weights = _f32_rounded_as(jnp.take_along_axis(gates, by_expert, axis=-1), jnp.bfloat16)
    per_pair = jnp.take_along_axis(per_pair, by_expert[..., None], axis=1)
    total = weights[:, 0, None] * per_pair[:, 0]
    for j in range(1, per_pair.shape[1]):
        total = total + weights[:, j, None] * per_pair[:, j]
    return total


# How 8-bit weights are dequantized for a matmul: to the activations' dtype, or (on CPU, with bf16
# activations) to float32 arrays holding the bf16 values, since XLA:CPU's f32 matmuls are several
# times faster than its bf16 ones and give the same results for bf16 operands.
BF16_IN_F32 = "bf16 values in f32"


def _dequantized_as(x: Array):
    """x's dtype, or BF16_IN_F32 for bf16 activations when tracing for the CPU (`grok.model.platform`; a CPU
    computation traced for an accelerator keeps bf16: correct, only slower)."""
    if x.dtype == jnp.bfloat16 and on_cpu():
        return BF16_IN_F32
    return x.dtype


def _matmul_weight(w: QuantizedWeight8bit | Int8RowsWeight | Array, how) -> Array:
    """A weight (8-bit or float) as `how` says (a dtype or BF16_IN_F32)."""
    quantized = isinstance(w, (QuantizedWeight8bit, Int8RowsWeight))
    if how != BF16_IN_F32:
        return dequantize(w, how) if quantized else w.astype(how)
    if quantized:
        return dequantize_to_f32(w)
    return _f32_rounded_as(w, jnp.bfloat16)


def _run_expert(x: Float[Array, "m d"], weights: tuple, e: int | Int[Array, ""], how) -> Float[Array, "m d"]:
    """`expert_ffn` of expert e (static, or traced for stacked weights), only its weights dequantized."""
    if isinstance(weights[0], F32Experts) and how == BF16_IN_F32:
        return expert_ffn_t(x, *(w.values_t[e] for w in weights))
    return expert_ffn(x, *(_expert_matrix(w, e, how) for w in weights))


def _expert_matrix(w: ExpertWeights, e: int | Int[Array, ""], how) -> Array:
    """Expert e's [in, out] weight; an 8-bit one dequantized (only this expert's)."""
    if isinstance(w, F32Experts):  # bf16 values in f32 already, transposed
        return w.values_t[e].T.astype(_dtype_of(how))
    return _matmul_weight(_index(w, e), how)


def _gathered(w: ExpertWeights, index: Int[Array, "p"], how) -> Array:
    """The weights of experts `index`, stacked [p, in, out]; 8-bit ones dequantized after the gather."""
    return _matmul_weight(_index(w, index), how)


def _index(w, index):
    """`w[index]` along the expert axis of a weight, float or 8-bit (each of its arrays)."""
    return jax.tree.map(lambda a: a[index], w)


def _all_expert_matrices(w: ExpertWeights, dtype) -> Array:
    """All experts' weights as one [E, in, out] array: the reference's whole-tensor dequantization."""
    if isinstance(w, F32Experts):  # bf16 values in f32: the same matmul results as bf16
        return jnp.stack([jnp.swapaxes(v, -1, -2) for v in w.values_t])
    return _matmul_weight(w, dtype)


def _dtype_of(how) -> jnp.dtype:
    return jnp.float32 if how == BF16_IN_F32 else how
