"""Prefill and decode speed, peak memory and sampling's share of a Grok-shaped model with random
8-bit weights, on CPU, against this machine's roofline, every engine measured in the same run.

Engines (each runs in its own process, so its peak memory is its own; default: int8 f32):
- int8:     the default CPU path: the released 8-bit weights as loaded, per layer
  (`model.cpu_int8_params`: each int8 weight as it is with its bf16 scales, for the native int8
  kernels; the embedding table as bf16), unrolled layers, `moe_impl="auto"`. Reads 1 byte per
  weight (+ 2 per scale) and converts nothing outside registers.
- f32:      the CPU format (`--weight-format cpu`): weights dequantized once at load to float32
  (`model.f32_params`, 4 bytes per weight instead of 1), unrolled layers, `moe_impl="auto"`. The
  ratios "x f32" are to this engine.
- xla-int8: the released 8-bit weights stacked for the scanned layers, XLA dequantizing inside
  each matmul (the accelerator path; before `cpu_int8_params`, the int8 engine).
- baseline: the reference's way: every expert on every token, whole expert tensors dequantized
  per call (`moe_impl="all_experts"`), 8-bit weights, scanned layers, bf16 cache. Very slow at
  a large vocabulary.
The engines' KV caches are f32 on CPU (`model.cache_dtype`); the baseline's is bf16. Weights are
made per tensor, embedding first, each put on the device and converted before the next is made
(the NumPy array dropped at once), so no engine ever holds a second copy of its weights.

Roofline: right before each timed phase, the engine's process measures read bandwidth (f32 GEMV
over a 128 MiB weight), f32 matmul FLOP/s (a 512x4096x4096 GEMM) and the rate of 8-bit
dequantization by XLA (int8 -> bf16 values in f32, elements/s), so each phase is compared with
the machine as loaded at that moment (the machine is shared); "% best" compares with the best
rates seen in the whole run. A step's time can be no less than the largest of bytes it must read
/ bandwidth, its FLOPs / matmul rate and elements it converts / conversion rate, each counted for
what that engine does:
- int8: int8 weights of the attention and of the experts read, their bf16 scales (2 bytes per
  scale element, scale blocks as in `weights.model_shapes`), the embedding table as bf16 (2 bytes
  per element: the output projection reads it so), the f32 KV cache; nothing converted;
- f32: f32 weights (4 bytes each), the f32 embedding table, the f32 cache; nothing converted;
- xla-int8 and baseline: int8 weights, the f32 embedding table, the cache; converted: every weight
  read plus the embedding table (its f32 -> bf16 cast for the output projection).
Experts read per step assume uniform routing: E * (1 - (1 - k/E)**N) distinct experts per layer
for N tokens (the baseline reads all E).

Every engine runs --rounds times (default 2), the engines in turn, and each phase reports its
fastest run (with the machine rates and sampling times of that run, and the larger peak memory):
this VM's read bandwidth drifts between about 30 and 60 GB/s over minutes.

Output:
- per engine and phase (prefill of --prompt-len tokens, decode at each --batches size): tokens/s,
  step time, "x f32" (the f32 engine's step time / this one's, same run), the roofline, its
  bound and "% roof" (roofline time / measured time);
- sampling: the engine's sampling and log-probabilities (`grok.serving.programs._choose`, as a decode step
  calls `grok.serving.sampling.choose`) jitted alone on [batch, vocab] logits, at each decode batch, for
  all-greedy rows and for a mix (the first half of the rows top-p sampled at temperature 0.7,
  top_p 0.95, the rest greedy) on peaked logits (Zipf, whose nucleus lies in the sampler's
  candidates), and the mix on flat logits (standard normal: every sampled row needs the full
  sort, the worst case); each with its share of (forward step + sampling);
- memory: peak RSS per engine (VmHWM, leaving out the bench's own rate and sampling probes; the
  peak with them beside it; the peak of each stage: load, each phase's compile and run), the
  budget = checkpoint bytes (int8 weights + bf16 scales + f32 embedding + f32 norms and router:
  what the released checkpoint holds) + the largest KV cache the engine allocated, and peak /
  budget;
- issue 15's targets (int8 against f32: tokens/s ratios, % of the int8 roofline at batch 1, peak
  RSS / budget, sampling's share at the largest batch) when both ran.

The three runs of issue 15's closing note (2 threads: all of this machine's cores; `--threads N`
caps the native kernels, `PJRT_NPROC=N` XLA's pool, as `run.py bench --threads N` does both):

    PYTHONPATH=. .venv/bin/python bench/bench_engine.py              # D=2048, 2 layers, vocab 131072
    PYTHONPATH=. .venv/bin/python bench/bench_engine.py --emb-size 4096   # D=4096: weights past any cache
    PYTHONPATH=. .venv/bin/python bench/bench_engine.py --vocab 8192      # the vocab of llama.cpp's figures

Others:

    PYTHONPATH=. .venv/bin/python bench/bench_engine.py --engines int8 f32 xla-int8 baseline --vocab 8192
    PYTHONPATH=. .venv/bin/python bench/bench_engine.py --emb-size 256 --layers 1 --vocab 4096 \
        --prompt-len 32 --cache-len 128 --batches 1 8 --steps 2       # a quick check, seconds
    PYTHONPATH=. .venv/bin/python bench/bench_engine.py --allocator jemalloc   # see the README

The default size holds ~1.1 GB of int8 weights (+ a 1.07 GB f32 embedding; the f32 engine needs
~6 GB); --emb-size 4096 holds ~4.3 GB of int8 weights (+ 2.1 GB; the f32 engine ~20 GB).
"""

