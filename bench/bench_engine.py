"""Prefill and decode speed of a Grok-shaped model with random 8-bit weights, against a
reference-style baseline and against this machine's roofline, measured in the same run.

Engines (each runs in its own process, so its peak memory is its own):
- baseline: the reference's way: every expert on every token, whole expert tensors dequantized
  per call (`moe_impl="all_experts"`), 8-bit weights, scanned layers;
- int8:     the fast MoE (`moe_impl="auto"`) on the released 8-bit weights, scanned layers: the
  accelerator path, where int8 converts inside the matmuls;
- f32:      the CPU format (`Grok(cpu_format=True)`, the default on one CPU device): weights
  dequantized once at load (`model.f32_params`, 4 bytes per weight instead of 1), unrolled
  layers so every weight and each layer's cache array is read in place, `moe_impl="auto"`.
The engines' KV caches are f32 on CPU (`model.cache_dtype`); the baseline's is bf16.

Roofline: right before each timed phase, the engine's process measures read bandwidth (f32 GEMV
over a 128 MiB weight), f32 matmul FLOP/s (a 512x4096x4096 GEMM: the engines' matmuls run in f32
on CPU, bit-identical to bf16 ones) and the rate of 8-bit dequantization (int8 -> bf16 values in
f32, elements/s), so each phase is compared with the machine as loaded at that moment (the
machine is shared); "% best" compares with the best rates seen in the whole run. A step's time
can be no less
than the largest of bytes it must read / bandwidth, its FLOPs / matmul rate, and elements it
converts / conversion rate, each counted for what that engine does (the f32 engine reads 4-byte
weights and converts nothing; the others read 1-byte weights and convert what they dequantize,
plus the f32 -> bf16 cast of the embedding table for the output projection). Experts read per
decode step assume uniform routing: E * (1 - (1 - k/E)**B) distinct experts per layer.

    PYTHONPATH=. .venv/bin/python bench/bench_engine.py            # ~1 GB of int8 weights
    PYTHONPATH=. .venv/bin/python bench/bench_engine.py --emb-size 1024 --engines int8 f32
    PYTHONPATH=. .venv/bin/python bench/bench_engine.py --allocator jemalloc   # see the README
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("baseline", "int8", "f32")
# Bytes per cached key or value element: the reference keeps bf16; the engine's cache on CPU is
# float32 holding the same bf16 values (`grok.model.cache_dtype`).
CACHE_BYTES = {"baseline": 2, "int8": 4, "f32": 4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--emb-size", type=int, default=2048, help="model width D")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--selected", type=int, default=2, help="experts per token")
    p.add_argument("--widening", type=float, default=8.0, help="ffn width = ffn_size(D, widening)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--key-size", type=int, default=128)
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=512, help="tokens prefilled (one sequence)")
    p.add_argument("--cache-len", type=int, default=1024, help="KV-cache length of every run")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    p.add_argument("--steps", type=int, default=5, help="timed decode steps per batch size (baseline: 2)")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument(
        "--allocator", choices=("system", "jemalloc"), default="system",
        help="malloc of the engines' processes: the system's, or jemalloc keeping freed memory (LD_PRELOAD "
        "of libjemalloc.so.2, package libjemalloc2), which spares XLA:CPU a page fault per 4 KiB of every "
        "fresh buffer each step",
    )
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_config(args):
    from grok.config import GrokConfig

    return GrokConfig(
        emb_size=args.emb_size, key_size=args.key_size, num_q_heads=args.q_heads, num_kv_heads=args.kv_heads,
        num_layers=args.layers, vocab_size=args.vocab, widening_factor=args.widening,
        attn_output_multiplier=1 / math.sqrt(args.key_size), num_experts=args.experts,
        num_selected_experts=args.selected, embedding_multiplier_scale=math.sqrt(args.emb_size),
        output_multiplier_scale=1 / math.sqrt(3), pad_token=0, eos_token=2,
        sequence_len=args.cache_len,
    )


# ---------------------------------------------------------------------------------------------
# What a step must do: bytes, FLOPs, conversions
# ---------------------------------------------------------------------------------------------


def sizes(config) -> dict[str, int]:
    c = config
    hd, kd = c.num_q_heads * c.key_size, c.num_kv_heads * c.key_size
    return {
        "attention": c.emb_size * (2 * hd + 2 * kd),  # query, key, value, linear
        "expert": 3 * c.emb_size * c.ffn_size,  # one expert's three matrices
        "embedding": c.vocab_size * c.emb_size,
    }


def int8_bytes(config) -> int:
    s = sizes(config)
    return config.num_layers * (s["attention"] + config.num_experts * s["expert"])


def step_work(config, engine: str, batch: int, tokens: int, cache_len: int) -> dict[str, float]:
    """Bytes read, FLOPs and elements converted by one forward step of `batch` x `tokens` tokens."""
    c, s = config, sizes(config)
    n = batch * tokens
    e, k = c.num_experts, c.num_selected_experts
    if engine == "baseline":
        experts_read, experts_per_token = e, e
    else:
        experts_read, experts_per_token = e * (1 - (1 - k / e) ** n), k
    weight_bytes = 4 if engine == "f32" else 1
    layer_weights = s["attention"] + experts_read * s["expert"]
    cache = c.num_layers * batch * cache_len * c.num_kv_heads * c.key_size * 2 * CACHE_BYTES[engine]  # k and v
    bytes_read = c.num_layers * layer_weights * weight_bytes + 4 * s["embedding"] + cache
    attention_scores = 4 * n * cache_len * c.num_q_heads * c.key_size  # q.k and p.v over the whole cache
    flops = c.num_layers * n * (2 * s["attention"] + 2 * experts_per_token * s["expert"]) + c.num_layers * attention_scores
    flops += 2 * batch * s["embedding"]  # logits of the last position (prefill) or every row (decode)
    if tokens > 1:
        flops += 2 * (n - batch) * s["embedding"]  # the model computes logits at every position
    converted = 0 if engine == "f32" else c.num_layers * layer_weights + s["embedding"]
    return {"bytes": bytes_read, "flops": flops, "converted": converted}


def roofline(work: dict[str, float], machine: dict[str, float]) -> dict[str, float]:
    terms = {
        "bandwidth": work["bytes"] / machine["bandwidth"],
        "compute": work["flops"] / machine["flops"],
        "convert": work["converted"] / machine["convert"],
    }
    bound = max(terms, key=terms.get)
    return {**terms, "bound": bound, "time": terms[bound]}


# ---------------------------------------------------------------------------------------------
# Machine measurements
# ---------------------------------------------------------------------------------------------


def best_time(fn, *args, repeat: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def measure_machine(bf16: bool = False) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from grok.quant import QuantizedWeight8bit, dequantize_to_f32

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((4096, 8192), np.float32))  # 128 MiB
    x = jnp.ones((1, 4096), jnp.float32)
    bandwidth = w.nbytes / best_time(jax.jit(lambda x, w: x @ w), x, w, repeat=10)
    a = jnp.asarray(rng.standard_normal((512, 4096), np.float32))
    b = jnp.asarray(rng.standard_normal((4096, 4096), np.float32))
    flops = 2 * 512 * 4096 * 4096 / best_time(jax.jit(lambda a, b: a @ b), a, b, repeat=3)
    rates = {"bandwidth": bandwidth, "flops": flops}
    if bf16:
        rates["flops_bf16"] = 2 * 512 * 4096 * 4096 / best_time(
            jax.jit(lambda a, b: a @ b), a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), repeat=3
        )
    del w, a, b
    q = QuantizedWeight8bit(
        weight=jnp.asarray(rng.integers(-127, 128, (4096, 8192), dtype=np.int8)),
        scales=jnp.asarray(rng.uniform(0.5, 1.5, (1, 8192)), jnp.bfloat16),
    )
    rates["convert"] = q.weight.size / best_time(jax.jit(dequantize_to_f32), q, repeat=5)
    rates["cast"] = q.weight.size / best_time(jax.jit(lambda w: w.astype(jnp.float32)), q.weight, repeat=5)
    return rates


# ---------------------------------------------------------------------------------------------
# One engine (runs in its own process)
# ---------------------------------------------------------------------------------------------


def random_weights(config, seed: int = 0):
    """The stacked model tree with random int8 weights (bf16 scales) and fp32 others, fast."""
    import jax
    import ml_dtypes
    import numpy as np

    from grok.quant import QuantizedWeight8bit
    from grok.weights import model_shapes

    rng = np.random.default_rng(seed)

    def make(leaf, name):
        if isinstance(leaf, QuantizedWeight8bit):
            n_in = leaf.weight.shape[-2]
            weight = np.frombuffer(rng.bytes(math.prod(leaf.weight.shape)), np.int8).reshape(leaf.weight.shape)
            scales = rng.uniform(0.5, 1.5, leaf.scales.shape) / (73.0 * np.sqrt(n_in))
            return QuantizedWeight8bit(weight=weight, scales=scales.astype(ml_dtypes.bfloat16))
        if name == "scale":
            return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
        if name == "embeddings":
            return rng.standard_normal(leaf.shape, np.float32)
        return (rng.standard_normal(leaf.shape, np.float32) / np.sqrt(leaf.shape[-2]))

    shapes = model_shapes(config)
    return {
        path: {name: make(leaf, name) for name, leaf in leaves.items()}
        for path, leaves in shapes.items()
    }


def run_engine(args, engine: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from grok import model, weights

    config = make_config(args)
    host = random_weights(config)
    if engine == "f32":
        params = model.f32_params(weights.unstack_layers(host, config.num_layers))
        build = model.build(config, moe_impl="auto", scan_layers=False)
    else:
        params = jax.tree.map(jnp.asarray, host)
        build = model.build(config, moe_impl="all_experts" if engine == "baseline" else "auto")
    del host
    params = jax.block_until_ready(params)
    step = jax.jit(lambda p, tokens, memory: build.apply(p, tokens, memory), donate_argnums=2)
    rng = np.random.default_rng(1)
    result = {"engine": engine, "compile_s": {}, "steps": {}, "machine": {}}

    def memory_at(batch: int, filled: int) -> model.KVMemory:
        """A cache whose first `filled` positions hold (random) keys and values of real tokens."""
        shape = model.cache_shape(config, batch, args.cache_len)
        dtype = jnp.bfloat16 if engine == "baseline" else model.cache_dtype()
        one = lambda shape: jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16).astype(dtype)
        kv = lambda: one(shape) if engine != "f32" else tuple(one(shape[1:]) for _ in range(config.num_layers))
        mask = np.zeros((batch, args.cache_len), bool)
        mask[:, :filled] = True
        return model.KVMemory(k=kv(), v=kv(), mask=jnp.asarray(mask), step=jnp.full((batch,), filled, jnp.int32))

    def timed(phase: str, batch: int, tokens: int, filled: int, repeat: int) -> None:
        token_ids = jnp.asarray(rng.integers(3, config.vocab_size, (batch, tokens)), jnp.int32)
        start = time.perf_counter()
        compiled = step.lower(params, token_ids, memory_at(batch, filled)).compile()
        result["compile_s"][f"{batch}x{tokens}"] = time.perf_counter() - start
        out = compiled(params, token_ids, memory_at(batch, filled))  # warm-up
        jax.block_until_ready(out.logits)
        # The machine is shared and its load varies: measure its rates right before this phase.
        result["machine"][phase] = measure_machine()
        times = []
        for _ in range(repeat):
            memory = memory_at(batch, filled)
            jax.block_until_ready(memory)
            start = time.perf_counter()
            out = compiled(params, token_ids, memory)
            int(jnp.argmax(out.logits[0, -1]))  # the next token is known: time to first token
            times.append(time.perf_counter() - start)
        result["steps"][phase] = min(times)

    steps = 2 if engine == "baseline" else args.steps
    timed("prefill", 1, args.prompt_len, 0, 2)
    for batch in args.batches:
        timed(f"decode {batch}", batch, 1, args.prompt_len, steps)
    result["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def report(args, config, machine: dict, best: dict, results: dict[str, dict]) -> None:
    gb = 1e9
    print(f"\nconfig: D={config.emb_size} layers={config.num_layers} experts={config.num_experts} "
          f"(top-{config.num_selected_experts}) ffn={config.ffn_size} heads={config.num_q_heads}/{config.num_kv_heads}"
          f"x{config.key_size} vocab={config.vocab_size}; prompt {args.prompt_len}, cache {args.cache_len}")
    print(f"int8 weights: {int8_bytes(config) / gb:.3f} GB (+ {4 * sizes(config)['embedding'] / gb:.3f} GB f32 "
          f"embedding); f32 engine holds {4 * int8_bytes(config) / gb:.3f} GB of f32 weights instead")
    print(f"machine (measured by this process): read bandwidth {machine['bandwidth'] / gb:.1f} GB/s (f32 GEMV, "
          f"128 MiB), f32 matmul {machine['flops'] / gb:.1f} GFLOP/s (bf16: {machine['flops_bf16'] / gb:.1f}), "
          f"int8 dequantization {machine['convert'] / gb:.2f} G elements/s (plain int8->f32 cast "
          f"{machine['cast'] / gb:.2f}); jax {__import__('jax').__version__}, {os.cpu_count()} CPUs")
    print(f"best rates seen in this run (all processes, all phases): {best['bandwidth'] / gb:.1f} GB/s, "
          f"{best['flops'] / gb:.1f} GFLOP/s, {best['convert'] / gb:.2f} G elements/s")
    phases = [("prefill", 1, args.prompt_len)] + [(f"decode {b}", b, 1) for b in args.batches]
    header = (f"{'engine':<9}{'phase':<11}{'tokens/s':>10}{'step ms':>10}{'x base':>8}{'roof ms':>9}{'% roof':>8}"
              f"{'bound':>10}  {'bw ms (ratio)':>15}{'flop ms (ratio)':>17}{'conv ms (ratio)':>17}{'% best':>8}")
    print("\n" + header)
    print("-" * len(header))
    for engine, result in results.items():
        for phase, batch, tokens in phases:
            t = result["steps"][phase]
            work = step_work(config, engine, batch, tokens, args.cache_len)
            roof = roofline(work, result["machine"][phase])
            tight = roofline(work, best)
            base = results.get("baseline", {}).get("steps", {}).get(phase)
            speedup = f"{base / t:.2f}" if base else "-"
            terms = "".join(f"{roof[k] * 1e3:>9.1f} ({roof[k] / t:>4.0%})" for k in ("bandwidth", "compute", "convert"))
            print(f"{engine:<9}{phase:<11}{batch * tokens / t:>10.1f}{t * 1e3:>10.1f}{speedup:>8}"
                  f"{roof['time'] * 1e3:>9.1f}{roof['time'] / t:>8.0%}{roof['bound']:>10}  {terms}{tight['time'] / t:>8.0%}")
    print(f"\nx base: baseline step time / this one. roof: the step's roofline with the rates measured right before "
          f"that phase, in that process;\n% roof: roofline time / measured time, and each term's ratio likewise. % best: "
          f"the same with the best rates of the run (a\nbound the loaded machine rarely allows). Decode steps attend "
          f"over a cache of {args.cache_len} positions.")
    print(f"\n{'engine':<9}{'TTFT s':>8}{'compile s (prefill, decode ' + '/'.join(map(str, args.batches)) + ')':>44}"
          f"{'peak RSS GB':>13}")
    for engine, result in results.items():
        compile_s = result["compile_s"]
        parts = [compile_s[f"1x{args.prompt_len}"]] + [compile_s[f"{b}x1"] for b in args.batches]
        print(f"{engine:<9}{result['steps']['prefill']:>8.2f}{sum(parts):>12.1f} = "
              + " + ".join(f"{p:.1f}" for p in parts).ljust(29) + f"{result['max_rss_gb']:>13.2f}")
    ideal = step_work(config, "int8", 1, 1, args.cache_len)
    print(f"\nfor scale, at the best rates: reading the 8-bit weights of one batch-1 decode step ({ideal['bytes'] / gb:.2f} "
          f"GB with cache and f32 embedding) takes {ideal['bytes'] / best['bandwidth'] * 1e3:.1f} ms; converting them "
          f"takes {ideal['converted'] / best['convert'] * 1e3:.1f} ms. The conversion rate is measured on a fresh "
          f"output buffer each call,\nso it is a pessimistic rate: inside the model some dequantization reuses buffers "
          f"and beats it, hence conversion-bound ratios above 100%.")


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.worker:
        with open(args.out, "w") as f:
            json.dump(run_engine(args, args.worker), f)
        return
    config = make_config(args)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.allocator == "jemalloc":
        found = sorted(glob.glob("/usr/lib/*/libjemalloc.so.2") + glob.glob("/usr/lib/libjemalloc.so.2"))
        if not found:
            sys.exit("error: --allocator jemalloc: no libjemalloc.so.2 under /usr/lib (install libjemalloc2)")
        env.update(LD_PRELOAD=found[0], MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    print(f"allocator of the engines' processes: {args.allocator}")
    print(f"building {len(args.engines)} engines, each in its own process; ~{int8_bytes(config) / 1e9:.2f} GB of "
          f"int8 weights (timings on a shared machine are noisy: each is the best of several runs)", flush=True)
    machine = measure_machine(bf16=True)
    results = {}
    for engine in args.engines:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", engine, "--out", out.name]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env)
            results[engine] = json.loads(Path(out.name).read_text())
            print(f"  {engine}: done in {time.perf_counter() - start:.0f} s", flush=True)
    # The machine is shared, so rates vary: besides each phase's own measurement, report against
    # the best of each rate measured in the run (by this process and every engine's, every phase).
    measured = [machine, measure_machine(), *(m for r in results.values() for m in r["machine"].values())]
    best = {k: max(m[k] for m in measured) for k in ("bandwidth", "flops", "convert")}
    for k in best:
        print(f"  {k} measurements: " + ", ".join(f"{m[k] / 1e9:.2f}" for m in measured) + " (G/s)")
    report(args, config, machine, best, results)


if __name__ == "__main__":
    main()
