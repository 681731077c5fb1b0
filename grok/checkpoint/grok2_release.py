"""Grok-2's release checkpoint as xai-org/grok-2 publishes it, read as this engine's model tree.

The release is bf16 safetensors with Hugging Face names, laid out for 8-way tensor parallelism:
`*-TP-common.safetensors` files hold every tensor whole but the experts', and each of
`*-TP-000.safetensors` .. `*-TP-007.safetensors` holds every expert's rank-r slice of its hidden
width (w1 and w3 [F/8, D], rows 2048r..; w2 [D, F/8], the same columns). Matrices are stored
[out, in] (PyTorch's `Linear`), the model's are [in, out].

Every weight comes out as a lazy source (`shape`, `dtype`, `source[index]`), composed of the files'
`StoredArray`s: transposed, the TP slices concatenated and the experts stacked on demand, so a
process reads only the bytes of the slices its devices hold, and nothing holds a whole file or a
whole expert stack. With `quantize`, each matrix comes out as a `QuantizedWeight8bit`: symmetric
int8 with one bf16 scale per output column (max |w| / 127 over the column), computed from the
columns a slice covers. Embeddings, norms and the router stay as released (bf16).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Sequence

import jax
import ml_dtypes
import numpy as np

from grok.checkpoint.files import CheckpointError, Weight, check_weight
from grok.checkpoint.safetensors_format import StoredArray, open_file
from grok.model.quant import QuantizedWeight8bit

COMMON = re.compile(r".*-TP-common\.safetensors$")
RANK = re.compile(r".*-TP-(\d{3})\.safetensors$")
BF16 = np.dtype(ml_dtypes.bfloat16)
_LAYER = re.compile(r"^transformer/decoder_layer_(\d+)/(.+)$")
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.")
_NORMS = {"rms_norm": "pre_attn_norm", "rms_norm_1": "post_attn_norm", "rms_norm_2": "pre_moe_norm",
          "rms_norm_3": "post_moe_norm"}
_LINEARS = {  # model module (in a layer) -> the release's name, stored [out, in]
    "multi_head_attention/query": "self_attn.q_proj", "multi_head_attention/key": "self_attn.k_proj",
    "multi_head_attention/value": "self_attn.v_proj", "multi_head_attention/linear": "self_attn.o_proj",
    "dense_mlp/linear": "mlp.gate_proj", "dense_mlp/linear_v": "mlp.up_proj", "dense_mlp/linear_1": "mlp.down_proj",
    "router": "block_sparse_moe.gate",
}
_EXPERTS = {"moe/linear": ("w1", 0), "moe/linear_v": ("w3", 0), "moe/linear_1": ("w2", 1)}  # name, TP-split axis
_GLOBAL = {"language_model/in_out_embed/embeddings": "model.embed_tokens.weight",
           "language_model/in_out_embed/unembeddings": "lm_head.weight",
           "language_model/rms_norm/scale": "model.norm.weight"}


def is_release(directory: Path) -> bool:
    """Whether `directory` holds Grok-2's release files (a `*-TP-common.safetensors`)."""
    return any(COMMON.match(path.name) for path in directory.iterdir())