from __future__ import annotations

import argparse
import functools
import gc
import glob
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("int8", "f32", "xla-int8", "baseline")
DEFAULT_ENGINES = ("int8", "f32")
PER_LAYER = ("int8", "f32")  # engines on the per-layer (checkpoint) tree with unrolled layers
# Bytes per cached key or value element: the reference keeps bf16; the engine's cache on CPU is
# float32 holding the same bf16 values (`grok.model.transformer.cache_dtype`).
CACHE_BYTES = {"baseline": 2, "xla-int8": 4, "int8": 4, "f32": 4}
EMBEDDINGS = "language_model/in_out_embed"
# Sampling: the mixed rows' settings (SamplingParams' defaults) and the peaked logits' Zipf exponent.
TEMPERATURE, TOP_P, ZIPF = 0.7, 0.95, 1.2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--emb-size", type=int, default=2048, help="model width D")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--selected", type=int, default=2, help="experts per token")
    p.add_argument("--widening", type=float, default=8.0, help="ffn width = ffn_size(D, widening)")
    p.add_argument("--vocab", type=int, default=131072, help="vocabulary (Grok-1's: 131072)")
    p.add_argument("--key-size", type=int, default=128)
    p.add_argument("--q-heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=512, help="tokens prefilled (one sequence)")
    p.add_argument("--cache-len", type=int, default=1024, help="KV-cache length of every run")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    p.add_argument("--steps", type=int, default=5, help="timed decode steps per batch size (baseline: 2)")
    p.add_argument(
        "--rounds", type=int, default=2,
        help="runs of every engine, in turn; each phase reports its fastest (this machine's bandwidth drifts)",
    )
    p.add_argument("--engines", nargs="+", default=list(DEFAULT_ENGINES), choices=ENGINES)
    p.add_argument(
        "--threads", type=int,
        help="threads of the native kernels (`grok.native.set_threads`) in each engine's process; default: "
        "$PJRT_NPROC if set (as `run.py bench --threads N` leaves it), else all. XLA's own pool is sized "
        "by $PJRT_NPROC when each process starts",
    )
    p.add_argument(
        "--allocator", choices=("system", "jemalloc"), default="system",
        help="malloc of the engines' processes: the system's, or jemalloc keeping freed memory (LD_PRELOAD "
        "of libjemalloc.so.2, package libjemalloc2), which spares XLA:CPU a page fault per 4 KiB of every "
        "fresh buffer each step (its peak RSS then includes the memory it keeps)",
    )
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_config(args):
    from grok.model.config import GrokConfig

    return GrokConfig(
        emb_size=args.emb_size, key_size=args.key_size, num_q_heads=args.q_heads, num_kv_heads=args.kv_heads,
        num_layers=args.layers, vocab_size=args.vocab, widening_factor=args.widening,
        attn_output_multiplier=1 / math.sqrt(args.key_size), num_experts=args.experts,
        num_selected_experts=args.selected, embedding_multiplier_scale=math.sqrt(args.emb_size),
        output_multiplier_scale=1 / math.sqrt(3), pad_token=0, eos_token=2,
        sequence_len=args.cache_len,
    )


# ---------------------------------------------------------------------------------------------
# What a step must do: bytes, FLOPs, conversions; what the checkpoint holds
# ---------------------------------------------------------------------------------------------


def sizes(config) -> dict[str, int]:
    c = config
    hd, kd = c.num_q_heads * c.key_size, c.num_kv_heads * c.key_size
    return {
        "attention": c.emb_size * (2 * hd + 2 * kd),  # query, key, value, linear
        "expert": 3 * c.emb_size * c.ffn_size,  # one expert's three matrices
        "embedding": c.vocab_size * c.emb_size,
    }


@functools.cache
def scale_elements(config) -> dict[str, int]:
    """bf16 scale elements of one layer's attention weights and of one expert's three weights, with
    the release's scale blocks (`grok.model.weights.model_shapes`)."""
    from grok.model.quant import QuantizedWeight8bit
    from grok.model.weights import model_shapes

    out = {"attention": 0, "expert": 0}
    for path, leaves in model_shapes(config).items():
        for leaf in leaves.values():
            if isinstance(leaf, QuantizedWeight8bit):
                n = math.prod(leaf.scales.shape[1:])  # without the layer axis
                if "/moe/" in path:
                    out["expert"] += n // config.num_experts
                else:
                    out["attention"] += n
    return out


@functools.cache
def checkpoint_bytes(config) -> dict[str, int]:
    """Bytes of the released checkpoint of `config` (`grok.model.weights.checkpoint_shapes`): int8 weights,
    their bf16 scales, the f32 embedding table, and the other f32 leaves (norms, router)."""
    import numpy as np

    from grok.model.quant import QuantizedWeight8bit
    from grok.model.weights import checkpoint_shapes

    out = {"int8": 0, "scales": 0, "embedding": 0, "other": 0}
    for path, leaves in checkpoint_shapes(config).items():
        for leaf in leaves.values():
            if isinstance(leaf, QuantizedWeight8bit):
                out["int8"] += math.prod(leaf.weight.shape)
                out["scales"] += 2 * math.prod(leaf.scales.shape)
            else:
                size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
                out["embedding" if path == EMBEDDINGS else "other"] += size
    out["total"] = sum(out.values())
    return out


def kv_bytes(config, engine: str, batch: int, cache_len: int) -> int:
    """Bytes of the keys and values of a cache of `batch` rows (the engine's cache dtype)."""
    c = config
    return 2 * c.num_layers * batch * c.num_kv_heads * cache_len * c.key_size * CACHE_BYTES[engine]


def step_work(config, engine: str, batch: int, tokens: int, cache_len: int) -> dict[str, float]:
    """Bytes read, FLOPs and elements converted by one forward step of `batch` x `tokens` tokens."""
    c, s = config, sizes(config)
    n = batch * tokens
    e, k = c.num_experts, c.num_selected_experts
    if engine == "baseline":
        experts_read, experts_per_token = e, e
    else:
        experts_read, experts_per_token = e * (1 - (1 - k / e) ** n), k
    layer_weights = s["attention"] + experts_read * s["expert"]
    cache = kv_bytes(config, engine, batch, cache_len)
    if engine == "int8":  # int8 weights, bf16 scales, bf16 embedding; converts only in registers
        scales = scale_elements(config)
        layer_bytes = layer_weights + 2 * (scales["attention"] + experts_read * scales["expert"])
        bytes_read = c.num_layers * layer_bytes + 2 * s["embedding"] + cache
        converted = 0
    else:
        weight_bytes = 4 if engine == "f32" else 1
        bytes_read = c.num_layers * layer_weights * weight_bytes + 4 * s["embedding"] + cache
        converted = 0 if engine == "f32" else c.num_layers * layer_weights + s["embedding"]
    attention_scores = 4 * n * cache_len * c.num_q_heads * c.key_size  # q.k and p.v over the whole cache
    flops = c.num_layers * n * (2 * s["attention"] + 2 * experts_per_token * s["expert"]) + c.num_layers * attention_scores
    flops += 2 * batch * s["embedding"]  # logits of each row's last position, as the engine computes them
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

    from grok.model.quant import QuantizedWeight8bit, dequantize_to_f32

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


def _malloc_trim() -> None:
    """glibc's malloc_trim(0): return freed heap memory to the system (nothing elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """This process's peak resident memory by stage, leaving out what the bench's own probes (machine
    rates, sampling) allocate: at the end of each stage (`mark`) and before each probe the peak so far
    (VmHWM) is read, then reset to the current RSS (Linux `/proc/self/clear_refs`). Where that cannot
    be done, every peak is ru_maxrss."""

    def __init__(self) -> None:
        self.stages: dict[str, int] = {}
        self.with_probes = 0
        try:
            self._reset()
            self.resettable = True
        except OSError:
            self.resettable = False

    @staticmethod
    def status(key: str) -> int:
        """`VmHWM` or `VmRSS` of /proc/self/status, in bytes."""
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def _hwm(self) -> int:
        if not self.resettable:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self.status("VmHWM")

    def mark(self, stage: str) -> None:
        """Close a stage: its peak is the peak since the last mark or probe."""
        self.stages[stage] = max(self.stages.get(stage, 0), self._hwm())
        if self.resettable:
            self._reset()

    def probe(self, stage: str, fn, *args):
        """fn(*args) during `stage`, its memory left out of the peak."""
        self.mark(stage)
        try:
            return fn(*args)
        finally:
            self.with_probes = max(self.with_probes, self._hwm())
            gc.collect()
            _malloc_trim()  # what the probe freed goes back to the system, not into later stages' peaks
            if self.resettable:
                self._reset()

    def peak(self) -> tuple[int, str]:
        """The peak of every stage, and the stage it was reached in."""
        stage = max(self.stages, key=self.stages.get)
        return self.stages[stage], stage


# ---------------------------------------------------------------------------------------------
# One engine (runs in its own process)
# ---------------------------------------------------------------------------------------------


def random_leaf(rng, leaf, name: str):
    """A random NumPy value for an abstract leaf: int8 weights with bf16 scales (activations stay
    O(1) through the layers), f32 norms, embedding table and router."""
    import ml_dtypes
    import numpy as np

    from grok.model.quant import QuantizedWeight8bit

    if isinstance(leaf, QuantizedWeight8bit):
        n_in = leaf.weight.shape[-2]
        weight = np.frombuffer(rng.bytes(math.prod(leaf.weight.shape)), np.int8).reshape(leaf.weight.shape)
        scales = rng.uniform(0.5, 1.5, leaf.scales.shape) / (73.0 * np.sqrt(n_in))
        return QuantizedWeight8bit(weight=weight, scales=scales.astype(ml_dtypes.bfloat16))
    if name == "scale":
        return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
    if name == "embeddings":
        return rng.standard_normal(leaf.shape, np.float32)
    return rng.standard_normal(leaf.shape, np.float32) / np.float32(np.sqrt(leaf.shape[-2]))


def random_weights(config, seed: int = 0):
    """The stacked model tree with random int8 weights (bf16 scales) and fp32 others, in NumPy
    (bench_scheduling's model)."""
    import numpy as np

    from grok.model.weights import model_shapes

    rng = np.random.default_rng(seed)
    shapes = model_shapes(config)
    return {path: {name: random_leaf(rng, leaf, name) for name, leaf in leaves.items()} for path, leaves in shapes.items()}


def load_weights(config, engine: str, seed: int = 0):
    """The engine's parameters, made one tensor at a time, embedding first: each random NumPy value
    is put on the device (`jax.device_put`: one copy), dropped, and converted to the engine's format before the next is
    made, so at most one tensor's worth of extra memory exists at any time. int8 and f32 take the
    per-layer (checkpoint) tree, the others the stacked one."""
    import jax
    import ml_dtypes
    import numpy as np

    from grok.model import transformer, weights

    if engine == "int8":
        convert = transformer.cpu_int8_params
    elif engine == "f32":
        convert = transformer.f32_params
    else:
        convert = None
    shapes = weights.checkpoint_shapes(config) if engine in PER_LAYER else weights.model_shapes(config)
    rng = np.random.default_rng(seed)
    params: dict = {}
    for path in sorted(shapes, key=lambda p: p != EMBEDDINGS):  # the largest tensor first
        params[path] = {}
        for name, leaf in shapes[path].items():
            host = random_leaf(rng, leaf, name)
            if engine == "int8" and path == EMBEDDINGS:
                # The int8 engine keeps the table as bf16 (what its conversion makes of it, rounded to
                # nearest even either way): round here, so the f32 table is never copied to the device.
                host = host.astype(ml_dtypes.bfloat16)
            # device_put copies once (or aliases an aligned array); jnp.asarray may briefly hold two copies.
            value = jax.block_until_ready(jax.tree.map(jax.device_put, host))
            del host
            if convert is not None:
                value = jax.block_until_ready(convert({path: {name: value}})[path][name])
            params[path][name] = value
            del value
    return params


@functools.cache
def _cache_array_fn(shape: tuple[int, ...], dtype):
    """seed -> a cache array of bf16 values in [-1, 1] that vary along every axis (a sine of the
    element's index): one elementwise loop, so making it needs no memory beyond the array (random
    bits would take a buffer of their own)."""
    import jax
    import jax.numpy as jnp

    def make(seed):
        index = jax.lax.iota(jnp.int32, math.prod(shape)).reshape(shape).astype(jnp.float32)
        return jnp.sin(index * 0.7548776 + seed).astype(jnp.bfloat16).astype(dtype)

    return jax.jit(make)


def measure_sampling(config, batch: int, position: int, repeat: int) -> dict[str, float]:
    """Seconds of the engine's sampling and log-probabilities (`grok.serving.programs._choose`) on [batch, vocab]
    logits, jitted alone: all rows greedy; a mix (the first half of the rows sampled with temperature
    TEMPERATURE and top_p TOP_P, the rest greedy) on peaked (Zipf) logits; the mix on flat logits."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from grok.serving.programs import _choose, row_settings

    v = config.vocab_size
    rng = np.random.default_rng(2)
    zipf = -ZIPF * np.log(np.arange(1, v + 1, dtype=np.float32))
    peaked = jnp.asarray(np.stack([zipf[rng.permutation(v)] for _ in range(batch)]))
    flat = jnp.asarray(rng.standard_normal((batch, v), np.float32))
    greedy = row_settings(batch)
    mixed = row_settings(batch)
    sampled = (batch + 1) // 2
    mixed["temperature"][:sampled] = TEMPERATURE
    mixed["top_p"][:sampled] = TOP_P
    mixed["seed"][:] = np.arange(batch, dtype=np.uint32)
    positions = jnp.arange(batch, dtype=jnp.int32) + position
    fn = jax.jit(lambda logits, positions, settings: _choose(logits, positions, settings))
    repeat = max(repeat, 5)
    return {
        "greedy": best_time(fn, peaked, positions, greedy, repeat=repeat),
        "mixed": best_time(fn, peaked, positions, mixed, repeat=repeat),
        "flat": best_time(fn, flat, positions, mixed, repeat=repeat),
    }


def run_engine(args, engine: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from grok import native
    from grok.model import transformer

    peak = PeakMemory()
    threads = args.threads or int(os.environ.get("PJRT_NPROC", "0")) or None
    native.set_threads(threads)
    # Which native kernels this process has (after a fallback to XLA, the engine still runs, slower).
    kernels = {"f32": native.available()}
    if hasattr(native, "int8_available"):
        kernels["int8"] = native.int8_available() and f"yes ({native.isa()})"
    config = make_config(args)
    start = time.perf_counter()
    params = load_weights(config, engine)
    load_s = time.perf_counter() - start
    gc.collect()
    peak.mark("load")
    loaded_rss = PeakMemory.status("VmRSS")
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    if engine in PER_LAYER:
        build = transformer.build(config, moe_impl="auto", scan_layers=False)
    else:
        build = transformer.build(config, moe_impl="all_experts" if engine == "baseline" else "auto")
    # Logits at each row's last token only, as the engine's prefill and decode steps compute them.
    last = lambda tokens: jnp.full((tokens.shape[0],), tokens.shape[1] - 1, jnp.int32)
    step = jax.jit(lambda p, tokens, memory: build.apply(p, tokens, memory, logits_at=last(tokens)), donate_argnums=2)
    rng = np.random.default_rng(1)
    result = {"engine": engine, "compile_s": {}, "steps": {}, "machine": {}, "sampling": {}}
    dtype = jnp.bfloat16 if engine == "baseline" else transformer.cache_dtype()

    def memory_at(batch: int, filled: int) -> transformer.KVMemory:
        """A cache whose first `filled` positions hold (bf16-valued, varied) keys and values of real
        tokens, made on the device."""
        shape = transformer.cache_shape(config, batch, args.cache_len)
        shape = shape[1:] if engine in PER_LAYER else shape
        layers = config.num_layers if engine in PER_LAYER else 1

        def kv(seed):
            arrays = tuple(_cache_array_fn(shape, dtype)(jnp.float32(seed + i)) for i in range(layers))
            return arrays if engine in PER_LAYER else arrays[0]

        mask = np.zeros((batch, args.cache_len), bool)
        mask[:, :filled] = True
        return transformer.KVMemory(k=kv(0), v=kv(1000), mask=jnp.asarray(mask), step=jnp.full((batch,), filled, jnp.int32))

    def timed(phase: str, batch: int, tokens: int, filled: int, repeat: int) -> None:
        token_ids = jnp.asarray(rng.integers(3, config.vocab_size, (batch, tokens)), jnp.int32)
        start = time.perf_counter()
        # Compiled for the cache's shapes, before it exists: the compiler's memory and the cache's
        # do not add up in the peak.
        compiled = step.lower(params, token_ids, jax.eval_shape(lambda: memory_at(batch, filled))).compile()
        result["compile_s"][f"{batch}x{tokens}"] = time.perf_counter() - start
        peak.mark(f"{phase} compile")
        memory = memory_at(batch, filled)
        out = compiled(params, token_ids, memory)  # warm-up
        del memory
        jax.block_until_ready(out.logits)
        # The machine is shared and its load varies: measure its rates right before this phase.
        result["machine"][phase] = peak.probe(f"{phase} run", measure_machine)
        times = []
        for _ in range(repeat):
            # Decode continues from the last step's cache (donated: updated in place); each prefill
            # starts from an empty one.
            memory = out.memory if tokens == 1 else None
            out = None
            if memory is None:
                memory = jax.block_until_ready(memory_at(batch, filled))
            start = time.perf_counter()
            out = compiled(params, token_ids, memory)
            del memory
            int(jnp.argmax(out.logits[0, -1]))  # the next token is known: time to first token
            times.append(time.perf_counter() - start)
        result["steps"][phase] = min(times)
        del out
        peak.mark(f"{phase} run")

    steps = 2 if engine == "baseline" else args.steps
    timed("prefill", 1, args.prompt_len, 0, 2)
    for batch in args.batches:
        timed(f"decode {batch}", batch, 1, args.prompt_len, steps)
        result["sampling"][str(batch)] = peak.probe(f"decode {batch} run", measure_sampling, config, batch, args.prompt_len, steps)
    peak_rss, peak_stage = peak.peak()
    result.update(
        load_s=load_s, loaded_rss=loaded_rss, weight_bytes=weight_bytes, peak_rss=peak_rss, peak_stage=peak_stage,
        peak_stages=peak.stages, peak_resettable=peak.resettable, peak_with_probes=max(peak.with_probes, peak_rss),
        kv_bytes=kv_bytes(config, engine, max(args.batches), args.cache_len), threads=threads, kernels=kernels,
    )
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def merge_rounds(best: dict, new: dict) -> dict:
    """Two runs of one engine: each phase's fastest step, with the machine rates and sampling times
    measured in that same run; the larger peak memory."""
    for phase, seconds in new["steps"].items():
        if seconds < best["steps"][phase]:
            best["steps"][phase], best["machine"][phase] = seconds, new["machine"][phase]
            batch = phase.removeprefix("decode ")
            if batch in new["sampling"]:
                best["sampling"][batch] = new["sampling"][batch]
    if new["peak_rss"] > best["peak_rss"]:
        for key in ("peak_rss", "peak_stage", "peak_stages", "peak_with_probes", "loaded_rss"):
            best[key] = new[key]
    return best


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def report(args, config, machine: dict, best: dict, results: dict[str, dict]) -> None:
    gb = 1e9
    ckpt = checkpoint_bytes(config)
    print(f"\nconfig: D={config.emb_size} layers={config.num_layers} experts={config.num_experts} "
          f"(top-{config.num_selected_experts}) ffn={config.ffn_size} heads={config.num_q_heads}/{config.num_kv_heads}"
          f"x{config.key_size} vocab={config.vocab_size}; prompt {args.prompt_len}, cache {args.cache_len}")
    print(f"checkpoint: {ckpt['total'] / gb:.3f} GB = int8 weights {ckpt['int8'] / gb:.3f} + bf16 scales "
          f"{ckpt['scales'] / gb:.4f} + f32 embedding {ckpt['embedding'] / gb:.3f} + f32 norms and router "
          f"{ckpt['other'] / gb:.4f}; the f32 engine holds {4 * ckpt['int8'] / gb:.3f} GB of f32 weights instead of "
          f"the int8 ones, the int8 engine a {ckpt['embedding'] / 2 / gb:.3f} GB bf16 embedding")
    print(f"machine (measured by this process): read bandwidth {machine['bandwidth'] / gb:.1f} GB/s (f32 GEMV, "
          f"128 MiB), f32 matmul {machine['flops'] / gb:.1f} GFLOP/s (bf16: {machine['flops_bf16'] / gb:.1f}), "
          f"int8 dequantization {machine['convert'] / gb:.2f} G elements/s (plain int8->f32 cast "
          f"{machine['cast'] / gb:.2f}); jax {__import__('jax').__version__}, {os.cpu_count()} CPUs, native kernel "
          f"threads {next(iter(results.values()))['threads'] or 'all'}")
    print("native kernels: " + "; ".join(
        f"{engine}: " + ", ".join(f"{kind} {'yes' if ok is True else ok or 'no'}" for kind, ok in r["kernels"].items())
        for engine, r in results.items()))
    print(f"best rates seen in this run (all processes, all phases): {best['bandwidth'] / gb:.1f} GB/s, "
          f"{best['flops'] / gb:.1f} GFLOP/s, {best['convert'] / gb:.2f} G elements/s")
    phases = [("prefill", 1, args.prompt_len)] + [(f"decode {b}", b, 1) for b in args.batches]
    f32_steps = results.get("f32", {}).get("steps", {})
    base_steps = results.get("baseline", {}).get("steps", {})
    base_col = f"{'x base':>8}" if base_steps else ""
    header = (f"{'engine':<9}{'phase':<11}{'tokens/s':>10}{'step ms':>10}{'x f32':>7}{base_col}{'roof ms':>9}{'% roof':>8}"
              f"{'bound':>10}  {'bw ms (ratio)':>15}{'flop ms (ratio)':>17}{'conv ms (ratio)':>17}{'% best':>8}")
    print("\n" + header)
    print("-" * len(header))
    for engine, result in results.items():
        for phase, batch, tokens in phases:
            t = result["steps"][phase]
            work = step_work(config, engine, batch, tokens, args.cache_len)
            roof = roofline(work, result["machine"][phase])
            tight = roofline(work, best)
            base = f"{ratio(base_steps.get(phase), t):>8}" if base_steps else ""
            terms = "".join(f"{roof[k] * 1e3:>9.1f} ({roof[k] / t:>4.0%})" for k in ("bandwidth", "compute", "convert"))
            print(f"{engine:<9}{phase:<11}{batch * tokens / t:>10.1f}{t * 1e3:>10.1f}{ratio(f32_steps.get(phase), t):>7}{base}"
                  f"{roof['time'] * 1e3:>9.1f}{roof['time'] / t:>8.0%}{roof['bound']:>10}  {terms}{tight['time'] / t:>8.0%}")
    print(f"\nx f32: the f32 engine's step time / this one's{' (x base: the baseline' + chr(39) + 's)' if base_steps else ''}. "
          f"roof: the step's roofline with the rates measured right before that phase, in that process;\n% roof: "
          f"roofline time / measured time, and each term's ratio likewise. % best: the same with the best rates of "
          f"the run (a\nbound the loaded machine rarely allows). Decode steps attend over a cache of {args.cache_len} "
          f"positions.")

    import numpy as np

    from grok.serving.sampling import CANDIDATES

    p = np.exp(-ZIPF / TEMPERATURE * np.log(np.arange(1, config.vocab_size + 1)))
    mass = p[:CANDIDATES].sum() / p.sum()
    print(f"\nsampling + logprobs alone (grok.serving.programs._choose jitted on [batch, {config.vocab_size}] logits); share = "
          f"sampling / (decode step + sampling).\ngreedy: every row greedy; mixed: the first half of the rows "
          f"temperature {TEMPERATURE}, top_p {TOP_P}, on Zipf({ZIPF}) logits (the top {CANDIDATES} hold {mass:.3f} of "
          f"the mass); flat: the mix on N(0, 1) logits (sampled rows sort the vocabulary)")
    header = f"{'engine':<9}{'batch':>6}{'step ms':>9}{'greedy ms':>11}{'share':>7}{'mixed ms':>10}{'share':>7}{'flat ms':>9}{'share':>7}"
    print(header)
    print("-" * len(header))
    for engine, result in results.items():
        for batch in args.batches:
            t = result["steps"][f"decode {batch}"]
            s = result["sampling"][str(batch)]
            cells = "".join(f"{s[k] * 1e3:>{w}.1f}{s[k] / (t + s[k]):>7.1%}" for k, w in (("greedy", 11), ("mixed", 10), ("flat", 9)))
            print(f"{engine:<9}{batch:>6}{t * 1e3:>9.1f}{cells}")

    print(f"\nmemory: budget = checkpoint ({ckpt['total'] / gb:.3f} GB) + the engine's largest KV cache (batch "
          f"{max(args.batches)} x {args.cache_len}); peak RSS (VmHWM) leaves out the bench's rate and sampling probes")
    header = (f"{'engine':<9}{'load s':>7}{'TTFT s':>8}{'compile s':>11}{'weights GB':>12}{'loaded GB':>11}{'KV GB':>7}"
              f"{'peak RSS GB':>13}{'  at':<21}{'w/ probes':>10}{'budget GB':>11}{'peak/budget':>13}")
    print(header)
    print("-" * len(header))
    for engine, result in results.items():
        compile_s = sum(result["compile_s"].values())
        budget = ckpt["total"] + result["kv_bytes"]
        print(f"{engine:<9}{result['load_s']:>7.1f}{result['steps']['prefill']:>8.2f}{compile_s:>11.1f}"
              f"{result['weight_bytes'] / gb:>12.3f}{result['loaded_rss'] / gb:>11.3f}{result['kv_bytes'] / gb:>7.3f}"
              f"{result['peak_rss'] / gb:>13.3f}  {result['peak_stage']:<19}{result['peak_with_probes'] / gb:>10.3f}"
              f"{budget / gb:>11.3f}{result['peak_rss'] / budget:>13.2f}"
              + ("" if result["peak_resettable"] else "  (ru_maxrss: probes included)"))
    print("weights: bytes of the engine's parameter arrays; loaded: RSS once they are made; at: the stage of the peak "
          "(load, a phase's compile or run);\nw/ probes: the peak with the probes' memory; KV: the largest cache (k and v) "
          "it allocated.")
    for engine, result in results.items():
        print(f"  {engine} peak RSS by stage (GB): "
              + ", ".join(f"{stage} {value / gb:.2f}" for stage, value in result["peak_stages"].items()))

    if "int8" in results:
        ideal = step_work(config, "int8", 1, 1, args.cache_len)
        print(f"\nfor scale, at the best bandwidth: reading one batch-1 decode step of the int8 engine ({ideal['bytes'] / gb:.3f} "
              f"GB: int8 weights, scales, bf16 embedding, cache) takes {ideal['bytes'] / best['bandwidth'] * 1e3:.1f} ms; "
              f"the f32 engine's ({step_work(config, 'f32', 1, 1, args.cache_len)['bytes'] / gb:.3f} GB) "
              f"{step_work(config, 'f32', 1, 1, args.cache_len)['bytes'] / best['bandwidth'] * 1e3:.1f} ms.")
    if "int8" in results and "f32" in results:
        targets(args, config, results)


def targets(args, config, results: dict[str, dict]) -> None:
    """Issue 15's targets, int8 against f32 in this run."""
    int8, f32 = results["int8"], results["f32"]
    rows = []

    def speed(phase: str, want: float) -> None:
        if phase in int8["steps"] and phase in f32["steps"]:
            got = f32["steps"][phase] / int8["steps"][phase]
            rows.append((f"{phase}: int8 / f32 tokens/s", f"{got:.2f}x", f">= {want}x", got >= want))

    speed("prefill", 0.9)
    speed("decode 1", 3.0)
    if "decode 1" in int8["steps"]:
        t = int8["steps"]["decode 1"]
        roof = roofline(step_work(config, "int8", 1, 1, args.cache_len), int8["machine"]["decode 1"])
        rows.append(("decode 1: % of the int8 roofline", f"{roof['time'] / t:.0%}", ">= 80%", roof["time"] / t >= 0.8))
    speed("decode 8", 2.0)
    speed("decode 32", 1.3)
    budget = checkpoint_bytes(config)["total"] + int8["kv_bytes"]
    rows.append(("int8 peak RSS / (checkpoint + KV)", f"{int8['peak_rss'] / budget:.2f}", "<= 1.15",
                 int8["peak_rss"] / budget <= 1.15))
    batch = max(args.batches)
    t, s = int8["steps"][f"decode {batch}"], int8["sampling"][str(batch)]
    for kind in ("greedy", "mixed"):
        share = s[kind] / (t + s[kind])
        rows.append((f"sampling's share at batch {batch}, {kind}", f"{share:.1%}", "<= 10%", share <= 0.1))
    print(f"\nissue 15 targets (vocab {config.vocab_size}; the sampling target is for batch 32, vocab 131072):")
    for name, got, want, ok in rows:
        print(f"  {name:<42}{got:>8}  {want:<9}{'ok' if ok else 'MISSED'}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.prompt_len + args.steps + 1 > args.cache_len:
        sys.exit(f"error: --cache-len {args.cache_len} must exceed --prompt-len + --steps + 1 (decode steps follow the prompt)")
    if args.threads is not None and args.threads < 1:
        sys.exit("error: --threads must be at least 1")
    if args.rounds < 1:
        sys.exit("error: --rounds must be at least 1")
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.worker:
        with open(args.out, "w") as f:
            json.dump(run_engine(args, args.worker), f)
        return
    config = make_config(args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.allocator == "jemalloc":
        found = sorted(glob.glob("/usr/lib/*/libjemalloc.so.2") + glob.glob("/usr/lib/libjemalloc.so.2"))
        if not found:
            sys.exit("error: --allocator jemalloc: no libjemalloc.so.2 under /usr/lib (install libjemalloc2)")
        env.update(LD_PRELOAD=found[0], MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    print(f"allocator of the engines' processes: {args.allocator}; XLA threads: "
          f"{os.environ.get('PJRT_NPROC', 'all')} ($PJRT_NPROC)")
    print(f"building {len(args.engines)} engines ({', '.join(args.engines)}), each in its own process; "
          f"~{checkpoint_bytes(config)['int8'] / 1e9:.2f} GB of int8 weights, vocab {config.vocab_size} (timings on a "
          f"shared machine are noisy: each is the best of several runs)", flush=True)
    machine = measure_machine(bf16=True)
    results = {}
    for round_ in range(args.rounds):  # engines in turn, so slow drifts of the machine hit each alike
        for engine in args.engines:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", engine, "--out", out.name]
                start = time.perf_counter()
                subprocess.run(cmd, check=True, env=env)
                result = json.loads(Path(out.name).read_text())
                results[engine] = merge_rounds(results[engine], result) if engine in results else result
                print(f"  {engine} (round {round_ + 1} of {args.rounds}): done in {time.perf_counter() - start:.0f} s", flush=True)
    # The machine is shared, so rates vary: besides each phase's own measurement, report against
    # the best of each rate measured in the run (by this process and every engine's, every phase).
    measured = [machine, measure_machine(), *(m for r in results.values() for m in r["machine"].values())]
    best = {k: max(m[k] for m in measured) for k in ("bandwidth", "flops", "convert")}
    for k in best:
        print(f"  {k} measurements: " + ", ".join(f"{m[k] / 1e9:.2f}" for m in measured) + " (G/s)")
    report(args, config, machine, best, results)


if __name__ == "__main__":
    main()
