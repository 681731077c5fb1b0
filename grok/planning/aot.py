"""Abstract inputs for compiling the model ahead of time: shapes, dtypes and shardings of the
parameters and of a decode step's token and cache, with no array allocated. Used to check a real
configuration (memory per device, compile time, communication) on a development machine."""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from grok.model import transformer
from grok.model.config import GrokConfig
from grok.model.weights import model_shapes
from grok.parallel.sharding import Sharder
from grok.serving.programs import row_settings, step_functions

WEIGHT_FORMS = ("int8", "bf16")  # matrices 8-bit (Grok-1 as released, Grok-2 quantized), or all bf16


def abstract_params(config: GrokConfig, sharder: Sharder, weights: str = "int8") -> dict:
    """The parameters as ShapeDtypeStructs with the shardings `sharder` gives them, as the model holds
    them on the platform traced for (`grok.model.transformer.held_params`); `weights` one of WEIGHT_FORMS."""
    shapes = model_shapes(config) if weights == "int8" else model_shapes(config.replace(release_dtype="bfloat16"), {})
    return transformer.held_params(jax.tree.map(
        lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
        shapes,
        sharder.param_shardings(shapes),
    ))


def decode_inputs(
    config: GrokConfig, sharder: Sharder, batch: int, cache_len: int, cache_dtype=transformer.DTYPE, weights: str = "int8"
) -> tuple[dict, jax.ShapeDtypeStruct, transformer.KVMemory]:
    """(params, token [batch, 1], memory) of a decode step as ShapeDtypeStructs carrying the
    shardings `sharder` gives them, the parameters as held for the platform traced for
    (`grok.model.transformer.held_params`); the cache is bf16, as on an accelerator, unless told."""
    params = abstract_params(config, sharder, weights)
    cache = transformer.cache_shape(config, batch, cache_len, sharder.cache_heads(config))
    kv = sharder.cache_sharding(cache)
    rows = sharder.activation("tokens", (batch, 1))
    memory = transformer.KVMemory(
        k=jax.ShapeDtypeStruct(cache, cache_dtype, sharding=kv),
        v=jax.ShapeDtypeStruct(cache, cache_dtype, sharding=kv),
        mask=jax.ShapeDtypeStruct((batch, cache_len), jnp.bool_, sharding=sharder.activation("tokens", (batch, cache_len))),
        step=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(sharder.mesh, PartitionSpec(*rows.spec[:1]))),
    )
    return params, jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=rows), memory


def compile_decode(
    config: GrokConfig, sharder: Sharder, batch: int, cache_len: int
) -> tuple[jax.stages.Compiled, transformer.KVMemory, float, float]:
    """Lower and compile one decode step (`apply(params, token, memory)`, memory donated as the
    engine does) for `decode_inputs`; returns (compiled, its abstract memory, lower s, compile s)."""
    params, token, memory = decode_inputs(config, sharder, batch, cache_len)
    apply = transformer.build(config, constrain=sharder.constrain).apply

    def step(params, token, memory):
        out = apply(params, token, memory)
        return out.logits, out.memory

    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=2).lower(params, token, memory)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, memory, lowered_at - start, time.perf_counter() - lowered_at


class Step(NamedTuple):
    """One of the engine's programs lowered (for inspection or compiling) and how long it took,
    with the jitted function and abstract arguments it was lowered from (for `jax.export`)."""

    lowered: jax.stages.Lowered
    lower_s: float
    fn: jax.stages.Wrapped
    args: tuple


def engine_steps(
    config: GrokConfig, sharder: Sharder, batch: int, cache_len: int, prefill_len: int, cache_dtype=transformer.DTYPE,
    weights: str = "int8",
) -> dict[str, Step]:
    """The engine's decode step (`batch` rows) and prefill chunk (one row of `prefill_len` tokens)
    over a `batch` x `cache_len` cache, lowered for `decode_inputs`' abstract arguments: exactly
    what `grok.serving.engine.Engine` runs (`grok.serving.programs.step_functions`)."""
    params, token, memory = decode_inputs(config, sharder, batch, cache_len, cache_dtype, weights)
    apply = transformer.build(config, constrain=sharder.constrain).apply
    prefill, decode = step_functions(apply, sharder.replicated())
    replicated = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharder.replicated())
    row = jax.tree.map(replicated, row_settings(1))
    rows = jax.tree.map(replicated, row_settings(batch))
    arguments = {
        "decode": (decode, (params, memory, token, replicated(np.zeros(batch, np.int32)), rows)),
        "prefill": (
            prefill,
            (params, memory, replicated(np.int32(0)), replicated(np.zeros((1, prefill_len), np.int32)),
             replicated(np.int32(prefill_len)), replicated(np.bool_(True)), row),
        ),
    }
    steps = {}
    for name, (fn, args) in arguments.items():
        start = time.perf_counter()
        lowered = fn.lower(*args)
        steps[name] = Step(lowered, time.perf_counter() - start, fn, args)
    return steps
