"""Partition rules (regex -> PartitionSpec, kept in `partition_rules/*.toml`), meshes, and shardings.

A rules file has two tables (see partition_rules/README.md):
- `[params]`: regex over a model parameter path (`transformer/decoder_layer/moe/linear/w`) ->
  one entry per dimension of the weight as stored per layer; the stacked layer axis is added here.
- `[activations]`: a named activation or cache tensor -> one entry per dimension.
A dimension entry is a mesh axis ("data", "model"), a list of axes, or "-" (not split); an empty
list means the tensor is not split at all, whatever its rank.
Matching is strict: a parameter no rule matches, a rule that matches nothing, an unknown axis or a
split that does not divide its dimension is an error naming the file, the rule and the parameter.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from grok.quant import QuantizedWeight8bit

RULES_DIR = Path(__file__).resolve().parent.parent / "partition_rules"
MESH_AXES = ("data", "model")
UNSPLIT = "-"
_STACKED_LAYERS = "transformer/decoder_layer/"

# Activation and cache tensors the model constrains, with the dimensions each spec must cover.
ACTIVATIONS = {
    "tokens": "[batch, time]",
    "residual": "[batch, time, emb]",
    "heads": "[batch, time, heads, head_size] (queries, keys, values and attention output)",
    "kv_cache": "[batch, kv_heads, cache_len, head_size] (one layer's keys or values)",
    "logits": "[batch, time, vocab]",
}


class ShardingError(ValueError):
    """A partition-rules file, mesh or spec that cannot shard this model."""


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    spec: PartitionSpec


@dataclasses.dataclass(frozen=True)
class PartitionRules:
    source: str  # the file the rules came from, for error messages
    params: tuple[Rule, ...]
    activations: dict[str, PartitionSpec]


def _spec(entries, where: str) -> PartitionSpec:
    if not isinstance(entries, list):
        raise ShardingError(f"{where}: a spec must be a list with one entry per dimension, got {entries!r}")
    dims = []
    for entry in entries:
        axes = entry if isinstance(entry, list) else [entry]
        for axis in axes:
            if not isinstance(axis, str):
                raise ShardingError(f"{where}: spec entry {axis!r} is not an axis name or {UNSPLIT!r}")
            if axis != UNSPLIT and axis not in MESH_AXES:
                raise ShardingError(f"{where}: unknown mesh axis {axis!r} (the mesh axes are {MESH_AXES})")
        if entry == UNSPLIT:
            dims.append(None)
        elif isinstance(entry, list):
            dims.append(tuple(entry))
        else:
            dims.append(entry)
    return PartitionSpec(*dims)


def load_rules(name_or_path: str | os.PathLike) -> PartitionRules:
    """Rules from a shipped name (`tensor_parallel`, ...) or a path to a .toml file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RULES_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            shipped = sorted(p.stem for p in RULES_DIR.glob("*.toml"))
            raise ShardingError(f"unknown partition rules {str(name_or_path)!r}: shipped ones are {shipped}")
    if not path.is_file():
        raise ShardingError(f"partition rules file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ShardingError(f"{path}: not valid TOML: {err}") from None
    unknown = set(data) - {"params", "activations"}
    if unknown or "params" not in data or "activations" not in data:
        raise ShardingError(f"{path}: expected exactly the tables [params] and [activations]")
    rules = []
    for pattern, entries in data["params"].items():
        where = f"{path}: rule {pattern!r}"
        try:
            re.compile(pattern)
        except re.error as err:
            raise ShardingError(f"{where}: regex does not compile: {err}") from None
        rules.append(Rule(pattern, _spec(entries, where)))
    activations = {}
    for name, entries in data["activations"].items():
        if name not in ACTIVATIONS:
            raise ShardingError(f"{path}: unknown activation {name!r} (known: {', '.join(ACTIVATIONS)})")
        activations[name] = _spec(entries, f"{path}: activation {name!r}")
    missing = sorted(set(ACTIVATIONS) - set(activations))
    if missing:
        raise ShardingError(f"{path}: no spec for activation(s) {', '.join(missing)}")
    return PartitionRules(source=str(path), params=tuple(rules), activations=activations)


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=1,model=8"` -> {"data": 1, "model": 8}; both axes must be given."""
    sizes = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1 or name in sizes:
            raise ShardingError(f"--mesh {text!r}: expected data=N,model=M with positive integers")
        sizes[name] = int(value)
    if set(sizes) != set(MESH_AXES):
        raise ShardingError(f"--mesh {text!r}: give both axes, e.g. data=1,model=8")
    return sizes


def make_mesh(data: int | None = None, model: int | None = None, devices=None) -> Mesh:
    """A (data, model) mesh over all devices of all processes; by default everything on `model`."""
    devices = list(jax.devices() if devices is None else devices)
    if data is None and model is None:
        data, model = 1, len(devices)
    data = data or len(devices) // model
    model = model or len(devices) // data
    if data * model != len(devices):
        raise ShardingError(f"mesh data={data},model={model} needs {data * model} devices, there are {len(devices)}")
    return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


class Sharder:
    """Partition rules applied to a mesh: parameter shardings and activation constraints."""

    def __init__(self, rules: PartitionRules, mesh: Mesh):
        self.rules = rules
        self.mesh = mesh

    def _named(self, spec: PartitionSpec, shape: tuple[int, ...], what: str) -> NamedSharding:
        """`spec` on the mesh, checked against `shape`; an empty spec means "not split", for any rank."""
        if len(spec) and len(spec) != len(shape):
            raise ShardingError(
                f"{self.rules.source}: {what}: spec {tuple(spec)} has {len(spec)} entries for a tensor of "
                f"shape {shape}"
            )
        for size, axes in zip(shape, spec):
            if size % self._split(axes):
                raise ShardingError(
                    f"{self.rules.source}: {what}: dimension of size {size} of shape {shape} cannot be split "
                    f"{self._split(axes)} ways over {axes} (mesh {dict(self.mesh.shape)})"
                )
        return NamedSharding(self.mesh, spec)

    def param_shardings(self, shapes: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
        """Shardings for a model tree of shapes (from `grok.weights.model_shapes`), rule-checked."""
        used = set()
        out = {}
        for path, leaves in shapes.items():
            out[path] = {}
            for name, leaf in leaves.items():
                full = f"{path}/{name}"
                rule = next((r for r in self.rules.params if re.search(r.pattern, full)), None)
                if rule is None:
                    raise ShardingError(f"{self.rules.source}: no rule matches parameter {full}")
                used.add(rule.pattern)
                out[path][name] = self._param_sharding(rule, full, leaf)
        unused = [r.pattern for r in self.rules.params if r.pattern not in used]
        if unused:
            raise ShardingError(f"{self.rules.source}: rule {unused[0]!r} matches no parameter")
        return out

    def _param_sharding(self, rule: Rule, full: str, leaf):
        what = f"rule {rule.pattern!r} for parameter {full}"
        stacked = full.startswith(_STACKED_LAYERS)
        shape = tuple(leaf.shape)[1:] if stacked else tuple(leaf.shape)
        if len(rule.spec) and len(rule.spec) != len(shape):
            raise ShardingError(
                f"{self.rules.source}: {what}: spec has {len(rule.spec)} entries, the weight has {len(shape)} "
                f"dimensions (shape {shape} per layer)"
            )
        spec = PartitionSpec(None, *rule.spec) if stacked and len(rule.spec) else rule.spec
        if not isinstance(leaf, QuantizedWeight8bit):
            return self._named(spec, tuple(leaf.shape), what)
        weight = self._named(spec, tuple(leaf.weight.shape), what)
        if not len(spec):
            return QuantizedWeight8bit(weight=weight, scales=weight)
        # Scales [..., blocks, out]: split the block axis like the input rows when it divides evenly
        # (one block per shard group), else keep every block on every device (they are small).
        *lead, rows, cols = spec
        blocks = leaf.scales.shape[-2]
        scales_spec = PartitionSpec(*lead, rows if blocks % self._split(rows) == 0 and blocks > 1 else None, cols)
        return QuantizedWeight8bit(weight=weight, scales=self._named(scales_spec, tuple(leaf.scales.shape), what))

    def activation(self, name: str, shape: tuple[int, ...]) -> NamedSharding:
        """The named activation's sharding for `shape`.

        Its leading (batch) dimension stays whole when it does not divide over its axes (a single
        sequence being prefilled on a mesh with data > 1); every other dimension must divide.
        """
        spec = self.rules.activations[name]
        if len(spec) and shape and shape[0] % self._split(spec[0]):
            spec = PartitionSpec(None, *spec[1:])
        return self._named(spec, shape, f"activation {name!r}")

    def check_activations(self, config) -> None:
        """Fail early (before loading weights) if a named activation of `config` cannot be laid out."""
        c = config
        shapes = {
            "residual": (1, 1, c.emb_size),
            "heads": (1, 1, c.num_kv_heads, c.key_size),
            "kv_cache": (1, c.num_kv_heads, 1, c.key_size),
            "logits": (1, 1, c.vocab_size),
        }
        self.activation("heads", (1, 1, c.num_q_heads, c.key_size))
        for name, shape in shapes.items():
            self.activation(name, shape)

    def _split(self, axes) -> int:
        """How many ways a spec entry splits its dimension."""
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        return int(np.prod([self.mesh.shape[a] for a in names]))

    def constrain(self, x: jax.Array, name: str) -> jax.Array:
        """Pin an activation to its rule's sharding (inside jit)."""
        return jax.lax.with_sharding_constraint(x, self.activation(name, tuple(x.shape)))

    def put(self, x: np.ndarray, name: str) -> jax.Array:
        """Place a host array, identical on every process, as the named activation."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, self.activation(name, x.shape), lambda index: x[index])

    def cache_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """The layout of one layer's key or value cache [b, kv, s, d] (`grok.model.cache_shape`), or
        of all layers' stacked [layers, b, kv, s, d]: every layer laid out as `kv_cache`."""
        spec = self.rules.activations["kv_cache"]
        per_layer = self._named(spec, shape[-4:], "activation 'kv_cache'")
        stacked = len(shape) - 4
        return NamedSharding(self.mesh, PartitionSpec(*[None] * stacked, *per_layer.spec) if len(spec) else PartitionSpec())

    def zeros_cache(self, shape: tuple[int, ...], dtype=jnp.bfloat16) -> jax.Array:
        """A key or value cache of zeros, made in place on its devices (`cache_sharding`)."""
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.cache_sharding(shape))()

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


Constrain = Callable[[jax.Array, str], jax.Array]


def single_device() -> Sharder:
    """Everything on the first device: the `replicated` rules on a 1x1 mesh."""
    return Sharder(load_rules("replicated"), make_mesh(1, 1, jax.devices()[:1]))


def no_constraint(x: jax.Array, name: str) -> jax.Array:
    """Stand-in for `Sharder.constrain` when the model runs unsharded."""
    return x
