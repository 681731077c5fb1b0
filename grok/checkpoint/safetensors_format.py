"""The converted checkpoint format: safetensors files plus an index, made by `grok.checkpoint.convert`.

Why safetensors (rather than the release's pickles, or TensorStore/Zarr):
- Loading runs no code. A file is an 8-byte header length, a JSON header (dtype, shape and byte
  range of every tensor) and the raw little-endian bytes; there is nothing to unpickle, so no
  allow-listing unpickler is needed and a hostile file can at worst fail to parse.
- It can be memory-mapped, and every tensor's byte offsets are in the header, so a reader asks
  for a slice (`safe_open(...).get_slice(key)[index]`): only those bytes are copied, and only the
  pages that hold them are read from disk. A process that holds 1/8 of an expert matrix reads
  about 1/8 of it (its row blocks, or its column blocks of 4 KiB rows and up), where a pickle must
  be read whole by every process.
- The stored bytes are the release's own: int8 weights and bf16 scales stay int8 and bf16 (the
  format has `I8` and `BF16`; NumPy reads bf16 through `ml_dtypes`), so conversion is exact.
- One small, widely used dependency with a fixed spec, rather than a storage engine (TensorStore)
  whose chunked layout would need choosing per weight and per mesh.

Layout of a converted directory (`checkpoints/safetensors/` by default):
- `tensor{i:05d}.safetensors`: weight i of the release order (the same `i` as `tensor{i:05d}_000`),
  holding the tensor `PATH/NAME` for a float weight (e.g. `language_model/rms_norm/scale`), or
  `PATH/NAME.weight` (int8) and `PATH/NAME.scales` (bf16) for an 8-bit one (e.g.
  `transformer/decoder_layer_3/moe/linear/w.weight`). One file per weight keeps conversion streaming
  (one weight in memory) and resumable file by file.
- `model.safetensors.index.json`: `{"metadata": {...}, "weight_map": {tensor name: file name}}`,
  the index layout other safetensors tools use. It is written last: a directory with it is a
  finished conversion (see `grok.checkpoint.files.checkpoint_format`).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from grok.checkpoint.files import (
    SAFETENSORS_INDEX,
    CheckpointError,
    LayerScaleBlocks,
    Weight,
    atomic_write,
    check_weight,
    open_regular_file,
)
from grok.model.quant import QuantizedWeight8bit

FORMAT = "grok-1-safetensors"
FORMAT_VERSION = "1"
PAGE = 4096  # tensor data starts at a multiple of this in the file
_QUANTIZED_PARTS = ("weight", "scales")

# NumPy dtype <-> safetensors dtype name, for the dtypes a checkpoint can hold.
DTYPE_NAMES = {
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float16): "F16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}
_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def file_name(index: int) -> str:
    """Name of the file holding weight `index` of the release order."""
    return f"tensor{index:05d}.safetensors"


def tensor_keys(name: str, weight) -> dict[str, object]:
    """Tensor name in the files -> array, for one weight (or its abstract shape) named `name`."""
    if isinstance(weight, QuantizedWeight8bit):
        return {f"{name}.{part}": getattr(weight, part) for part in _QUANTIZED_PARTS}
    return {name: weight}


# ----------------------------------------------------------------------------------------- writing


WRITE_CHUNK = 256 << 20  # bytes of a lazy source read at a time by `write_file`


def write_file(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> int:
    """Write `arrays` as one safetensors file, atomically; returns the bytes of tensor data written.

    Streams each array's buffer to the file (no copy into one big buffer, as `safetensors.numpy`
    makes). An array may also be a lazy source (`shape`, `dtype`, `source[index]`: Grok-2's release,
    `grok.checkpoint.grok2_release`), read and written a few slices of its first axis at a time
    (at most WRITE_CHUNK bytes, or one slice), so no whole expert stack is ever in memory. The
    header is padded with spaces (as the format allows) so that the data starts on a page boundary,
    and arrays are ordered by decreasing item size, so every tensor starts aligned to its item size
    (and Grok-1's int8 weights, after their scales, on a page boundary too). The output is
    byte-for-byte deterministic.
    """
    arrays = {
        key: _little_endian(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        for key, value in arrays.items()
    }
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    order = sorted(arrays, key=lambda key: (-arrays[key].dtype.itemsize, key))
    for key in order:
        array = arrays[key]
        if np.dtype(array.dtype) not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: cannot store {key} of dtype {array.dtype} in safetensors")
        nbytes = int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
        header[key] = {
            "dtype": DTYPE_NAMES[np.dtype(array.dtype)],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % PAGE)
    with atomic_write(path) as file:
        file.write(struct.pack("<Q", len(text)))
        file.write(text)
        for key in order:
            array = arrays[key]
            if isinstance(array, np.ndarray):
                file.write(array.reshape(-1).view(np.uint8).data)
                continue
            first = array.shape[0] if array.shape else 1
            step = max(1, WRITE_CHUNK // max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * np.dtype(array.dtype).itemsize))
            for start in range(0, first, step):
                chunk = np.ascontiguousarray(array[start : start + step], dtype=array.dtype)
                file.write(_little_endian(chunk).reshape(-1).view(np.uint8).data)
    return offset


def _little_endian(array: np.ndarray) -> np.ndarray:
    big = array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big")
    return array.byteswap().view(array.dtype.newbyteorder("<")) if big else array


def write_index(
    directory: Path, weight_map: Mapping[str, str], total_size: int, metadata: Mapping[str, object] | None = None
) -> Path:
    """Write the index that marks a finished conversion (atomically), with `metadata` added to its own."""
    index = {
        "metadata": {"format": FORMAT, "format_version": FORMAT_VERSION, "total_size": total_size, **(metadata or {})},
        "weight_map": dict(weight_map),
    }
    path = directory / SAFETENSORS_INDEX
    with atomic_write(path) as file:
        file.write(json.dumps(index, indent=1).encode() + b"\n")
    return path


# ----------------------------------------------------------------------------------------- reading


class StoredArray:
    """One tensor of a safetensors file, read on demand: `stored[index]` reads only those bytes.

    `shape` and `dtype` come from the file's header; `np.asarray(stored)` reads all of it. A part is
    gathered from the memory-mapped file (`safe_open(...).get_slice`); the whole tensor is read with
    one plain read at its offset, which is faster than faulting in a mapping page by page when
    the file is not in the page cache.
    """

    def __init__(self, file: StoredFile, key: str, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> None:
        self.path, self.key, self.dtype, self.shape, self.offset = file.path, key, dtype, shape, offset
        self._file = file

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __getitem__(self, index) -> np.ndarray:
        if _is_whole(index, self.shape):
            return self._read_whole()
        part = self._file.slicer(self.key)
        try:
            return part[index]
        except Exception as err:  # an OSError of the mapping, or an index safetensors cannot take
            raise CheckpointError(f"{self.path}: cannot read {self.key}[{index}]: {err}") from err

    def _read_whole(self) -> np.ndarray:
        array = np.empty(self.shape, self.dtype)
        buffer = memoryview(array.reshape(-1).view(np.uint8))
        try:
            with open_regular_file(self.path, buffering=0) as file:
                file.seek(self.offset)
                done = 0
                while done < len(buffer):  # one read returns at most about 2 GB
                    count = file.readinto(buffer[done:])
                    if not count:
                        raise OSError(f"the file ends {len(buffer) - done} bytes early")
                    done += count
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot read {self.key}: {err}") from err
        return array

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[...]
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"StoredArray({self.path.name}:{self.key}, {self.dtype} {self.shape})"


def _is_whole(index, shape: tuple[int, ...]) -> bool:
    """Whether `index` (as JAX or NumPy write it) selects all of an array of `shape`."""
    index = index if isinstance(index, tuple) else (index,)
    if index in ((), (Ellipsis,)):
        return True
    return len(index) <= len(shape) and all(
        isinstance(part, slice) and part.step in (None, 1) and part.indices(size)[:2] == (0, size)
        for part, size in zip(index, shape)
    )


class StoredFile:
    """A safetensors file opened for reading: its header parsed and checked against the file;
    `metadata` is the header's `__metadata__` (a map of strings, empty if it has none).

    The memory mapping (`safe_open`) is made only when a part of a tensor is asked for: opening
    one costs a read of the file's first page, which adds up over hundreds of files read whole.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None
        try:
            with open_regular_file(path) as file:
                self._tensors, self.metadata = _read_header(file, os.fstat(file.fileno()).st_size)
        except FileNotFoundError as err:
            raise CheckpointError(f"{path} is missing") from err
        except OSError as err:
            raise CheckpointError(f"{path}: cannot be read: {err}") from err
        except (ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from err

    def keys(self) -> list[str]:
        return list(self._tensors)

    def array(self, key: str) -> StoredArray:
        return StoredArray(self, key, *self._tensors[key])

    def slicer(self, key: str):
        """`safe_open(...).get_slice(key)`: indexing it copies out just that part of the mapping."""
        if self._handle is None:
            try:
                self._handle = safe_open(str(self.path), framework="numpy")
            except (OSError, SafetensorError) as err:
                raise CheckpointError(f"{self.path}: not a valid safetensors file ({err})") from err
        return self._handle.get_slice(key)


def _read_header(file, size: int) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int]], dict[str, str]]:
    """Tensor name -> (dtype, shape, offset of its data in the file), and the metadata, from a safetensors header.

    Checks what the format requires: a JSON object of tensors whose byte ranges follow each other
    from the start of the data with no gap, each the size of its shape and dtype, ending at the end
    of the file, and metadata (if any) mapping strings to strings. Raises ValueError (or TypeError,
    KeyError for a malformed entry) otherwise.
    """
    prefix = file.read(8)
    if len(prefix) < 8:
        raise ValueError(f"{size} bytes is too short for a header")
    length = struct.unpack("<Q", prefix)[0]
    if length > size - 8:
        raise ValueError(f"header of {length} bytes does not fit in the file's {size} bytes")
    header = json.loads(file.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("the __metadata__ is not a JSON object of strings")
    data = 8 + length
    entries = sorted(
        ((key, entry) for key, entry in header.items() if key != "__metadata__"),
        key=lambda item: item[1]["data_offsets"][0],
    )
    tensors, end = {}, 0
    for key, entry in entries:
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {key} has dtype {entry['dtype']!r}, which no checkpoint weight has")
        shape = tuple(int(n) for n in entry["shape"])
        begin, stop = (int(n) for n in entry["data_offsets"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if begin != end or stop - begin != nbytes or min(shape, default=0) < 0:
            raise ValueError(f"tensor {key} has byte range {begin}..{stop}, expected {end}..{end + nbytes}")
        tensors[key], end = (dtype, shape, data + begin), stop
    if data + end != size:
        raise ValueError(f"the tensors end at byte {data + end} but the file has {size} bytes")
    return tensors, metadata


def open_file(path: Path) -> StoredFile:
    """A safetensors file opened for reading, or a CheckpointError naming it."""
    return StoredFile(path)


def read_index(directory: Path) -> dict[str, str]:
    """The index's weight map (tensor name -> file name), checked for shape."""
    path = directory / SAFETENSORS_INDEX
    try:
        with open_regular_file(path) as file:
            index = json.loads(file.read().decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable index ({type(err).__name__}: {err})") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in weight_map.items()
    ):
        raise CheckpointError(f"{path}: must be a JSON object with a 'weight_map' of tensor name -> file name")
    for key, value in weight_map.items():
        if Path(value).name != value or not value.endswith(".safetensors"):
            raise CheckpointError(f"{path}: {key} maps to {value!r}, not a .safetensors file in this directory")
    return weight_map


def iter_weights(directory: Path, names: Sequence[str], expected: Sequence) -> Iterator[tuple[str, Weight]]:
    """Yield (name, weight of `StoredArray`s) for the expected weights, each checked against its shape.

    The index must list exactly the expected weights (errors name the index and the parameter);
    each weight's file and tensors must exist with the expected dtypes and shapes, 8-bit scales in
    any row blocks `check_weight` admits (errors name the file and the parameter). No tensor data
    is read here.
    """
    weight_map = read_index(directory)
    index_path = directory / SAFETENSORS_INDEX
    stored = _group_by_weight(weight_map)
    count = (
        f"expected {len(names)} weights for this config, found {len(stored)}; "
        "the config probably does not match the checkpoint"
    )
    unexpected = sorted(set(stored) - set(names))
    if unexpected:
        raise CheckpointError(f"{index_path}: unexpected weight {unexpected[0]} ({count})")
    for name in names:
        if name not in stored:
            hint = f" ({count})" if len(stored) != len(names) else ""
            raise CheckpointError(f"{index_path}: has no entry for {name}{hint}")

    handles: dict[str, StoredFile] = {}  # file name -> open file, for the files of the current weight
    layers = LayerScaleBlocks()
    for name, want in zip(names, expected):
        keys = stored[name]
        files = {weight_map[key] for key in keys}
        handles = {file: handles[file] if file in handles else open_file(directory / file) for file in files}
        label = f"{directory / weight_map[keys[0]]} ({name})"
        arrays = {}
        for key in keys:
            handle = handles[weight_map[key]]
            if key not in handle.keys():
                raise CheckpointError(f"{directory / weight_map[key]} ({name}): holds no tensor {key}")
            arrays[key] = handle.array(key)
        found = weight_of(label, name, arrays)
        check_weight(label, want, found)
        layers.check(label, name, found)
        yield name, found


def weight_of(label: str, name: str, arrays: Mapping[str, StoredArray]) -> Weight:
    """Weight `name` from its stored tensors (tensor name -> array): `NAME`, or `NAME.weight` and `NAME.scales`."""
    if set(arrays) == {f"{name}.{part}" for part in _QUANTIZED_PARTS}:
        return QuantizedWeight8bit(**{part: arrays[f"{name}.{part}"] for part in _QUANTIZED_PARTS})
    if list(arrays) == [name]:
        return arrays[name]
    raise CheckpointError(
        f"{label}: stored as tensors {sorted(arrays)}; expected either {name} or {name}.weight and {name}.scales"
    )


def _group_by_weight(weight_map: Mapping[str, str]) -> dict[str, list[str]]:
    """Weight name -> its tensor names (`NAME`, or `NAME.weight` and `NAME.scales`)."""
    grouped: dict[str, list[str]] = {}
    for key in weight_map:
        base, dot, part = key.rpartition(".")
        name = base if dot and part in _QUANTIZED_PARTS else key
        grouped.setdefault(name, []).append(key)
    return grouped
