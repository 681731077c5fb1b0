"""Will a model fit a pod? Per-device memory of a layout, from shapes and an ahead-of-time compile.

`make_plan` takes a config and a `Sharder` (rules on a mesh, usually of virtual CPU devices), and
with no weight allocated
- counts each device's parameter bytes and KV-cache bytes from the shardings themselves,
- lowers and compiles the engine's two programs (`grok.planning.aot.engine_steps`: one decode step of the
  whole batch, one prefill chunk of the largest bucket) and takes their temporary bytes from
  XLA's memory analysis,
and says which common device sizes the total fits. `recommend` is the layout chosen for a device
count when none is given (partition_rules/README.md has the table).

The temporaries are XLA:CPU's buffer assignment for the same sharded program, compiled with the
cache held as bf16 words (`grok.model.transformer.WORDS`: the same bits, so XLA:CPU updates it in place as an
accelerator does). A GPU or TPU compiler fuses differently, so treat them as an estimate and keep
some memory spare.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from grok.model import transformer
from grok.model.config import GrokConfig
from grok.model.platform import tracing_for
from grok.parallel.sharding import (
    RULES_DIR,
    PartitionRules,
    Sharder,
    ShardingError,
    load_rules,
    mesh_text,
    parse_mesh,
)
from grok.planning import aot
from grok.planning.roofline import DecodeRoofline, ideal_decode_bytes
from grok.planning.targets import TARGETS, Target
from grok.planning.traffic import count_traffic
from grok.serving.engine import PREFILL_CHUNK
from grok.serving.prefix_cache import DEFAULT_BLOCK_SIZE, bytes_per_block, default_bytes

# Memory of common accelerators, GiB: TPU v5e, A10/L4 (24), v4 and V100 (32), A100 (40/80),
# L40S/A6000 (48), H20 (96), H200 (141).
DEVICE_SIZES_GB = (16, 24, 32, 40, 48, 80, 96, 141)
GIB = 1 << 30


def recommend(config: GrokConfig, devices: int) -> tuple[str, dict[str, int]]:
    """The default (rules, mesh) for `devices` devices: attention and the KV cache split over
    `model` as far as the kv heads allow (gcd with num_kv_heads: whole heads, nothing repeated),
    the experts further over `expert` (gcd with num_experts), and whatever is left over `data`.
    For Grok-1: up to 8 devices all on `model` (tensor_parallel), 16-64 as expert=N/8 x model=8."""
    tp = math.gcd(devices, config.num_kv_heads)
    ep = math.gcd(devices // tp, config.num_experts)
    dp = devices // (tp * ep)
    if ep == 1:
        return "tensor_parallel", {"data": dp, "model": tp}
    return "expert_tensor_parallel", {"data": dp, "expert": ep, "model": tp}


def choose_layout(
    config: GrokConfig, devices: int, rules: str | None = None, mesh: str | None = None
) -> tuple[PartitionRules, dict[str, int]]:
    """The rules and mesh shape for --rules and --mesh as given (either may be None):
    - neither: `recommend`;
    - rules only: every device on `model` for (data, model) rules, else the recommended mesh when
      its axes are the rules' (otherwise --mesh is required);
    - mesh only: the recommended rules if the mesh has their axes, else the shipped rules whose
      axes the mesh names (tensor_parallel for data and model).
    Errors name the flags; the mesh must cover all `devices`."""
    recommended, shape = recommend(config, devices)
    if rules is None and mesh is None:
        return load_rules(recommended), shape
    if rules is not None:
        loaded = load_rules(rules)
        if mesh is not None:
            return loaded, parse_mesh(mesh, loaded)
        if loaded.axes == ("data", "model"):
            return loaded, {"data": 1, "model": devices}
        if tuple(shape) == loaded.axes:
            return loaded, shape
        raise ShardingError(
            f"--rules {rules}: give --mesh with its axes ({', '.join(loaded.axes)}) for {devices} devices"
        )
    axes = set(parse_mesh(mesh))
    for loaded in map(load_rules, (recommended, "tensor_parallel", "expert_tensor_parallel")):
        if set(loaded.axes) == axes:
            return loaded, parse_mesh(mesh, loaded)
    raise ShardingError(f"--mesh {mesh!r}: no shipped rules have the axes {', '.join(sorted(axes))}; give --rules")


@dataclasses.dataclass
class Plan:
    """Per-device bytes of one layout; temporaries are the larger of the two programs'."""

    devices: int
    mesh: dict[str, int]
    rules: str
    batch: int
    cache_len: int
    prefill_len: int
    params_bytes_per_device: int
    kv_bytes_per_device: int
    prefix_cache_bytes_per_device: int  # serve's prefix cache (`grok.serving.prefix_cache`)
    temp_bytes_per_device: int
    temp_bytes: dict[str, int]  # per program: decode, prefill
    compile_s: dict[str, float]  # lower + compile, per program
    target: str = "cpu"  # whose compiler made the programs (`grok.planning.targets`)
    device_memory_gib: float | None = None  # the target's device memory (None: any of DEVICE_SIZES_GB)
    memory_analysis: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # per program
    decode: DecodeRoofline | None = None  # the decode step's traffic (accelerator targets)
    weights: str = "int8"  # `grok.planning.aot.WEIGHT_FORMS`
    sequence_len: int = 0  # the config's whole context
    context_bytes_per_sequence: int = 0  # per device: one sequence's keys and values over sequence_len

    @property
    def total_bytes_per_device(self) -> int:
        return (self.params_bytes_per_device + self.kv_bytes_per_device + self.prefix_cache_bytes_per_device
                + self.temp_bytes_per_device)

    def fits(self) -> list[float]:
        """The device sizes (GiB) that hold the total: the target's, else those of DEVICE_SIZES_GB."""
        sizes = DEVICE_SIZES_GB if self.device_memory_gib is None else (self.device_memory_gib,)
        return [size for size in sizes if self.total_bytes_per_device <= size * GIB]

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["mesh"] = mesh_text(self.mesh)
        fields["total_bytes_per_device"] = self.total_bytes_per_device
        fields["fits_gb"] = self.fits()
        fields["decode"] = self.decode.to_dict() if self.decode else None
        return json.dumps(fields)

    def describe(self) -> str:
        """The plan as a person reads it."""
        gib = lambda n: f"{n / GIB:8.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:8.2f} MiB"
        lines = [
            f"Layout: --mesh {mesh_text(self.mesh)} --rules {self.rules} ({self.devices} devices)",
            f"Serving: batch {self.batch}, {self.cache_len}-token caches, prefill chunks of {self.prefill_len} tokens, "
            f"{'8-bit matrices' if self.weights == 'int8' else 'bf16 weights'}",
            "Per device:",
            f"  parameters   {gib(self.params_bytes_per_device)}",
            f"  KV cache     {gib(self.kv_bytes_per_device)}",
            f"  prefix cache {gib(self.prefix_cache_bytes_per_device)}   (serve --prefix-cache-mb)",
            f"  temporaries  {gib(self.temp_bytes_per_device)}   (decode {gib(self.temp_bytes['decode']).strip()}, "
            f"prefill {gib(self.temp_bytes['prefill']).strip()}; "
            f"{'an estimate by XLA:CPU' if self.target == 'cpu' else f'the {self.target} compiler'})",
            f"  total        {gib(self.total_bytes_per_device)}",
            f"Compiled in {self.compile_s['decode']:.1f} s (decode) and {self.compile_s['prefill']:.1f} s (prefill).",
        ]
        if self.sequence_len > self.cache_len:
            lines.append(f"A whole {self.sequence_len}-token context would cost {gib(self.context_bytes_per_sequence).strip()} "
                         "of KV cache per sequence per device.")
        if self.decode is not None:
            lines += self.decode.describe()
        fits = self.fits()
        if self.device_memory_gib is not None:
            verdict = "Fits" if fits else "WARNING: does not fit"
            lines.append(f"{verdict} the {self.target}'s {self.device_memory_gib:g} GiB per device.")
        elif fits:
            spare = fits[0] * GIB - self.total_bytes_per_device
            lines.append(
                f"Fits devices of {', '.join(f'{s} GB' for s in fits)} "
                f"(the smallest with {spare / GIB:.1f} GiB spare for the runtime)."
            )
        else:
            lines.append(
                f"WARNING: fits none of {', '.join(f'{s} GB' for s in DEVICE_SIZES_GB)}: use more devices, "
                "a smaller --batch or --cache-len."
            )
        return "\n".join(lines)


