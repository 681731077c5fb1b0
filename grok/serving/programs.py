"""The engine's device programs: a prompt chunk prefilled into one cache row, and one decode step
over every row, each choosing the next tokens on the device.

They are pure functions of their arguments (the model's `apply`, parameters, cache, tokens and
per-row sampling settings), jitted once per model (`step_functions`) and shared by its engines;
`grok.planning` compiles the same programs ahead of time.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from grok.serving.sampling import choose

MAX_TOP_LOGPROBS = 8  # alternatives reported per token, at most (the reference reports 8)


def _choose(logits, positions, settings, active=True):
    """Choose each row's token (`grok.serving.sampling.choose`: rows not `active` cost an argmax); also its
    log-probability and the top alternatives (pre-temperature). Row r samples with a key made of
    its seed and `positions[r]`, so its choice does not depend on the batch."""
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(settings["seed"], positions)
    return choose(logits, keys, settings["temperature"], settings["top_p"], settings["top_k"], active, MAX_TOP_LOGPROBS)


def row_settings(rows: int) -> dict[str, np.ndarray]:
    """Per-row sampling settings as the step functions take them, set to greedy decoding."""
    return {
        "seed": np.zeros(rows, np.uint32),
        "temperature": np.zeros(rows, np.float32),
        "top_p": np.ones(rows, np.float32),
        "top_k": np.zeros(rows, np.int32),
    }


@functools.cache  # engines of one model share their compiled programs
def step_functions(apply: Callable, replicated: NamedSharding) -> tuple[Callable, Callable]:
    """The engine's two jitted programs, the cache donated and sampled outputs replicated:
    `prefill(params, memory, slot, tokens [1, T], length, reset, settings of the row)` and
    `decode(params, memory, tokens [B, T], lengths [B], settings)` (also compiled by `grok.planning.plan`)."""
    jit = functools.partial(jax.jit, out_shardings=(replicated, None), donate_argnums=1)
    return jit(functools.partial(_prefill_slot, apply)), jit(functools.partial(_decode_all, apply))


def _prefill_slot(apply, params, memory, slot, tokens, length, reset, settings):
    """Run a prompt chunk for one cache row (emptied first when `reset`) and sample after it."""

    # The batch axis of every cache array: after the layer axis (stacked caches), else first;
    # mask [b, s] and step [b] have it first.
    def batch_axis(x):
        return max(x.ndim - 4, 0)

    def row(x):
        return jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=batch_axis(x))

    def put(x, new_row):
        return jax.lax.dynamic_update_slice_in_dim(x, new_row, slot, axis=batch_axis(x))

    mine = jax.tree.map(row, memory)
    mine = mine._replace(mask=jnp.where(reset, False, mine.mask), step=jnp.where(reset, 0, mine.step))
    out = apply(params, tokens, mine, length[None], length[None] - 1)  # the logits of the last token only
    new = out.memory
    memory = jax.tree.map(put, memory, new)
    return _choose(out.logits[0], new.step, settings), memory


def _decode_all(apply, params, memory, tokens, lengths, settings):
    """Every decoding row feeds its first `lengths[b]` tokens (rows of length 0 do not advance):
    its latest token, then any tokens proposed to follow it. Returns, for each fed position, the
    token chosen after it (with its log-probability and top alternatives) and, per row, how many
    proposals were accepted: the leading ones that equal the greedy choice before them (sampled
    rows are given none). The row's step advances past the latest token and its accepted
    proposals; positions past that are left to be overwritten."""
    b, t = tokens.shape
    out = apply(params, tokens, memory, lengths)
    positions = memory.step[:, None] + 1 + jnp.arange(t)[None, :]  # as if each were fed alone
    per_position = {k: jnp.repeat(v, t) for k, v in settings.items()}
    fed = (jnp.arange(t)[None, :] < lengths[:, None]).reshape(-1)
    chosen = _choose(out.logits.reshape(b * t, -1), positions.reshape(-1), per_position, fed)
    chosen = tuple(x.reshape(b, t, *x.shape[1:]) for x in chosen)
    matches = (tokens[:, 1:] == chosen[0][:, :-1]) & (jnp.arange(1, t)[None, :] < lengths[:, None])
    accepted = jnp.where(settings["temperature"] == 0, jnp.cumprod(matches, axis=1).sum(axis=1), 0)
    step = memory.step + jnp.where(lengths > 0, 1 + accepted, 0)
    return (*chosen, accepted), out.memory._replace(step=step)