class Release:
    """A release directory's tensors by name: each common one once, each expert one per TP rank."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.common: dict[str, StoredArray] = {}
        self.ranked: dict[str, dict[int, StoredArray]] = {}
        for path in sorted(directory.iterdir()):
            rank = RANK.match(path.name)
            if not (rank or COMMON.match(path.name)):
                continue
            stored = open_file(path)
            for key in stored.keys():
                if rank:
                    self.ranked.setdefault(key, {})[int(rank.group(1))] = stored.array(key)
                else:
                    self.common[key] = stored.array(key)
        self.experts: dict[int, set[int]] = {}  # layer -> its experts, from the TP files' tensor names
        for key in self.ranked:
            match = _EXPERT_KEY.match(key)
            if match:
                self.experts.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
        ranks = {r for parts in self.ranked.values() for r in parts}
        self.ranks = max(ranks, default=-1) + 1
        missing = sorted(set(range(self.ranks)) - ranks)
        if missing:
            raise CheckpointError(f"{directory}: no *-TP-{missing[0]:03d}.safetensors (TP rank {missing[0]} of "
                                  f"{self.ranks}), which holds a slice of every expert")

    def tensor(self, key: str):
        if key not in self.common:
            raise CheckpointError(f"{self.directory}: no tensor {key} in its *-TP-common.safetensors files")
        return self.common[key]

    def slices(self, key: str, axis: int):
        """An expert tensor from its TP slices, joined along `axis`."""
        parts = self.ranked.get(key, {})
        if len(parts) != self.ranks:
            raise CheckpointError(f"{self.directory}: {key} is in {len(parts)} of the {self.ranks} TP files")
        return Concatenated([parts[r] for r in range(self.ranks)], axis)

    def source(self, name: str):
        """The lazy source of model checkpoint-tree parameter `name` (e.g. `transformer/decoder_layer_3/moe/linear/w`)."""
        if name in _GLOBAL:
            return self.tensor(_GLOBAL[name])
        match = _LAYER.match(name)
        if match is None:
            raise CheckpointError(f"the Grok-2 release has no tensor for parameter {name}")
        layer, rest = int(match.group(1)), match.group(2)
        module, leaf = rest.rsplit("/", 1)
        prefix = f"model.layers.{layer}"
        if module in _NORMS:
            return self.tensor(f"{prefix}.{_NORMS[module]}.weight")
        if module in _LINEARS:
            return Transposed(self.tensor(f"{prefix}.{_LINEARS[module]}.weight"))
        if module in _EXPERTS:
            part, axis = _EXPERTS[module]
            experts = sorted(self.experts.get(layer, ()))
            if not experts:
                raise CheckpointError(f"{self.directory}: no expert tensors of layer {layer} in its TP files")
            return Stacked([Transposed(self.slices(f"{prefix}.block_sparse_moe.experts.{e}.{part}.weight", axis))
                            for e in experts])
        raise CheckpointError(f"the Grok-2 release has no tensor for parameter {name}")


def iter_weights(
    directory: Path, names: Sequence[str], expected: Sequence, quantize: bool
) -> Iterator[tuple[str, Weight]]:
    """(parameter name, lazy weight) for each of `names`, checked against `expected` (bf16 floats, or
    8-bit ones for the matrices when quantizing)."""
    release = Release(directory)
    for name, want in zip(names, expected):
        source = release.source(name)
        weight = quantized(source) if quantize and isinstance(want, QuantizedWeight8bit) else source
        check_weight(f"{directory} ({name})", want, weight)
        yield name, weight


def expected_release(expected: Sequence, quantize: bool) -> list:
    """What the release holds for each expected weight: bf16 floats, 8-bit matrices when quantizing."""

    def one(want):
        if isinstance(want, QuantizedWeight8bit):
            return want if quantize else jax.ShapeDtypeStruct(want.shape, BF16)
        return jax.ShapeDtypeStruct(want.shape, BF16)

    return [one(want) for want in expected]


# ------------------------------------------------------------------------------ lazy sources


def _slices(index, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """`index` (as JAX or NumPy write it: slices, maybe fewer than dimensions, or ...) as one plain
    slice per dimension."""
    index = index if isinstance(index, tuple) else (index,)
    if any(part is Ellipsis for part in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1 :]
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for part, size in zip(index, shape):
        if not isinstance(part, slice) or part.step not in (None, 1):
            raise IndexError(f"a release tensor is read by slices, not {part!r}")
        start, stop, _ = part.indices(size)
        out.append(slice(start, max(start, stop)))
    return tuple(out)


class _Lazy:
    """Shape, dtype and whole reads for a lazy source; subclasses read `[index]`."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[...]
        return array if dtype is None else array.astype(dtype)


class Transposed(_Lazy):
    """A stored [out, in] matrix read as [in, out]."""

    def __init__(self, source):
        self.source, self.shape, self.dtype = source, tuple(reversed(source.shape)), source.dtype

    def __getitem__(self, index) -> np.ndarray:
        rows, cols = _slices(index, self.shape)
        return np.ascontiguousarray(np.asarray(self.source[cols, rows]).T)


