"""Choosing the next token from logits: temperature, top-k and top-p (nucleus), per batch row, with
the log-probabilities the engine reports (`choose`); the work follows what each row asks for."""

from __future__ import annotations

import dataclasses
import functools

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
    """One token per row, each row with its own PRNG key and settings (`choose`'s tokens).

    temperature 0 means greedy; top_k 0 means no top-k limit; top_p 1 means no nucleus limit.
    The most likely token is always allowed, so a row can never end up with nothing to sample.
    """
    return choose(logits, keys, temperature, top_p, top_k, True, max_top=0)[0]


# How many of each row's highest logits the sampled rows draw from before a full sort is needed:
# `jax.lax.top_k` of this many is a partial selection, not a sort of the vocabulary.
CANDIDATES = 256

# Float32 rounding of the cumulated top-p mass differs with summation order (the full-sort path
# sums the sorted vocabulary, the candidate path the unsorted one); a row whose candidates hold
# less than top_p + this much mass is treated as possibly reaching past them.
MASS_SLACK = 1e-4

# The largest value `jax.random.gumbel` can return in float32, by mode: "low" draws u in
# [tiny, 1 - 2**-23], so -log(-log(u)) <= 15.94; "high" draws x >= tiny, so -log(-log1p(-x)) <=
# -log(tiny) = 87.34. (jax.random.categorical, with its default mode=None, uses one of these two.)
_GUMBEL_MAX = {"low": 16.0, "high": 88.0}


@functools.partial(jax.jit, static_argnames="max_top")
def choose(
    logits: Float[Array, "b v"],
    keys: Array,
    temperature: Float[Array, "b"],
    top_p: Float[Array, "b"],
    top_k: Int[Array, "b"],
    active: Array,
    max_top: int,
) -> tuple[Int[Array, "b"], Float[Array, "b"], Int[Array, "b k"], Float[Array, "b k"]]:
    """Each row's next token, its log-probability, and the `max_top` most likely tokens with theirs.

    Per row: its own PRNG key, temperature (0: greedy), top_p (1: no nucleus limit) and top_k (0: no
    limit); the most likely token is always allowed. Rows with `active` 0 are treated as greedy.
    Log-probabilities are of the raw logits (before temperature), a log-softmax in float32; the top
    alternatives are ordered by probability, ties by token id.

    Sampled tokens are those of a full-sort sampler: rank the vocabulary (ties by token id), scale
    by 1 / temperature, keep the ranks whose probability mass ranked above them is under top_p and
    whose rank is under top_k, and draw with `jax.random.categorical(key, ranked)` -- which adds
    `jax.random.gumbel(key, (v,))` to the ranked logits and takes the argmax. Here only the top
    CANDIDATES ranks are formed (`lax.top_k`), with the same Gumbel noise at those ranks (generated
    for those ranks only where the PRNG allows, see `_rank_noise`). A token past the candidates can
    only win if it is allowed (top_k and top_p reach past them) and the lowest candidate plus the
    largest possible Gumbel value is not below the winning score; only then does that row redo the
    full sort (inside `lax.cond`, so steps where no row needs it never sort). Greedy and inactive
    rows take the argmax, and when every row is greedy only `lax.top_k(max_top)` runs.

    The same key gives the same token as the full-sort sampler, bit for bit, but for one float32
    corner: the candidate path sums the softmax denominator over the unsorted vocabulary, the
    full sort over the sorted one, so a token whose preceding mass is within rounding (~1e-6) of
    top_p can be kept by one and cut by the other.
    """
    x = logits.astype(jnp.float32)
    b, v = x.shape
    active = jnp.broadcast_to(jnp.asarray(active).astype(bool), (b,))
    temperature = jnp.where(active, temperature, 0).astype(jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    top_k = jnp.asarray(top_k, jnp.int32)
    sampled = temperature > 0
    shown = min(max(max_top, 1), v)  # top-k width every path computes (the greedy token is its first)
    width = min(max(CANDIDATES, shown), v)

    def greedy_rows():
        values, ids = _top(x, shown)
        return ids[:, 0], values, ids

    def sampled_rows():
        values, ids = _top(x, width)
        scale = jnp.maximum(temperature, 1e-6)[:, None]
        ranked = values / scale
        # The softmax denominator over the whole vocabulary: one fused reduction, nothing sorted.
        total = jnp.sum(jnp.exp(x / scale - ranked[:, :1]), axis=-1)
        noise = jax.vmap(_rank_noise, in_axes=(0, None, None))(keys, width, v)
        choice, spill = jax.vmap(_pick)(ranked, noise, total, top_p, top_k)
        tokens = jnp.where(sampled, jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0], ids[:, 0])
        if width < v:
            redo = sampled & spill
            tokens = jax.lax.cond(
                jnp.any(redo), _full_sort_rows, lambda *args: args[1], redo, tokens, x, keys, temperature, top_p, top_k
            )
        return tokens, values[:, :shown], ids[:, :shown]

    tokens, values, ids = jax.lax.cond(jnp.any(sampled), sampled_rows, greedy_rows)
    # log_softmax as jax.nn.log_softmax computes it, but only at the entries returned.
    peak = values[:, :1]  # the row maximum
    log_total = jnp.log(jnp.sum(jnp.exp(x - peak), axis=-1, keepdims=True))
    chosen = (jnp.take_along_axis(x, tokens[:, None], axis=-1) - peak) - log_total
    top_logprobs = (values[:, :max_top] - peak) - log_total
    return tokens.astype(jnp.int32), chosen[:, 0], ids[:, :max_top], top_logprobs


