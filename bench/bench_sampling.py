"""Token choice per decode step: the former full-sort `_choose` against `grok.serving.sampling.choose`,
both jitted, measured in the same run (ms per call, best of --reps, and old / new).

The former way sorts every row's logits (greedy and inactive rows too), then takes a log_softmax
and a top-8 for the reported logprobs. `choose` takes a top-k of its candidates (a top-8 when
every row is greedy) and sorts only the rows whose draw can reach past the candidates.

Logits: "peaked" (LLM-like: a few dozen favoured tokens over a noisy floor, all sampled rows stay
inside the candidates) and "flat" (near-uniform: every sampled row's nucleus spans most of the
vocabulary, so each one is redone with a full sort: `choose`'s worst case).

    PYTHONPATH=. .venv/bin/python bench/bench_sampling.py
    PYTHONPATH=. .venv/bin/python bench/bench_sampling.py --vocab 131072 --batch 32 --reps 5
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from grok.serving.sampling import CANDIDATES, choose

MAX_TOP = 8  # grok.serving.programs.MAX_TOP_LOGPROBS


def _old_row(logits, key, temperature, top_p, top_k):
    order = jnp.argsort(-logits)
    ranked = logits[order] / jnp.maximum(temperature, 1e-6)
    probs = jax.nn.softmax(ranked)
    before = jnp.cumsum(probs) - probs
    rank = jnp.arange(logits.shape[0])
    allowed = (before < top_p) & ((top_k <= 0) | (rank < top_k))
    allowed = allowed.at[0].set(True)
    choice = jax.random.categorical(key, jnp.where(allowed, ranked, -jnp.inf))
    return jnp.where(temperature > 0, order[choice], order[0])


def _keys(settings, positions):
    return jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(settings["seed"], positions)


@jax.jit
def old_choose(logits, positions, active, settings):
    """The engine's `_choose` before `choose` (it samples inactive rows too)."""
    del active
    x = logits.astype(jnp.float32)
    keys = _keys(settings, positions)
    tokens = jax.vmap(_old_row)(x, keys, settings["temperature"], settings["top_p"], settings["top_k"])
    logprobs = jax.nn.log_softmax(x, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, MAX_TOP)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen, top_ids, top_logprobs


@jax.jit
def new_choose(logits, positions, active, settings):
    keys = _keys(settings, positions)
    return choose(
        logits, keys, settings["temperature"], settings["top_p"], settings["top_k"], active, max_top=MAX_TOP
    )


def logits_of(kind: str, batch: int, vocab: int, rng) -> np.ndarray:
    x = rng.normal(size=(batch, vocab)).astype(np.float32)
    if kind == "flat":
        return x * 0.01
    x *= 1.5
    for row in x:
        row[rng.permutation(vocab)[:50]] += 30 - 0.6 * np.arange(50)
    return x


def settings_of(mix: str, batch: int) -> tuple[dict, np.ndarray]:
    """Per-row settings and `active`: all greedy, all top-p 0.95 at temperature 0.7, or mixed
    (a quarter each: greedy, top-p 0.95 / T 0.7, top-k 40 / T 1, inactive)."""
    settings = {
        "seed": np.arange(batch, dtype=np.uint32),
        "temperature": np.zeros(batch, np.float32),
        "top_p": np.ones(batch, np.float32),
        "top_k": np.zeros(batch, np.int32),
    }
    active = np.ones(batch, np.int32)
    kind = np.zeros(batch, int) if mix == "greedy" else np.ones(batch, int) if mix == "top_p" else np.arange(batch) % 4
    settings["temperature"][kind == 1], settings["top_p"][kind == 1] = 0.7, 0.95
    settings["temperature"][kind == 2], settings["top_k"][kind == 2] = 1.0, 40
    settings["temperature"][kind == 3], settings["top_p"][kind == 3] = 0.7, 0.95
    active[kind == 3] = 0
    return settings, active


def best_ms(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 131072])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--logits", nargs="+", default=["peaked", "flat"], choices=["peaked", "flat"])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{jax.devices()[0].device_kind} x{len(jax.devices())}; batch {args.batch}; {CANDIDATES} candidates")
    print(f"{'vocab':>7} {'logits':>7} {'rows':>7} {'old ms':>9} {'choose ms':>10} {'old/new':>8}  same tokens")
    for vocab in args.vocab:
        for kind in args.logits:
            logits = jnp.asarray(logits_of(kind, args.batch, vocab, rng))
            positions = jnp.full(args.batch, 7, jnp.int32)
            for mix in ("greedy", "top_p", "mixed"):
                settings, active = settings_of(mix, args.batch)
                call = (logits, positions, jnp.asarray(active), {k: jnp.asarray(v) for k, v in settings.items()})
                old, new = best_ms(old_choose, call, args.reps), best_ms(new_choose, call, args.reps)
                same = np.asarray(old_choose(*call)[0] == new_choose(*call)[0])[active == 1].all()
                print(f"{vocab:>7} {kind:>7} {mix:>7} {old:>9.1f} {new:>10.2f} {old / new:>7.1f}x  {same}")


if __name__ == "__main__":
    main()
