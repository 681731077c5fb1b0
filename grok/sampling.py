"""Choosing the next token from logits: temperature, top-k and top-p (nucleus), per batch row."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens: temperature 0 is greedy; top_k 0 and top_p 1 disable those limits."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


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