def _top(x, k: int):
    """`lax.top_k` along the last axis, behind an optimization barrier: XLA:CPU turns a top-k into
    its partial-selection kernel only when each output is used whole; slicing them (ids[:, 0],
    values[:, :max_top]) otherwise leaves a full sort of the vocabulary in its place."""
    values, ids = jax.lax.top_k(x, k)
    # One barrier per output: a barrier over the pair can be folded onto the top-k itself (as SPMD
    # partitioning does), which XLA's top-k decomposer then fails on.
    return jax.lax.optimization_barrier(values), jax.lax.optimization_barrier(ids)


def _pick(ranked, noise, total, top_p, top_k):
    """One row's draw among its first n ranks (n the vocabulary size, or the candidates).

    ranked: [n] the highest logits / temperature in descending order; noise: [n] the Gumbel noise
    of those ranks; total: the softmax denominator, sum(exp(logit / temperature - ranked[0])) over
    the vocabulary. Returns the chosen rank, and whether a token ranked past n could have won.
    """
    n = ranked.shape[0]
    probs = jnp.exp(ranked - ranked[0]) / total
    mass = jnp.cumsum(probs)
    before = mass - probs  # probability mass ranked above each token
    rank = jnp.arange(n)
    allowed = (before < top_p) & ((top_k <= 0) | (rank < top_k))
    allowed = allowed.at[0].set(True)
    scores = noise + jnp.where(allowed, ranked, -jnp.inf)
    choice = jnp.argmax(scores)
    # A token past rank n has ranked value <= ranked[-1] and noise <= the Gumbel maximum.
    reaches_past = ((top_k <= 0) | (top_k > n)) & (mass[-1] < top_p + MASS_SLACK)
    could_win = ranked[-1] + _gumbel_max() >= scores[choice]
    return choice, reaches_past & could_win


def _full_sort_rows(redo, tokens, x, keys, temperature, top_p, top_k):
    """Draw again with a full sort of the vocabulary, for the rows in `redo` only (one at a time)."""

    def row(args):
        redo, token, x, key, temperature, top_p, top_k = args

        def full_sort():
            order = jnp.argsort(-x)  # stable: ties by token id, as lax.top_k orders them
            ranked = x[order] / jnp.maximum(temperature, 1e-6)
            total = jnp.sum(jnp.exp(ranked - ranked[0]))
            choice, _ = _pick(ranked, jax.random.gumbel(key, x.shape, jnp.float32), total, top_p, top_k)
            return order[choice].astype(tokens.dtype)

        return jax.lax.cond(redo, full_sort, lambda: token)

    return jax.lax.map(row, (redo, tokens, x, keys, temperature, top_p, top_k))


def _rank_noise(key, n: int, v: int):
    """The first n entries of `jax.random.gumbel(key, (v,), float32)`: the noise that
    `jax.random.categorical(key, logits [v])` adds to the first n logits.

    With the threefry2x32 PRNG in its partitionable form (jax_threefry_partitionable, the default),
    entry i's random bits come from counter i alone, so the first n entries of a length-v draw are a
    length-n draw; otherwise the v entries are generated and cut.
    """
    if n < v and _prefix_stable(key):
        return jax.random.gumbel(key, (n,), jnp.float32)
    return jax.random.gumbel(key, (v,), jnp.float32)[:n]


def _prefix_stable(key) -> bool:
    if not jax.config.jax_threefry_partitionable:
        return False
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(key)
    else:
        impl = jax.config.jax_default_prng_impl
    return str(impl) == "threefry2x32"


def _gumbel_max() -> float:
    """The largest Gumbel value in the mode `jax.random.gumbel(mode=None)` uses."""
    return _GUMBEL_MAX["high" if jax.config.jax_high_dynamic_range_gumbel else "low"]
