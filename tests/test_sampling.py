"""`grok.serving.sampling.choose` against the full-sort sampler it replaces: same tokens for the same keys."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok.serving import sampling
from grok.serving.sampling import CANDIDATES, choose, sample

MAX_TOP = 8


@functools.partial(jax.jit, static_argnames="max_top")
def reference(logits, keys, temperature, top_p, top_k, active, max_top):
    """The former engine `_choose`, written out: sort every row, mask by top-k and top-p, draw with
    `jax.random.categorical` over the whole ranked vocabulary; inactive rows greedy."""

    def row(logits, key, temperature, top_p, top_k):
        order = jnp.argsort(-logits)
        ranked = logits[order] / jnp.maximum(temperature, 1e-6)
        probs = jax.nn.softmax(ranked)
        before = jnp.cumsum(probs) - probs
        rank = jnp.arange(logits.shape[0])
        allowed = (before < top_p) & ((top_k <= 0) | (rank < top_k))
        allowed = allowed.at[0].set(True)
        choice = jax.random.categorical(key, jnp.where(allowed, ranked, -jnp.inf))
        return jnp.where(temperature > 0, order[choice], order[0])

    x = logits.astype(jnp.float32)
    temperature = jnp.where(active.astype(bool), temperature, 0.0)
    tokens = jax.vmap(row)(x, keys, temperature, top_p, top_k)
    logprobs = jax.nn.log_softmax(x, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, max_top)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen, top_ids, top_logprobs


def peaked(rng, v):
    """LLM-like logits: a few dozen favoured tokens (the first about 45% likely at temperature 1),
    far above a noisy floor."""
    x = rng.normal(size=v) * 1.5
    favoured = rng.permutation(v)[:50]
    x[favoured] += 30 - 0.6 * np.arange(50)
    return x


# Rows: (name, logits kind, temperature, top_p, top_k, active).
ROWS = [
    ("greedy", "peaked", 0.0, 1.0, 0, 1),
    ("top_p", "peaked", 1.0, 0.95, 0, 1),
    ("top_k", "peaked", 1.5, 1.0, 40, 1),
    ("top_k_top_p", "peaked", 1.3, 0.9, 20, 1),
    ("temperature_only", "peaked", 1.2, 1.0, 0, 1),
    ("hot", "peaked", 4.0, 1.0, 0, 1),  # the noise bound fails: redone with a full sort
    ("top_k_past_candidates", "normal", 1.0, 1.0, CANDIDATES + 200, 1),
    ("flat_top_p", "flat", 1.0, 0.99, 0, 1),  # the nucleus spans most of the vocabulary
    ("normal_top_p", "normal", 1.0, 0.9, 0, 1),
    ("wide_top_k_inside", "normal", 2.0, 1.0, CANDIDATES, 1),
    ("inactive_sampling", "normal", 1.0, 0.9, 0, 0),
    ("greedy_normal", "normal", 0.0, 0.5, 3, 1),
]


def batch(v, seed, rows=ROWS):
    rng = np.random.default_rng(seed)
    kinds = {
        "peaked": lambda: peaked(rng, v),
        "normal": lambda: rng.normal(size=v) * 3,
        "flat": lambda: rng.normal(size=v) * 0.01,
    }
    logits = np.stack([kinds[kind]() for _, kind, *_ in rows]).astype(np.float32)
    settings = [jnp.asarray(np.array(column), dtype) for column, dtype in zip(
        list(zip(*rows))[2:], (jnp.float32, jnp.float32, jnp.int32, jnp.int32))]
    return jnp.asarray(logits), settings


def keys_for(seed, rows):
    """Keys as the engine makes them: a per-row seed folded with the position."""
    seeds = jnp.arange(rows, dtype=jnp.uint32) + 1000 * seed
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 17))(seeds)


def assert_same(got, want):
    tokens, chosen, top_ids, top_logprobs = (np.asarray(a) for a in got)
    ref_tokens, ref_chosen, ref_top_ids, ref_top_logprobs = (np.asarray(a) for a in want)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(top_ids, ref_top_ids)
    np.testing.assert_allclose(chosen, ref_chosen, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(top_logprobs, ref_top_logprobs, rtol=1e-6, atol=1e-5)
    assert tokens.dtype == np.int32 and chosen.dtype == top_logprobs.dtype == np.float32


def redone_rows(logits, keys, *settings):
    """Which rows `choose` sends to the full sort: the redo marks them with token -1."""
    original = sampling._full_sort_rows
    # A new function, so that the trace is not the one `choose` has cached.
    marked = jax.jit(lambda *args, **kwargs: sampling.choose.__wrapped__(*args, **kwargs), static_argnames="max_top")
    try:
        sampling._full_sort_rows = lambda redo, tokens, *rest: jnp.where(redo, -1, tokens)
        tokens = marked(logits, keys, *settings, max_top=MAX_TOP)[0]
    finally:
        sampling._full_sort_rows = original
    return np.asarray(tokens) == -1


@pytest.mark.parametrize("v", [1000, 131072])
def test_choose_matches_the_full_sort_sampler(v):
    rows = len(ROWS)
    names = [name for name, *_ in ROWS]
    seeds = range(6 if v == 1000 else 3)
    tokens = []
    for seed in seeds:
        logits, settings = batch(v, seed)
        keys = keys_for(seed, rows)
        got = choose(logits, keys, *settings, max_top=MAX_TOP)
        assert_same(got, reference(logits, keys, *settings, max_top=MAX_TOP))
        tokens.append(np.asarray(got[0]))
        # The logprobs against float64 NumPy.
        x = np.asarray(logits, np.float64)
        logprobs = x - x.max(-1, keepdims=True)
        logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
        np.testing.assert_allclose(got[1], logprobs[np.arange(rows), got[0]], atol=1e-4)

    tokens = np.stack(tokens)  # [seeds, rows]
    greedy = np.stack([np.argmax(np.asarray(batch(v, seed)[0]), -1) for seed in seeds])
    # Not a trivial pass: every sampled row leaves the argmax for some key; greedy ones never do.
    sampled = [name for name, _, temperature, _, _, active in ROWS if temperature > 0 and active]
    for name in sampled:
        column = names.index(name)
        assert (tokens[:, column] != greedy[:, column]).any(), name
    for name in ("greedy", "greedy_normal", "inactive_sampling"):
        column = names.index(name)
        np.testing.assert_array_equal(tokens[:, column], greedy[:, column])


def test_the_full_sort_runs_only_for_rows_reaching_past_the_candidates():
    v = 131072
    names = [name for name, *_ in ROWS]
    logits, settings = batch(v, 0)
    redone = redone_rows(logits, keys_for(0, len(ROWS)), *settings)
    expected = {"hot", "top_k_past_candidates", "flat_top_p", "normal_top_p"}
    assert {name for name, r in zip(names, redone) if r} == expected
    # All rows inside the candidates: nothing is redone, and the answer is still the reference's.
    inside = [row for row in ROWS if row[0] not in expected]
    logits, settings = batch(v, 1, inside)
    keys = keys_for(1, len(inside))
    assert not redone_rows(logits, keys, *settings).any()
    assert_same(choose(logits, keys, *settings, max_top=MAX_TOP), reference(logits, keys, *settings, max_top=MAX_TOP))


def test_many_draws_of_one_row_match():
    """One nucleus row over many keys: every draw the same as the reference's, and spread out."""
    v, draws = 4096, 64
    x = np.random.default_rng(5).normal(size=v).astype(np.float32) * 2
    x[:40] += 12  # a nucleus of about 40 tokens, inside the candidates
    logits = jnp.asarray(np.tile(x, (draws, 1)))
    keys = jax.random.split(jax.random.key(3), draws)
    settings = (jnp.full(draws, 0.9), jnp.full(draws, 0.9), jnp.zeros(draws, jnp.int32), jnp.ones(draws, jnp.int32))
    assert not redone_rows(logits, keys, *settings).any()
    got = choose(logits, keys, *settings, max_top=MAX_TOP)
    assert_same(got, reference(logits, keys, *settings, max_top=MAX_TOP))
    assert len(set(np.asarray(got[0]).tolist())) > 5