class Concatenated(_Lazy):
    """Sources joined along `axis`, each read only where an index reaches it."""

    def __init__(self, parts: Sequence, axis: int):
        self.parts, self.axis, self.dtype = list(parts), axis, parts[0].dtype
        shape = list(parts[0].shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        self.shape = tuple(shape)

    def __getitem__(self, index) -> np.ndarray:
        index = _slices(index, self.shape)
        want, pieces, start = index[self.axis], [], 0
        for part in self.parts:
            stop = start + part.shape[self.axis]
            lo, hi = max(want.start, start), min(want.stop, stop)
            if lo < hi:
                local = list(index)
                local[self.axis] = slice(lo - start, hi - start)
                pieces.append(np.asarray(part[tuple(local)]))
            start = stop
        if not pieces:
            shape = [s.stop - s.start for s in index]
            return np.empty(shape, self.dtype)
        return np.concatenate(pieces, axis=self.axis)


class Stacked(_Lazy):
    """Sources of one shape stacked along a new first axis (the experts)."""

    def __init__(self, parts: Sequence):
        self.parts, self.dtype, self.shape = list(parts), parts[0].dtype, (len(parts), *parts[0].shape)

    def __getitem__(self, index) -> np.ndarray:
        first, *rest = _slices(index, self.shape)
        rows = [np.asarray(self.parts[e][tuple(rest)]) for e in range(first.start, first.stop)]
        if not rows:
            return np.empty([0, *(s.stop - s.start for s in rest)], self.dtype)
        return np.stack(rows)


# ------------------------------------------------------------------------------ int8 at load


def quantized(source) -> QuantizedWeight8bit:
    """`source` [..., in, out] as symmetric int8 with a bf16 scale per output column, lazily."""
    scales = _Scales(source)
    return QuantizedWeight8bit(weight=_Int8(source, scales), scales=scales)


def quantize_columns(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [..., in, out], bf16 scales [..., 1, out]) of float `values`: scale = max |column| / 127,
    rounded to bf16, and each value divided by it, rounded and clipped to -127..127."""
    values = np.asarray(values, np.float32)
    scales = (np.abs(values).max(axis=-2, keepdims=True) / np.float32(127)).astype(BF16)
    return _divided(values, scales), scales


def _divided(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """`values` over their columns' bf16 `scales`, rounded and clipped to int8 (a zero scale: zeros)."""
    divisor = scales.astype(np.float32)
    divisor[divisor == 0] = 1
    return np.clip(np.rint(np.asarray(values, np.float32) / divisor), -127, 127).astype(np.int8)


class _Scales(_Lazy):
    """The per-column scales [..., 1, out]: a slice reads its columns whole (every input row)."""

    def __init__(self, source):
        self.source, self.dtype = source, BF16
        self.shape = (*source.shape[:-2], 1, source.shape[-1])
        self._cache: dict[tuple, np.ndarray] = {}

    def columns(self, lead: tuple[slice, ...], cols: slice) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in (*lead, cols))
        if key not in self._cache:
            self._cache.clear()  # one slice at a time: a device's slices are read one after another
            whole = self.source[(*lead, slice(None), cols)]
            self._cache[key] = quantize_columns(whole)[1]
        return self._cache[key]

    def __getitem__(self, index) -> np.ndarray:
        *lead, block, cols = _slices(index, self.shape)
        return self.columns(tuple(lead), cols)[..., block, :]


class _Int8(_Lazy):
    """The int8 values [..., in, out], each slice divided by its columns' scales."""

    def __init__(self, source, scales: _Scales):
        self.source, self.scales, self.shape, self.dtype = source, scales, tuple(source.shape), np.dtype(np.int8)

    def __getitem__(self, index) -> np.ndarray:
        *lead, rows, cols = _slices(index, self.shape)
        return _divided(self.source[(*lead, rows, cols)], self.scales.columns(tuple(lead), cols))