def _bytes_per_device(tree, shardings) -> int:
    """Bytes each device holds of a tree of ShapeDtypeStructs under matching NamedShardings."""
    leaves = jax.tree.leaves(tree)
    return sum(
        math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for leaf, sharding in zip(leaves, jax.tree.leaves(shardings))
    )


def make_plan(
    config: GrokConfig, sharder: Sharder, batch: int, cache_len: int, prefill_len: int = PREFILL_CHUNK,
    prefix_cache_bytes: int | None = None, target: Target = TARGETS["cpu"], weights: str = "int8",
) -> Plan:
    """Count and compile (abstractly) the layout `sharder` gives `config` for this serving shape.
    `prefix_cache_bytes` is the prefix cache's memory in all (default: serve's, a share of the
    KV cache's); the plan holds each device's part of it. `target`: whose compiler compiles the
    programs (the sharder's mesh must hold its devices); an accelerator's plan also counts the
    decode step's traffic against its ideal (`grok.planning.roofline`). `weights`: "int8" (8-bit
    matrices, other tensors in the release's dtype) or "bf16" (every weight bf16, Grok-2 as released)."""
    source = Path(sharder.rules.source)
    rules_name = source.stem if source.parent == RULES_DIR else str(source)
    with tracing_for(target.platform):
        params = aot.abstract_params(config, sharder, weights)
    params_bytes = _bytes_per_device(params, jax.tree.map(lambda leaf: leaf.sharding, params))
    cache = jax.ShapeDtypeStruct(transformer.cache_shape(config, batch, cache_len, sharder.cache_heads(config)), transformer.DTYPE)
    kv_bytes = 2 * _bytes_per_device(cache, sharder.cache_sharding(cache.shape))  # keys and values
    context = jax.ShapeDtypeStruct(transformer.cache_shape(config, 1, config.sequence_len, sharder.cache_heads(config)),
                                   transformer.DTYPE)
    context_bytes = 2 * _bytes_per_device(context, sharder.cache_sharding(context.shape))
    heads, block = sharder.cache_heads(config), DEFAULT_BLOCK_SIZE
    if prefix_cache_bytes is None:
        prefix_cache_bytes = default_bytes(config, batch, cache_len, heads, transformer.DTYPE)
    blocks = prefix_cache_bytes // bytes_per_block(config, block, heads, transformer.DTYPE)
    store = jax.ShapeDtypeStruct(transformer.cache_shape(config, blocks, block, heads), transformer.DTYPE)
    prefix_bytes = 2 * _bytes_per_device(store, sharder.cache_sharding(store.shape)) if blocks else 0
    temp, seconds, analysis, decode = {}, {}, {}, None
    cache_dtype = transformer.WORDS if target.platform == "cpu" else transformer.DTYPE
    with tracing_for(target.platform):
        steps = aot.engine_steps(config, sharder, batch, cache_len, min(prefill_len, cache_len), cache_dtype, weights)
    for name, step in steps.items():
        start = time.perf_counter()
        compiled = step.lowered.compile(compiler_options=target.compiler_options())
        seconds[name] = step.lower_s + time.perf_counter() - start
        stats = compiled.memory_analysis()
        analysis[name] = {f"{k}_bytes": getattr(stats, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp")}
        temp[name] = stats.temp_size_in_bytes
        if name == "decode" and target.platform != "cpu":
            params, memory = step.args[:2]
            ideal = ideal_decode_bytes(config, params, (memory.k, memory.v), batch)
            decode = DecodeRoofline.of(count_traffic(compiled.as_text()), ideal, batch, target.bandwidth)
    return Plan(
        devices=sharder.mesh.size,
        mesh=dict(sharder.mesh.shape),
        rules=rules_name,
        batch=batch,
        cache_len=cache_len,
        prefill_len=min(prefill_len, cache_len),
        params_bytes_per_device=params_bytes,
        kv_bytes_per_device=kv_bytes,
        prefix_cache_bytes_per_device=prefix_bytes,
        temp_bytes_per_device=max(temp.values()),
        temp_bytes=temp,
        compile_s=seconds,
        target=target.name,
        device_memory_gib=None if target.platform == "cpu" else target.memory_gib,
        memory_analysis=analysis,
        decode=decode,
        weights=weights,
        sequence_len=config.sequence_len,
        context_bytes_per_sequence=context_bytes,
    )