def test_ties_are_ordered_by_token_id():
    """bfloat16 logits repeat values: ranks, the top alternatives and the draws follow token ids."""
    v = 5000
    rng = np.random.default_rng(2)
    x = np.round(rng.normal(size=(6, v)) * 4) / 2  # a few dozen distinct values per row
    logits = jnp.asarray(x, jnp.bfloat16)
    settings = (
        jnp.asarray([0.0, 1.0, 1.0, 0.5, 2.0, 1.0]),
        jnp.asarray([1.0, 0.3, 1.0, 0.9, 0.95, 1.0]),
        jnp.asarray([0, 0, 7, 0, 100, 0]),
        jnp.ones(6, jnp.int32),
    )
    for seed in range(3):
        keys = keys_for(seed, 6)
        want = reference(logits, keys, *settings, max_top=MAX_TOP)
        assert_same(choose(logits, keys, *settings, max_top=MAX_TOP), want)
        values = np.asarray(logits, np.float32)[np.arange(6)[:, None], np.asarray(want[2])]
        assert (values[:, :-1] == values[:, 1:]).any()  # the top alternatives do include ties


def test_all_greedy_and_all_inactive():
    logits, _ = batch(1000, 4)
    rows = logits.shape[0]
    keys = keys_for(4, rows)
    greedy = (jnp.zeros(rows), jnp.ones(rows), jnp.zeros(rows, jnp.int32), jnp.ones(rows, jnp.int32))
    want = reference(logits, keys, *greedy, max_top=MAX_TOP)
    assert_same(choose(logits, keys, *greedy, max_top=MAX_TOP), want)
    np.testing.assert_array_equal(want[0], np.argmax(np.asarray(logits), -1))
    hot_but_inactive = (jnp.full(rows, 5.0), jnp.full(rows, 0.99), jnp.zeros(rows, jnp.int32), jnp.zeros(rows, bool))
    assert_same(choose(logits, keys, *hot_but_inactive, max_top=MAX_TOP), want)


