"""Choosing the next token from logits: temperature, top-k and top-p (nucleus), per batch row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def sample(
    logits: Float[Array, "b v"],
    keys: Array,
    temperature: Float[Array, "b"],
    top_p: Float[Array, "b"],
    top_k: Int[Array, "b"],
) -> Int[Array, "b"]:
    """One token per row, each row with its own PRNG key and settings.

    temperature 0 means greedy; top_k 0 means no top-k limit; top_p 1 means no nucleus limit.
    The most likely token is always allowed, so a row can never end up with nothing to sample.
    """
    return jax.vmap(_sample_row)(logits.astype(jnp.float32), keys, temperature, top_p, top_k)


def _sample_row(logits, key, temperature, top_p, top_k):
    order = jnp.argsort(-logits)
    ranked = logits[order] / jnp.maximum(temperature, 1e-6)
    probs = jax.nn.softmax(ranked)
    before = jnp.cumsum(probs) - probs  # probability mass ranked above each token
    rank = jnp.arange(logits.shape[0])
    allowed = (before < top_p) & ((top_k <= 0) | (rank < top_k))
    allowed = allowed.at[0].set(True)
    choice = jax.random.categorical(key, jnp.where(allowed, ranked, -jnp.inf))
    return jnp.where(temperature > 0, order[choice], order[0])
