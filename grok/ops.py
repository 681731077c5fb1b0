"""Pure numerical building blocks of Grok-1 (GROK1.md "Forward pass"), free of Haiku state.

Haiku modules in `grok.model` own the parameters and call these; tests call them directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

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


def apply_rope(x: Float[Array, "b t h d"], positions: Int[Array, "b t"]) -> Float[Array, "b t h d"]:
    """Rotary embedding (rotate-half, base 10000) at absolute positions, computed in float32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (ROPE_BASE ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    phase = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]  # [b, t, 1, d]
    x32 = x.astype(jnp.float32)
    return (x32 * jnp.cos(phase) + rotate_half(x32) * jnp.sin(phase)).astype(x.dtype)


def attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s kv d"],
    v: Float[Array, "b s kv d"],
    mask: Bool[Array, "b t s"],
    multiplier: float,
) -> Float[Array, "b t h d"]:
    """Grouped-query attention with Grok's soft-capped logits; query head h reads kv head h // G."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32)
    logits = logits * multiplier
    logits = ATTN_SOFTCAP * jnp.tanh(logits / ATTN_SOFTCAP)
    logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def attention_mask(
    key_valid: Bool[Array, "b s"], query_positions: Int[Array, "b t"]
) -> Bool[Array, "b t s"]:
    """Causal mask (key position <= query position) AND the key is a real (non-pad) token."""
    key_positions = jnp.arange(key_valid.shape[1])
    causal = key_positions[None, None, :] <= query_positions[:, :, None]
    return causal & key_valid[:, None, :]


def route(
    x: Float[Array, "... d"], router_w: Float[Array, "d e"], num_selected: int
) -> tuple[Float[Array, "... k"], Int[Array, "... k"]]:
    """Router: softmax over all experts in f32; the top-k raw probabilities are the gates (not renormalized)."""
    probs = jax.nn.softmax(x.astype(jnp.float32) @ router_w.astype(jnp.float32), axis=-1)
    return jax.lax.top_k(probs, num_selected)


def expert_ffn(
    x: Float[Array, "n d"],
    w_in: Float[Array, "d f"],
    w_gate: Float[Array, "d f"],
    w_out: Float[Array, "f d"],
) -> Float[Array, "n d"]:
    """One expert: gelu(x @ W_linear) * (x @ W_linear_v) in f32, then an f32 matmul with W_linear_1."""
    hidden = jax.nn.gelu(_f32_rounded_as(x @ w_in, x.dtype), approximate=True)
    gated = hidden * _f32_rounded_as(x @ w_gate, x.dtype)
    return gated @ w_out.astype(jnp.float32)


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
    """
    num_experts = w_in.shape[0]
    weights = jnp.sum(
        jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)
        * gates.astype(jnp.bfloat16).astype(jnp.float32)[..., None],
        axis=-2,
    )  # [n, e]
    outputs = jax.vmap(expert_ffn, in_axes=(None, 0, 0, 0))(x, w_in, w_gate, w_out)  # [e, n, d]
    return jnp.einsum("ne,end->nd", weights, outputs).astype(x.dtype)
