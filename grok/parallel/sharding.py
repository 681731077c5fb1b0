"""Partition rules (regex -> PartitionSpec, kept in `partition_rules/*.toml`), meshes, and shardings.

A rules file has two tables (see partition_rules/README.md):
- `[params]`: regex over a model parameter path (`transformer/decoder_layer/moe/linear/w`) ->
  one entry per dimension of the weight as stored per layer; the stacked layer axis is added here.
- `[activations]`: a named activation or cache tensor -> one entry per dimension.
- `[mesh]` (optional): `axes = ["data", "expert", "model"]`, the mesh axes the file uses, in mesh
  order (default `["data", "model"]`); `--mesh` must give exactly these.
A dimension entry is a mesh axis, a list of axes, or "-" (not split); an empty list means the
tensor is not split at all, whatever its rank.
Matching is strict: a parameter no rule matches, a rule that matches nothing, an unknown axis or a
weight split that does not divide its dimension is an error naming the file, the rule and the
parameter. Activations bend where they must (`Sharder.activation`): a batch or head dimension that
does not divide over its axes stays whole, and key/value heads are repeated over a model axis
larger than their count (`Sharder.cache_heads`). Both change only where numbers live, never the numbers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from grok.model.quant import QuantizedWeight8bit
from grok.model.weights import model_shapes

RULES_DIR = Path(__file__).resolve().parents[2] / "partition_rules"
MESH_AXES = ("data", "model")  # the axes of a rules file with no [mesh] table
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


# The head dimension of the activations that carry one (see `Sharder.activation`).
_HEAD_DIM = {"heads": 2, "kv_cache": 1}


class ShardingError(ValueError):
    """A partition-rules file, mesh or spec that cannot shard this model."""


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    spec: PartitionSpec
    optional: bool = False  # from `[optional_params]`: may match no parameter (one only some models have)


@dataclasses.dataclass(frozen=True)
class PartitionRules:
    source: str  # the file the rules came from, for error messages
    axes: tuple[str, ...]  # the mesh axes, in mesh order
    params: tuple[Rule, ...]
    activations: dict[str, PartitionSpec]


def _spec(entries, where: str, mesh_axes: tuple[str, ...]) -> PartitionSpec:
    if not isinstance(entries, list):
        raise ShardingError(f"{where}: a spec must be a list with one entry per dimension, got {entries!r}")
    dims = []
    for entry in entries:
        axes = entry if isinstance(entry, list) else [entry]
        for axis in axes:
            if not isinstance(axis, str):
                raise ShardingError(f"{where}: spec entry {axis!r} is not an axis name or {UNSPLIT!r}")
            if axis != UNSPLIT and axis not in mesh_axes:
                raise ShardingError(f"{where}: unknown mesh axis {axis!r} (the file's mesh axes are {mesh_axes})")
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
    unknown = set(data) - {"params", "optional_params", "activations", "mesh"}
    if unknown or "params" not in data or "activations" not in data:
        raise ShardingError(
            f"{path}: expected the tables [params] and [activations], and optionally [mesh] and [optional_params]"
        )
    axes = _mesh_axes(data.get("mesh", {"axes": list(MESH_AXES)}), path)
    rules = []  # the optional ones first: they name parameters only some models have, more precisely
    for table, optional in (("optional_params", True), ("params", False)):
        if not isinstance(data.get(table, {}), dict):
            raise ShardingError(f"{path}: [{table}] must be a table of regex = spec")
        for pattern, entries in data.get(table, {}).items():
            where = f"{path}: rule {pattern!r}"
            try:
                re.compile(pattern)
            except re.error as err:
                raise ShardingError(f"{where}: regex does not compile: {err}") from None
            rules.append(Rule(pattern, _spec(entries, where, axes), optional))
    activations = {}
    for name, entries in data["activations"].items():
        if name not in ACTIVATIONS:
            raise ShardingError(f"{path}: unknown activation {name!r} (known: {', '.join(ACTIVATIONS)})")
        activations[name] = _spec(entries, f"{path}: activation {name!r}", axes)
    missing = sorted(set(ACTIVATIONS) - set(activations))
    if missing:
        raise ShardingError(f"{path}: no spec for activation(s) {', '.join(missing)}")
    return PartitionRules(source=str(path), axes=axes, params=tuple(rules), activations=activations)


def _mesh_axes(table, path: Path) -> tuple[str, ...]:
    """The `[mesh]` table's `axes`: distinct identifiers, at least one."""
    axes = table.get("axes") if isinstance(table, dict) else None
    if (
        set(table) != {"axes"}
        or not isinstance(axes, list)
        or not axes
        or not all(isinstance(a, str) and a.isidentifier() for a in axes)
        or len(set(axes)) != len(axes)
    ):
        raise ShardingError(f'{path}: [mesh] must be `axes = ["data", "model", ...]`, distinct axis names')
    return tuple(axes)


