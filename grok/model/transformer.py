"""Grok-1 as Haiku modules. Modules own parameters (tree as in GROK1.md); the math is in `grok.model.ops`.

The decoder layers run as one `hk.layer_stack` scan, so their parameters are stacked along a
leading layer axis under `transformer/decoder_layer/...`; `grok.model.weights` maps that tree to and from
the per-layer tree `transformer/decoder_layer_{i}/...` of the released checkpoint. With
`build(..., scan_layers=False)` the layers are unrolled instead and take that per-layer tree as is.

Two switches trade speed, memory and compile time (see `build`): `moe_impl` picks how the mixture
of experts runs (`grok.model.ops.moe`), and the weights may be 8-bit as released or, for CPUs, converted
once by `f32_params`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from grok.model import ops
from grok.model.config import GrokConfig
from grok.model.platform import on_cpu, platform
from grok.model.quant import (
    BF16Table,
    F32Experts,
    F32Table,
    F32Weight,
    Int8CpuWeight,
    Int8RowsWeight,
    QuantizedWeight8bit,
    dequantize,
    rows_weight_spec,
    to_bf16_table,
    to_f32_table,
    to_f32_weight,
    to_int8_cpu_weight,
    to_rows_weight,
)

DTYPE = jnp.bfloat16  # activations ("fprop dtype") of the released model

# Places a named activation on devices (`grok.parallel.sharding.Sharder.constrain`), or leaves it.
Constrain = Callable[[jax.Array, str], jax.Array]


def no_constraint(x: jax.Array, name: str) -> jax.Array:
    """Stand-in for `Sharder.constrain` when the model runs unsharded."""
    return x


@runtime_checkable
class Layout(Protocol):
    """What the model asks of the object whose `constrain` it is given: a
    `grok.parallel.sharding.Sharder`, declared here so that the model does not import the sharding."""

    mesh: jax.sharding.Mesh

    def cache_heads(self, config: GrokConfig) -> int: ...

    def splits_experts(self) -> bool: ...

    def expert_specs(self, config: GrokConfig) -> tuple: ...


# Every layer's keys (or values): stacked [layers, b, kv, s, d] for the scanned layers, or a tuple
# of per-layer [b, kv, s, d] arrays for unrolled ones, each then written and read in place.
Cache = Float[Array, "layers b kv s d"] | tuple[Float[Array, "b kv s d"], ...]


class KVMemory(NamedTuple):
    """Key/value cache for all layers: `step[b]` tokens of sequence b are written so far.

    `mask[b, s]` is False where position s holds a pad token (never attended to as a key).
    """

    k: Cache
    v: Cache
    mask: Bool[Array, "b s"]
    step: Int[Array, "b"]


def cache_shape(
    config: GrokConfig, batch_size: int, length: int, kv_heads: int | None = None
) -> tuple[int, int, int, int, int]:
    """[layers, b, kv heads, positions, head size]: each head's keys (or values) are contiguous,
    laid out as the attention products read them, so no step transposes the cache.

    `kv_heads` defaults to the config's; a sharded cache may hold each head repeated
    (`grok.parallel.sharding.Sharder.cache_heads`), and attention follows the cache it is given."""
    return (config.num_layers, batch_size, kv_heads or config.num_kv_heads, length, config.key_size)


# A cache may also hold its bf16 values as raw 16-bit words: the same bits, read and written through
# free bitcasts. `grok.planning.plan` compiles with such a cache, because XLA:CPU cannot scatter bf16 and
# would convert the whole cache to f32 and back around each write (two whole-cache temporaries an
# accelerator never makes); a scatter of uint16 words is done in place.
WORDS = jnp.uint16


def cache_dtype() -> jnp.dtype:
    """bf16 (the released model's), except on the CPU (`grok.model.platform`): float32 holding the same bf16 values,
    so attention reads the cache as it is instead of converting all of it every step (XLA:CPU has
    no fast bf16 matmul). Twice the cache memory; the same numbers (`grok.model.ops.attention`)."""
    return jnp.float32 if on_cpu() else DTYPE


def empty_cache(
    config: GrokConfig,
    batch_size: int,
    length: int,
    stacked: bool = True,
    zeros: Callable[..., Array] = jnp.zeros,
    kv_heads: int | None = None,
) -> Cache:
    """Zeros for every layer's keys (or values) in `cache_dtype()`: one stacked array for scanned
    layers, else one array per layer (`Cache`). `zeros(shape, dtype)` makes each array (e.g.
    `Sharder.zeros_cache`, straight onto its devices); `kv_heads` as in `cache_shape`."""
    shape = cache_shape(config, batch_size, length, kv_heads)
    if stacked:
        return zeros(shape, cache_dtype())
    return tuple(zeros(shape[1:], cache_dtype()) for _ in range(config.num_layers))


def init_memory(
    config: GrokConfig, batch_size: int, length: int, stacked: bool = True, kv_heads: int | None = None
) -> KVMemory:
    """An empty cache of `length` positions for `batch_size` sequences (see `empty_cache`)."""
    return KVMemory(
        k=empty_cache(config, batch_size, length, stacked, kv_heads=kv_heads),
        v=empty_cache(config, batch_size, length, stacked, kv_heads=kv_heads),
        mask=jnp.zeros((batch_size, length), bool),
        step=jnp.zeros((batch_size,), jnp.int32),
    )


def as_matrix(w: Array | QuantizedWeight8bit | F32Weight, dtype) -> Array:
    """A float or 8-bit weight as a `dtype` array (8-bit: `dtype(int8) * dtype(scales)`).

    An `F32Weight` stays float32 (its values are bf16 already): matmuls with it run in f32.
    """
    if isinstance(w, F32Weight):
        return jnp.swapaxes(w.value_t, -1, -2)
    if isinstance(w, (QuantizedWeight8bit, Int8RowsWeight)):
        return dequantize(w, dtype)
    return w.astype(dtype)


def matmul(x: Float[Array, "... d_in"], w: Array | QuantizedWeight8bit | F32Weight) -> Float[Array, "... d_out"]:
    """`x @ w` as a matmul in x's dtype (bf16), its result rounded to that dtype.

    With an `F32Weight` the product runs in f32 on bf16 values and is rounded to bf16: the same
    numbers (XLA:CPU computes its bf16 matmuls that way), but much faster on CPU.
    """
    if isinstance(w, F32Weight):
        return ops.bf16_matmul_t(x, w.value_t)
    if isinstance(w, Int8CpuWeight):
        return ops.int8_matmul(x, w).astype(x.dtype)
    if ops.rows_product(math.prod(x.shape[:-1]), w):
        rows = ops.int8_rows_product(x.reshape(-1, x.shape[-1]), w)
        return rows.astype(x.dtype).reshape(*x.shape[:-1], w.shape[-1])
    return x @ as_matrix(w, x.dtype)


def _weight(name: str, shape: tuple[int, ...]) -> Array | QuantizedWeight8bit:
    """Parameter `w` of a sub-module called `name` (float at init; float or 8-bit when applied)."""
    with hk.name_scope(name):
        return hk.get_parameter("w", shape, jnp.float32, init=hk.initializers.VarianceScaling())


class Linear(hk.Module):
    """Bias-free linear layer whose weight may be float or `QuantizedWeight8bit`."""

    def __init__(self, output_size: int, name: str):
        super().__init__(name=name)
        self.output_size = output_size

    def __call__(self, x: Float[Array, "... d_in"]) -> Float[Array, "... d_out"]:
        w = hk.get_parameter(
            "w", (x.shape[-1], self.output_size), jnp.float32, init=hk.initializers.VarianceScaling()
        )
        return matmul(x, w)


class RMSNorm(hk.Module):
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        scale = hk.get_parameter("scale", (x.shape[-1],), jnp.float32, init=jnp.ones)
        return ops.rms_norm(x, scale)


class MultiHeadAttention(hk.Module):
    """Grouped-query self-attention over a KV cache, with rotary positions."""

    def __init__(self, config: GrokConfig, constrain: Constrain):
        super().__init__(name="multi_head_attention")
        self.config = config
        self.constrain = constrain

    def __call__(
        self,
        x: Float[Array, "b t d"],
        positions: Int[Array, "b t"],
        mask: Bool[Array, "b t s"],
        memory: KVMemory,
        layer: int | Int[Array, ""],
    ) -> tuple[Float[Array, "b t d"], KVMemory]:
        """Attend from x's tokens over layer `layer` of the cache, after writing their keys and
        values there (each row at its own offset `memory.step[b]`); returns the updated cache.

        A cache of r times num_kv_heads heads holds each kv head r times over (`cache_shape`):
        the new keys and values are repeated to match, each copy serving G/r query heads."""
        c = self.config
        b, t, _ = x.shape
        cache_heads = memory.k[0].shape[-3] if isinstance(memory.k, tuple) else memory.k.shape[-3]
        if cache_heads % c.num_kv_heads or c.heads_per_kv_head % (cache_heads // c.num_kv_heads):
            raise ValueError(
                f"a cache of {cache_heads} kv heads cannot serve {c.num_q_heads} query heads in "
                f"{c.num_kv_heads} groups: it must hold each kv head r times, r dividing {c.heads_per_kv_head}"
            )

        def project(name: str, heads: int, repeat: int = 1) -> Array:
            out = Linear(heads * c.key_size, name=name)(x).reshape(b, t, heads, c.key_size)
            return self.constrain(jnp.repeat(out, repeat, axis=2), "heads")

        repeat = cache_heads // c.num_kv_heads
        q = ops.apply_rope(project("query", c.num_q_heads), positions, c.rope_base)
        k = ops.apply_rope(project("key", c.num_kv_heads, repeat), positions, c.rope_base)
        v = project("value", c.num_kv_heads, repeat)
        memory = memory._replace(
            k=_write_layer(memory.k, k, layer, memory.step), v=_write_layer(memory.v, v, layer, memory.step)
        )
        k_layer, v_layer = (self.constrain(_values(cache[layer]), "kv_cache") for cache in (memory.k, memory.v))
        temperature = ops.length_temperature(positions, c.attn_temperature_len) if c.attn_temperature_len else None
        attended = ops.attention(q, k_layer, v_layer, mask, c.attn_output_multiplier,
                                 native_kernels=not sharded(self.constrain), temperature=temperature)
        out = self.constrain(attended, "heads")
        out = Linear(c.emb_size, name="linear")(out.reshape(b, t, c.num_q_heads * c.key_size))
        return out, memory


def _write_at(x: Array, update: Array, step: Int[Array, "b"]) -> Array:
    """Write `update` [b, t, ...] into `x` [b, s, ...] at row b's offset step[b]; positions past
    the end are dropped (a dynamic_update_slice would shift the whole update back instead)."""
    b, t = update.shape[:2]
    return x.at[jnp.arange(b)[:, None], step[:, None] + jnp.arange(t)[None, :]].set(update, mode="drop")


def _write_layer(cache: Cache, update: Float[Array, "b t kv d"], layer: int | Int[Array, ""], step: Int[Array, "b"]) -> Cache:
    """Write one layer's new keys (or values) into the cache in place: row b at offset step[b].
    Positions past the cache's end are dropped."""
    b, t = update.shape[:2]
    rows, positions = jnp.arange(b)[:, None], step[:, None] + jnp.arange(t)[None, :]
    if isinstance(cache, tuple):
        written = _scatter(cache[layer], (rows, slice(None), positions), update)
        return cache[:layer] + (written,) + cache[layer + 1 :]
    return _scatter(cache, (layer, rows, slice(None), positions), update)


def _scatter(x: Array, index: tuple, update: Array) -> Array:
    """`x.at[index].set(update)` in the cache's storage dtype, out-of-range positions dropped."""
    if x.dtype == WORDS:
        update = jax.lax.bitcast_convert_type(update.astype(DTYPE), WORDS)
    return x.at[index].set(update.astype(x.dtype), mode="drop")


def _values(x: Array) -> Array:
    """A cache layer's values: bf16 words (`WORDS`) read as bf16, any other dtype as it is."""
    return jax.lax.bitcast_convert_type(x, DTYPE) if x.dtype == WORDS else x


class MoELayer(hk.Module):
    """Router plus experts; every expert is a gated-GELU block with stacked [E, ...] weights.

    `impl` is the `grok.model.ops.moe` strategy; the weights reach it as stored (8-bit, float or
    `F32Experts`), so a fast strategy dequantizes only the experts it runs. `experts_split` says
    the expert axis is split over devices (it steers "auto", see `grok.model.ops.choose_moe_impl`).
    """

    def __init__(self, config: GrokConfig, impl: str = "auto", experts_split: bool | ops.ExpertSplit = False):
        super().__init__(name="moe")
        self.config = config
        self.impl = impl
        self.experts_split = experts_split

    def __call__(
        self, x: Float[Array, "n d"], gates: Float[Array, "n k"], experts: Int[Array, "n k"]
    ) -> Float[Array, "n d"]:
        c = self.config
        e, d, f = c.num_experts, c.emb_size, c.ffn_size
        w_in = _weight("linear", (e, d, f))
        w_gate = _weight("linear_v", (e, d, f))
        w_out = _weight("linear_1", (e, f, d))
        return ops.moe(x, gates, experts, w_in, w_gate, w_out, self.impl, self.experts_split)


class Router(hk.Module):
    """Chooses each token's experts; its [D, E] weight stays float32."""

    def __init__(self, config: GrokConfig):
        super().__init__(name="router")
        self.config = config

    def __call__(self, x: Float[Array, "n d"]) -> tuple[Float[Array, "n k"], Int[Array, "n k"]]:
        c = self.config
        w = hk.get_parameter("w", (c.emb_size, c.num_experts), jnp.float32, init=hk.initializers.VarianceScaling())
        return ops.route(x, w, c.num_selected_experts, c.router_softcap)


class DenseMLP(hk.Module):
    """Grok-2's dense gated-GELU MLP beside the MoE (`residual_ffn_size`): bf16 matmuls, the GELU and
    gating in float32 on their bf16 inputs, the gated activations rounded to bf16 for the last matmul."""

    def __init__(self, config: GrokConfig):
        super().__init__(name="dense_mlp")
        self.config = config

    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
        f = self.config.residual_ffn_size
        hidden = jax.nn.gelu(Linear(f, name="linear")(x).astype(jnp.float32), approximate=True)
        gated = hidden * Linear(f, name="linear_v")(x).astype(jnp.float32)
        return Linear(self.config.emb_size, name="linear_1")(gated.astype(x.dtype))


class DecoderLayer(hk.Module):
    """h + norm(attention(norm(h))), then h + norm(moe(norm(h))); with a dense MLP (Grok-2), the
    second is h + norm((mlp(x) + moe(x)) / sqrt(2)) for x = norm(h)."""

    def __init__(self, config: GrokConfig, constrain: Constrain, moe_impl: str = "auto", name: str = "decoder_layer"):
        super().__init__(name=name)
        self.config = config
        self.constrain = constrain
        self.moe_impl = moe_impl
        self.experts_split = expert_split(config, constrain) or experts_split(constrain)

    def __call__(self, h, positions, mask, memory: KVMemory, layer):
        c = self.config
        attn, memory = MultiHeadAttention(c, self.constrain)(RMSNorm(name="rms_norm")(h), positions, mask, memory, layer)
        h = self.constrain(h + RMSNorm(name="rms_norm_1")(attn), "residual")
        x = RMSNorm(name="rms_norm_2")(h).reshape(-1, c.emb_size)
        moe = MoELayer(c, self.moe_impl, self.experts_split)(x, *Router(c)(x))
        if c.residual_ffn_size:
            both = DenseMLP(c)(x).astype(jnp.float32) + moe.astype(jnp.float32)
            moe = (both * np.float32(1 / math.sqrt(2))).astype(moe.dtype)
        h = self.constrain(h + RMSNorm(name="rms_norm_3")(moe.reshape(h.shape)), "residual")
        return h, memory


class InOutEmbed(hk.Module):
    """The embedding: token ids -> vectors on the way in, vectors -> logits on the way out, through
    the same table (Grok-1) or, untied (Grok-2), a second one, `unembeddings`."""

    def __init__(self, config: GrokConfig):
        super().__init__(name="in_out_embed")
        self.config = config

    def _embeddings(self, name: str = "embeddings") -> Float[Array, "v d"]:
        shape = (self.config.vocab_size, self.config.emb_size)
        return hk.get_parameter(name, shape, jnp.float32, init=hk.initializers.TruncatedNormal(1.0))

    def embed(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
        x = _table(self._embeddings())[tokens].astype(DTYPE)
        return x * self.config.embedding_multiplier_scale  # a weakly typed constant: stays bf16

    def decode(self, h: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        table = self._embeddings("embeddings" if self.config.tie_embeddings else "unembeddings")
        if isinstance(table, F32Table):  # bf16 values already: an f32 matmul, rounded to bf16
            logits = ops.bf16_matmul_t(h, table.value)
        elif isinstance(table, BF16Table):
            logits = ops.bf16_table_product(h, table.value)
        else:
            logits = h @ table.T.astype(h.dtype)
        logits = logits * self.config.output_multiplier_scale
        if self.config.output_softcap:
            logits = ops.softcap(logits, self.config.output_softcap).astype(logits.dtype)
        return logits


def _table(embeddings: Array | F32Table | BF16Table) -> Array:
    return embeddings.value if isinstance(embeddings, (F32Table, BF16Table)) else embeddings


class Output(NamedTuple):
    logits: Float[Array, "b t v"]
    memory: KVMemory
    hidden: Float[Array, "layers b t d"] | None  # residual stream after each layer, if asked for


def forward(
    config: GrokConfig,
    tokens: Int[Array, "b t"],
    memory: KVMemory | None = None,
    lengths: Int[Array, "b"] | None = None,
    return_hidden: bool = False,
    constrain: Constrain = no_constraint,
    moe_impl: str = "auto",
    scan_layers: bool = True,
    logits_at: Int[Array, "b"] | None = None,
) -> Output:
    """Run a chunk of tokens through the model (inside `hk.transform`).

    Each row's chunk starts at position `memory.step[b]` and is right-padded: `lengths[b]` real
    tokens (default: all T), by which the row's step then advances. Without `memory` this is one
    full forward pass from position 0. `constrain(x, name)` pins named activations to a sharding
    (`grok.parallel.sharding.Sharder.constrain`); by default nothing is constrained. `logits_at[b]`: only
    the logits of that index of row b's chunk (logits [b, 1, V]: a prompt's last token, sparing
    the output projection of every other position); by default those of every position.
    """
    b, t = tokens.shape
    if memory is None:
        memory = init_memory(config, b, t, stacked=scan_layers, kv_heads=cache_heads(config, constrain))
    if lengths is None:
        lengths = jnp.full((b,), t, jnp.int32)
    positions = memory.step[:, None] + jnp.arange(t)[None, :]
    key_mask = _write_at(memory.mask, tokens > config.pad_token, memory.step)
    mask = ops.attention_mask(key_mask, positions)

    with hk.name_scope("language_model"):
        in_out_embed = InOutEmbed(config)
        final_norm = RMSNorm(name="rms_norm")
    tokens = constrain(tokens, "tokens")
    h = constrain(in_out_embed.embed(tokens), "residual")

    def layer(carry, index, name="decoder_layer"):
        h, memory = carry
        h, memory = DecoderLayer(config, constrain, moe_impl, name)(h, positions, mask, memory, index)
        return (h, memory), (h if return_hidden else None)

    # The cache travels through the layers whole; each layer writes its rows in place.
    carry = (h, memory)
    if scan_layers:
        stack = hk.layer_stack(config.num_layers, with_per_layer_inputs=True, name="transformer")
        carry, hidden = stack(layer)(carry, jnp.arange(config.num_layers))
    else:  # per-layer parameters `transformer/decoder_layer_{i}/...`, each read in place
        outputs = []
        with hk.name_scope("transformer"):
            for i in range(config.num_layers):
                carry, out = layer(carry, i, name=f"decoder_layer_{i}")
                outputs.append(out)
        hidden = jnp.stack(outputs) if return_hidden else None
    h, memory = carry
    new_memory = memory._replace(mask=key_mask, step=memory.step + lengths)
    h = constrain(h, "residual")  # else the D-split unembedding pulls the layers' carry onto `model`
    if logits_at is not None:
        h = jnp.take_along_axis(h, logits_at[:, None, None], axis=1)
    logits = constrain(in_out_embed.decode(final_norm(h)), "logits")
    return Output(logits=logits, memory=new_memory, hidden=hidden)


def build(
    config: GrokConfig,
    return_hidden: bool = False,
    constrain: Constrain = no_constraint,
    moe_impl: str = "auto",
    scan_layers: bool = True,
) -> hk.Transformed:
    """`init(rng, tokens)` and `apply(params, tokens, memory=None, lengths=None, logits_at=None)`
    for `config` (see `forward`).

    - `moe_impl`: "all_experts" (the reference: every expert on every token, whole weights
      dequantized per call), "ragged" (tokens sorted by expert, each selected expert once on its
      rows), "gather" (each token-expert pair gathers its expert's weights), or "auto": "gather"
      for at most num_experts token-expert pairs, else "ragged"; but "all_experts" instead of
      "ragged" when `constrain` is a `Sharder` whose rules split the expert axis (expert
      parallelism), where "ragged" would all-gather every expert's weights to every device
      (`experts_split`, `grok.model.ops.choose_moe_impl`).
    - `scan_layers`: one `hk.layer_stack` scan (stacked parameters; compile time independent of
      depth) or, if False, unrolled layers over the per-layer (checkpoint) tree. Unrolled, every
      weight is its own buffer: on CPU, XLA copies a scan's slice of the stacked weights before
      each matmul can use it, which costs more than the matmul. Use with `cpu_int8_params` or
      `f32_params` on CPU.
    """
    ops.choose_moe_impl(moe_impl, 1, 1, 1)  # an unknown name fails here, not inside a trace

    def fn(tokens, memory=None, lengths=None, logits_at=None):
        return forward(config, tokens, memory, lengths, return_hidden, constrain, moe_impl, scan_layers, logits_at)

    return hk.without_apply_rng(hk.transform(fn))


_EXPERT_WEIGHT = re.compile(r"(^|/)moe/(linear|linear_v|linear_1)$")
_EMBEDDINGS = "language_model/in_out_embed"


def held_params(params: dict) -> dict:
    """The parameters as the model holds them on an accelerator (`grok.model.platform`): the embedding
    table in bf16, the dtype both its uses convert it to, so no step writes a bf16 copy; on a GPU
    every 8-bit weight transposed (`Int8RowsWeight`), so that a decode step's products read it along
    its rows. The same numbers. Elsewhere as given. For arrays on devices or on the host, and for
    ShapeDtypeStructs (with shardings to match)."""
    if on_cpu():
        return params
    def held(table):
        if isinstance(table, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(table.shape, DTYPE, sharding=table.sharding)
        return table.astype(DTYPE)

    params = {**params, _EMBEDDINGS: {name: held(table) for name, table in params[_EMBEDDINGS].items()}}
    if platform() != "gpu":
        return params
    return jax.tree.map(lambda w: _rows_weight(w) if isinstance(w, QuantizedWeight8bit) else w, params,
                        is_leaf=lambda w: isinstance(w, QuantizedWeight8bit))


def _rows_weight(w: QuantizedWeight8bit) -> Int8RowsWeight:
    if not isinstance(w.weight, jax.ShapeDtypeStruct):
        return to_rows_weight(w)
    *lead, n_in, n_out = w.weight.shape
    sharding = w.weight.sharding
    if sharding is not None:
        sharding = jax.sharding.NamedSharding(sharding.mesh, rows_weight_spec(sharding.spec, len(w.weight.shape)))
    return Int8RowsWeight(weight_t=jax.ShapeDtypeStruct((*lead, n_out, n_in), w.weight.dtype, sharding=sharding),
                          scales=w.scales)


def f32_params(params: dict) -> dict:
    """The CPU weight format: every 8-bit weight dequantized once to float32 holding its bf16 values,
    stored transposed (`F32Weight`; expert weights as `F32Experts`, one array per expert), and the
    embedding table rounded to bf16 once (`F32Table`). The model's numbers do not change.

    Memory: 4 bytes per 8-bit weight instead of 1 (plus no scales); the embedding table stays f32.
    Speed on XLA:CPU: no int8 conversion per step (at most about 1 G elements/s on 2 cores, the
    bound of an int8 decode step), and f32 matmuls that read weights at memory speed. Works on stacked or
    per-layer trees (use the per-layer one with `build(..., scan_layers=False)`).
    """
    return {path: {name: f32_leaf(path, name, leaf) for name, leaf in leaves.items()} for path, leaves in params.items()}


def f32_leaf(path: str, name: str, leaf):
    """One parameter of `f32_params` (for loaders that convert as they read; a converted one is
    returned as it is)."""
    if isinstance(leaf, (F32Weight, F32Experts, F32Table)):
        return leaf
    if _EXPERT_WEIGHT.search(path):
        return to_f32_weight(leaf, experts_axis=len(leaf.shape) - 3)
    if isinstance(leaf, QuantizedWeight8bit):
        return to_f32_weight(leaf)
    if path == _EMBEDDINGS:
        return to_f32_table(leaf)
    return jnp.array(leaf)  # a copy: never an alias that keeps a loader's host array alive


def cpu_int8_params(params: dict) -> dict:
    """The int8 CPU format: every 8-bit weight kept as loaded (the same int8 and bf16 arrays,
    marked `Int8CpuWeight` for the native kernels) and the embedding table rounded to bf16 once
    (`BF16Table`, which replaces the f32 table). The model's numbers do not change.

    Memory: the checkpoint's bytes, less half the embedding table. For a model on one CPU device,
    with unrolled layers (the per-layer tree, `build(..., scan_layers=False)`), so each layer's
    weights are read in place."""
    converted = {path: {name: cpu_int8_leaf(path, name, leaf) for name, leaf in leaves.items()} for path, leaves in params.items()}
    return jax.device_put(converted)


def cpu_int8_leaf(path: str, name: str, leaf):
    """One parameter of `cpu_int8_params`, left where it is: host arrays stay on the host, for a
    loader that converts as it reads and places each leaf itself (`grok.checkpoint.loader.load_layers`). A
    converted one is returned as it is."""
    if isinstance(leaf, (Int8CpuWeight, BF16Table)):
        return leaf
    if isinstance(leaf, QuantizedWeight8bit):
        return to_int8_cpu_weight(leaf)
    if path == _EMBEDDINGS:
        return to_bf16_table(leaf)
    return leaf


def _layout(constrain: Constrain) -> Layout | None:
    """The `Layout` (a `grok.parallel.sharding.Sharder`) whose `constrain` this is, if any."""
    owner = getattr(constrain, "__self__", None)
    return owner if isinstance(owner, Layout) else None


def sharded(constrain: Constrain) -> bool:
    """Whether `constrain` is a `grok.parallel.sharding.Sharder.constrain` over more than one device."""
    layout = _layout(constrain)
    return layout is not None and layout.mesh.size > 1


def cache_heads(config: GrokConfig, constrain: Constrain) -> int:
    """The kv heads of a cache laid out for `constrain` (`grok.parallel.sharding.Sharder.cache_heads`)."""
    layout = _layout(constrain)
    return config.num_kv_heads if layout is None else layout.cache_heads(config)


def expert_split(config: GrokConfig, constrain: Constrain) -> ops.ExpertSplit | None:
    """Where the expert weights of a layout that splits them over devices live (for
    `grok.model.ops.moe_decode`), or None."""
    layout = _layout(constrain)
    if layout is None or not layout.splits_experts():
        return None
    return ops.ExpertSplit(layout.mesh, layout.expert_specs(config))


def experts_split(constrain: Constrain) -> bool:
    """Whether `constrain` is a `grok.parallel.sharding.Sharder.constrain` whose rules split the expert axis
    of the expert weights over more than one device (expert parallelism)."""
    layout = _layout(constrain)
    return layout is not None and layout.splits_experts()
