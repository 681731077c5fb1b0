"""Device check, for a session lent a GPU (or TPU): one command, `python bench/device_check.py`.

On the first device present it builds a Grok-shaped model (Grok-1's widths and experts, `--layers`
layers so that it fits one device, random 8-bit weights made on the device), then runs the engine's
own programs (`grok.serving.programs`): decode steps at batch 1 and 8 over a `--cache-len` cache, and
one `--prefill`-token prefill chunk. It prints tokens/s, the fraction of the HBM roofline that
reaches (the step's ideal bytes over its time, against the device's published bandwidth), the
projection `plan --target` makes from the same compiled step's HLO (`grok.planning.traffic`), and
the compiler's memory plan beside the measured peak. Nothing in the tests depends on it; on a CPU it
runs too (`--config demo --cache-len 256`), as a smoke check of the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from grok import PRESETS
from grok.model import transformer
from grok.model.platform import tracing_for
from grok.model.quant import QuantizedWeight8bit
from grok.model.weights import is_weight, model_shapes
from grok.parallel.sharding import single_device
from grok.planning.roofline import DecodeRoofline, ideal_decode_bytes
from grok.planning.targets import TARGETS
from grok.planning.traffic import count_traffic
from grok.serving.programs import row_settings, step_functions

KINDS = {"H100": "h100", "H200": "h200", "A100": "a100-80g", "B200": "b200", "TPU v4": "tpu-v4",
         "TPU v5 lite": "tpu-v5e", "TPU v5": "tpu-v5p", "TPU v6 lite": "tpu-v6e"}


def random_params(config, sharder, seed: int = 0):
    """Random weights with the release's dtypes, made on the device (no host copy of a 10 GB model)."""
    shapes = model_shapes(config)
    shardings = sharder.param_shardings(shapes)
    keys = iter(jax.random.split(jax.random.key(seed), 4 * len(jax.tree.leaves(shapes))))

    def make(leaf, sharding):
        if isinstance(leaf, QuantizedWeight8bit):
            weight = jax.jit(lambda k: jax.random.randint(k, leaf.weight.shape, -127, 128, jnp.int8),
                             out_shardings=sharding.weight)(next(keys))
            scales = jax.jit(lambda k: (jax.random.uniform(k, leaf.scales.shape) * 2e-3).astype(leaf.scales.dtype),
                             out_shardings=sharding.scales)(next(keys))
            return QuantizedWeight8bit(weight=weight, scales=scales)
        return jax.jit(lambda k: (jax.random.normal(k, leaf.shape) * 0.02).astype(leaf.dtype),
                       out_shardings=sharding)(next(keys))

    return transformer.held_params(jax.tree.map(make, shapes, shardings, is_leaf=is_weight))


def timed(fn, repeats: int) -> float:
    """The fastest of `repeats` runs of `fn()` (which blocks until its result is ready), in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="grok-1", help="whose widths (default grok-1; demo for a CPU smoke check)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (8 of Grok-1: about 40 GB of int8)")
    parser.add_argument("--cache-len", type=int, default=8192)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="timed decode steps per batch size (the fastest counts)")
    args = parser.parse_args()

    device = jax.devices()[0]
    target = TARGETS.get(next((name for kind, name in KINDS.items() if device.device_kind.startswith(kind)), "cpu"))
    config = dataclasses.replace(PRESETS[args.config], num_layers=args.layers, sequence_len=args.cache_len)
    sharder = single_device()
    print(f"{device.device_kind} ({device.platform}; as target {target.name}, "
          f"{target.bandwidth / 1e12:.2f} TB/s published), {args.config}'s widths, {args.layers} layers", flush=True)
    params = random_params(config, sharder)
    # On a CPU (a smoke check) the accelerator path runs as traced for a GPU: XLA:CPU runs it too.
    traced_for = tracing_for("gpu" if device.platform == "cpu" else device.platform)
    traced_for.__enter__()
    apply = transformer.build(config, constrain=sharder.constrain).apply
    prefill, decode = step_functions(apply, sharder.replicated())
    put = lambda x: jax.device_put(np.asarray(x), sharder.replicated())

    for batch in (1, 8):
        memory = transformer.init_memory(config, batch, args.cache_len, kv_heads=sharder.cache_heads(config))
        memory = jax.device_put(memory._replace(step=jnp.full((batch,), args.cache_len // 2, jnp.int32)))
        tokens, lengths, settings = put(np.ones((batch, 1), np.int32)), put(np.ones(batch, np.int32)), jax.tree.map(put, row_settings(batch))
        compiled = decode.lower(params, memory, tokens, lengths, settings).compile()
        state = {"memory": memory}

        def step():
            out, state["memory"] = compiled(params, state["memory"], tokens, lengths, settings)
            jax.block_until_ready(out)

        step()  # the first run allocates
        seconds = timed(step, args.steps)
        ideal = ideal_decode_bytes(config, params, (memory.k, memory.v), batch)
        roofline = DecodeRoofline.of(count_traffic(compiled.as_text()), ideal, batch, target.bandwidth or 1.0)
        reached = roofline.ideal_bytes / seconds / target.bandwidth if target.bandwidth else float("nan")
        print(f"decode, batch {batch}: {seconds * 1e3:.2f} ms a step, {batch / seconds:.0f} tokens/s, "
              f"{reached:.0%} of the HBM roofline; plan --target projects {roofline.tokens_per_s:.0f} tokens/s "
              f"(moved/ideal {roofline.ratio:.2f}x)")

    memory = transformer.init_memory(config, 1, args.cache_len, kv_heads=sharder.cache_heads(config))
    chunk = min(args.prefill, args.cache_len)
    arguments = (params, memory, put(np.int32(0)), put(np.ones((1, chunk), np.int32)), put(np.int32(chunk)),
                 put(np.bool_(True)), jax.tree.map(put, row_settings(1)))
    compiled = prefill.lower(*arguments).compile()
    state = {"memory": memory}

    def run_prefill():  # the cache is donated, and the next run takes the one this one returns
        out, state["memory"] = compiled(params, state["memory"], *arguments[2:])
        jax.block_until_ready(out)

    run_prefill()
    seconds = timed(run_prefill, 3)
    print(f"prefill, {chunk} tokens: {seconds * 1e3:.1f} ms, {chunk / seconds:.0f} tokens/s")
    planned = compiled.memory_analysis()
    stats = device.memory_stats() or {}
    print(f"memory: compiler's plan {(planned.argument_size_in_bytes + planned.temp_size_in_bytes) / 2**30:.2f} GiB "
          f"(arguments + temporaries); measured peak {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