def mesh_text(shape: dict[str, int]) -> str:
    """{"data": 1, "model": 8} -> "data=1,model=8" (what --mesh takes)."""
    return ",".join(f"{name}={size}" for name, size in shape.items())


def parse_mesh(text: str, rules: PartitionRules | None = None) -> dict[str, int]:
    """`"data=1,model=8"` -> {"data": 1, "model": 8}, in the mesh order of `rules`' axes, every one
    of which must be given (without rules, any axis names)."""
    sizes = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if not name.isidentifier() or not value.strip().isdigit() or int(value) < 1 or name in sizes:
            raise ShardingError(f"--mesh {text!r}: expected AXIS=N pairs with positive sizes, e.g. data=1,model=8")
        sizes[name] = int(value)
    if rules is None:
        return sizes
    if set(sizes) != set(rules.axes):
        example = mesh_text({axis: sizes.get(axis, 1) for axis in rules.axes})
        raise ShardingError(
            f"--mesh {text!r} does not match {rules.source}, whose mesh axes are {', '.join(rules.axes)}: "
            f"give each of them once, e.g. --mesh {example}"
        )
    return {axis: sizes[axis] for axis in rules.axes}


def mesh_of(shape: dict[str, int], devices=None) -> Mesh:
    """A mesh with these axis sizes (in this order) over `devices`, by default every device of every
    process; the sizes must multiply to the device count."""
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(shape.values()) != len(devices):
        raise ShardingError(
            f"mesh {mesh_text(shape)} needs {math.prod(shape.values())} devices, there are {len(devices)}"
        )
    return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def make_mesh(data: int | None = None, model: int | None = None, devices=None) -> Mesh:
    """A (data, model) mesh, for tests and tools: over the first data*model of `devices` (default:
    every device of every process) when both sizes are given, else over all of them (by default
    all on `model`). `mesh_of` is the strict form the command line uses."""
    devices = list(jax.devices() if devices is None else devices)
    if data is not None and model is not None:
        if data * model > len(devices):
            raise ShardingError(f"mesh data={data},model={model} needs {data * model} devices, there are {len(devices)}")
        devices = devices[: data * model]
    elif data is None and model is None:
        data, model = 1, len(devices)
    data = data or len(devices) // model
    model = model or len(devices) // data
    return mesh_of({"data": data, "model": model}, devices)