def test_sample_is_choose():
    logits, (temperature, top_p, top_k, _) = batch(1000, 3)
    keys = keys_for(3, logits.shape[0])
    active = jnp.ones(logits.shape[0], jnp.int32)
    np.testing.assert_array_equal(
        sample(logits, keys, temperature, top_p, top_k),
        reference(logits, keys, temperature, top_p, top_k, active, max_top=1)[0],
    )
    tokens, chosen, top_ids, top_logprobs = choose(logits, keys, temperature, top_p, top_k, active, max_top=0)
    assert top_ids.shape == top_logprobs.shape == (logits.shape[0], 0)


@pytest.mark.parametrize("raw", [False, True], ids=["typed_key", "raw_key"])
def test_candidate_noise_is_categoricals_noise(raw):
    """The noise drawn for the first n ranks is what `jax.random.categorical` adds there."""
    key = jax.random.PRNGKey(7) if raw else jax.random.key(7)
    v, n = 131072, CANDIDATES
    full = jax.random.gumbel(key, (v,), jnp.float32)
    np.testing.assert_array_equal(sampling._rank_noise(key, n, v), full[:n])
    # categorical(key, logits) == argmax(logits + that noise), so a logit vector that is -inf past
    # rank n draws the argmax over the first n ranks.
    logits = jnp.where(jnp.arange(v) < n, jnp.linspace(0, 1, v), -jnp.inf)
    assert int(jax.random.categorical(key, logits)) == int(jnp.argmax(logits[:n] + full[:n]))


def test_candidate_noise_with_the_other_threefry_setting():
    key = jax.random.key(7)
    full_now = jax.random.gumbel(key, (4096,), jnp.float32)
    setting = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", not setting)
    try:
        assert sampling._prefix_stable(key) == (not setting)
        full = jax.random.gumbel(key, (4096,), jnp.float32)
        np.testing.assert_array_equal(sampling._rank_noise(key, 256, 4096), full[:256])
        assert not np.array_equal(full, full_now)  # a different draw: the other's prefix would be wrong
    finally:
        jax.config.update("jax_threefry_partitionable", setting)


def test_the_gumbel_bound_holds():
    """The largest float32 Gumbel value of each mode, from its largest uniform draw, is below the bound."""
    low = -jnp.log(-jnp.log(jnp.float32(1 - 2.0**-23)))
    high = -jnp.log(-jnp.log1p(-jnp.float32(np.finfo(np.float32).tiny)))
    assert 15 < float(low) <= sampling._GUMBEL_MAX["low"]
    assert 87 < float(high) <= sampling._GUMBEL_MAX["high"]
    draws = jax.random.gumbel(jax.random.key(0), (1 << 20,), jnp.float32)
    assert float(draws.max()) <= sampling._GUMBEL_MAX["low"]