class Sharder:
    """Partition rules applied to a mesh: parameter shardings and activation constraints."""

    def __init__(self, rules: PartitionRules, mesh: Mesh):
        if tuple(mesh.axis_names) != rules.axes:
            raise ShardingError(
                f"mesh {mesh_text(dict(mesh.shape))} does not match {rules.source}, whose mesh axes are "
                f"{', '.join(rules.axes)} (in that order)"
            )
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
        """Shardings for a model tree of shapes (from `grok.model.weights.model_shapes`), rule-checked."""
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
        unused = [r.pattern for r in self.rules.params if r.pattern not in used and not r.optional]
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

        Two dimensions stay whole when they do not divide over their axes, so that any mesh can
        run any model (GSPMD then keeps a copy on each of those devices; the numbers are the same):
        the leading batch dimension (a single sequence being prefilled on a mesh with data > 1),
        and the head dimension of `heads` and `kv_cache` (e.g. 4 query heads on 8 model shards;
        key/value heads are first repeated where that makes them divide, see `cache_heads`).
        Every other dimension must divide.
        """
        spec = self.rules.activations[name]
        if len(spec) == len(shape):
            bendable = (0, _HEAD_DIM.get(name, 0))
            spec = PartitionSpec(*(None if i in bendable and shape[i] % self._split(axes) else axes
                                   for i, axes in enumerate(spec)))
        return self._named(spec, shape, f"activation {name!r}")

    def cache_heads(self, config) -> int:
        """Key/value heads per sequence in the cache and the attention: num_kv_heads, or a multiple
        of it when the cache's head axis is split over more devices than there are kv heads.

        Then each kv head is repeated (its keys, values and cache rows, as vLLM does when tensor
        parallelism exceeds the kv heads), so every device holds whole heads and each query head
        still meets its own kv head: copy j of head i serves query heads (i*r + j)*G/r .. +G/r.
        That needs the repeat r to divide G (query heads per kv head) and the head axes of `heads`
        to divide the repeated count; otherwise the heads stay whole (`activation`).
        """
        kv, heads, g = config.num_kv_heads, config.num_q_heads, config.heads_per_kv_head
        cache_split = self._split(self._dim_axes("kv_cache", _HEAD_DIM["kv_cache"]))
        heads_split = self._split(self._dim_axes("heads", _HEAD_DIM["heads"]))
        if kv % cache_split == 0 or cache_split % kv:
            return kv
        repeat = cache_split // kv
        if g % repeat or (kv * repeat) % heads_split or heads % heads_split:
            return kv
        return kv * repeat

    def _dim_axes(self, name: str, dim: int):
        spec = self.rules.activations[name]
        return spec[dim] if len(spec) else None

    def check_activations(self, config) -> None:
        """Fail early (before loading weights) if a named activation of `config` cannot be laid out."""
        c = config
        shapes = {
            "residual": (1, 1, c.emb_size),
            "heads": (1, 1, self.cache_heads(c), c.key_size),
            "kv_cache": (1, self.cache_heads(c), 1, c.key_size),
            "logits": (1, 1, c.vocab_size),
        }
        self.activation("heads", (1, 1, c.num_q_heads, c.key_size))
        for name, shape in shapes.items():
            self.activation(name, shape)

    def _split(self, axes) -> int:
        """How many ways a spec entry splits its dimension."""
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        return int(np.prod([self.mesh.shape[a] for a in names]))

    def expert_specs(self, config) -> tuple[QuantizedWeight8bit, ...]:
        """The per-layer PartitionSpecs of the expert weights (linear, linear_v, linear_1), each a
        `QuantizedWeight8bit` of the weight's and the scales' specs, as the rules place them."""
        shapes = model_shapes(config)
        shardings = self.param_shardings(shapes)
        per_layer = lambda sharding: PartitionSpec(*tuple(sharding.spec)[1:])
        return tuple(
            jax.tree.map(per_layer, shardings[f"{_STACKED_LAYERS}moe/{name}"]["w"])
            for name in ("linear", "linear_v", "linear_1")
        )

    def splits_experts(self) -> bool:
        """Whether the rules split the expert axis of the expert weights over more than one device
        (expert parallelism)."""
        path = "transformer/decoder_layer/moe/linear/w"
        rule = next((r for r in self.rules.params if re.search(r.pattern, path)), None)
        if rule is None or not len(rule.spec) or rule.spec[0] is None:
            return False
        axes = rule.spec[0] if isinstance(rule.spec[0], tuple) else (rule.spec[0],)
        return math.prod(self.mesh.shape[a] for a in axes) > 1

    def constrain(self, x: jax.Array, name: str) -> jax.Array:
        """Pin an activation to its rule's sharding (inside jit)."""
        return jax.lax.with_sharding_constraint(x, self.activation(name, tuple(x.shape)))

    def put(self, x: np.ndarray, name: str) -> jax.Array:
        """Place a host array, identical on every process, as the named activation."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, self.activation(name, x.shape), lambda index: x[index])

    def cache_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """The layout of one layer's key or value cache [b, kv, s, d] (`grok.model.transformer.cache_shape`), or
        of all layers' stacked [layers, b, kv, s, d]: every layer laid out as `kv_cache`."""
        per_layer = self.activation("kv_cache", shape[-4:]).spec
        stacked = len(shape) - 4
        return NamedSharding(self.mesh, PartitionSpec(*[None] * stacked, *per_layer) if len(per_layer) else PartitionSpec())

    def zeros_cache(self, shape: tuple[int, ...], dtype=jnp.bfloat16) -> jax.Array:
        """A key or value cache of zeros, made in place on its devices (`cache_sharding`)."""
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.cache_sharding(shape))()

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def single_device() -> Sharder:
    """Everything on the first device: the `replicated` rules on a 1x1 mesh."""
    return Sharder(load_rules("replicated"), make_mesh(1, 1, jax.devices()[:1]))
