"""The release checkpoint format: a directory (`ckpt-0/`) of one pickle per weight.

File `tensor{i:05d}_000` holds weight i of `grok.model.transformer.weights.flatten(checkpoint tree)`, whose keys
are sorted as strings (so `decoder_layer_10` comes before `decoder_layer_2`): either an fp32 NumPy
array, or an 8-bit weight pickled as `__main__.QuantizedWeight8bit` with the instance state
`{"weight": int8 array, "scales": bf16 array}` (pickle protocol 4), exactly as released.
Pickles can run code, so files are read with an unpickler that admits only the release's globals,
and only as stand-ins that check every call and state before NumPy sees them (`SafeUnpickler`).
"""

from __future__ import annotations

import encodings.raw_unicode_escape  # noqa: F401 - the UNICODE opcode's codec: no file makes pickle import it
import math
import pickle
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import ml_dtypes
import numpy as np
from tqdm import tqdm

from grok.checkpoint.files import (
    CheckpointError,
    LayerScaleBlocks,
    PathLike,
    Weight,
    atomic_write,
    check_files_present,
    check_weight,
    open_regular_file,
    tensor_file_name,
    tensor_files,
)
from grok.model.quant import QuantizedWeight8bit
from grok.model.weights import Params, flatten

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct

PROTOCOL = 4
_RELEASE_CLASS = ("__main__", "QuantizedWeight8bit")


class UnsafePickleError(CheckpointError):
    """A tensor file whose pickle references a global outside the allow-list (nothing of it is run)."""


# ----------------------------------------------------------------------------------------- writing


class ReleasePickler(pickle._Pickler):
    """Protocol-4 pickler that names globals as the release does: our 8-bit class is written as
    `__main__.QuantizedWeight8bit` (it lives in `grok.model.quant`); everything else as usual.

    This is the pure-Python pickler, the one whose `save_global` can be overridden; large array
    payloads still go straight to the file. Subclasses may add entries to `global_names`.
    """

    global_names: dict[object, tuple[str, str]] = {QuantizedWeight8bit: _RELEASE_CLASS}

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, protocol=PROTOCOL)

    def save_global(self, obj, name=None) -> None:
        renamed = self.global_names.get(obj)
        if renamed is None:
            return super().save_global(obj, name)
        module, qualname = renamed
        self.save(module)
        self.save(qualname)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def write_checkpoint(params: Params, directory: PathLike, *, progress: bool = True) -> None:
    """Write a checkpoint tree (per-layer paths; NumPy or JAX arrays) as release tensor files.

    Each file is written under a temporary name and then renamed, so a tensor file is never partial.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names, weights = flatten(params)
    foreign = sorted(tensor_files(directory) - {tensor_file_name(i) for i in range(len(names))})
    if foreign:
        raise CheckpointError(
            f"{directory} already holds tensor files of another checkpoint ({foreign[0]}, ...); "
            "write into an empty directory"
        )
    for i, weight in enumerate(tqdm(weights, desc=f"writing {directory}", unit="file", disable=not progress)):
        with atomic_write(directory / tensor_file_name(i)) as file:
            ReleasePickler(file).dump(_to_numpy(weight))


def _to_numpy(weight) -> Weight:
    if isinstance(weight, QuantizedWeight8bit):
        return QuantizedWeight8bit(weight=np.asarray(weight.weight), scales=np.asarray(weight.scales))
    return np.asarray(weight)


# ----------------------------------------------------------------------------------------- reading


class _Global:
    """What an allow-listed global resolves to: a call checked by `make` (or none), and nothing else.

    A pickle can call what it loads (REDUCE) and set its state (BUILD), and NumPy's own functions
    for arrays and dtypes trust their input (a malformed dtype state crashes the process), so a
    tensor file never gets hold of them: only of these stand-ins, which take just the calls and
    states NumPy writes, and build the arrays themselves.
    """

    __slots__ = ("name", "_make")

    def __init__(self, name: str, make: Callable | None = None) -> None:
        self.name, self._make = name, make

    def __call__(self, *args):
        if self._make is None:
            raise TypeError(f"{self.name} is not called in a tensor file")
        return self._make(*args)

    def __setstate__(self, state) -> None:
        raise TypeError(f"{self.name} has no state to set")

    def __repr__(self) -> str:
        return f"<{self.name}>"


_NDARRAY = _Global("numpy.ndarray")
_BFLOAT16 = _Global("ml_dtypes.bfloat16")
_DTYPE_CODES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")  # as dtypes pickle them
_BYTE_ORDERS = {"<": "<", ">": ">", "=": "=", "|": "="}  # as a dtype's state says it -> `newbyteorder`


def _is_int(value) -> bool:
    return type(value) is int


class _Dtype:
    """A dtype being unpickled: `numpy.dtype(code, align, copy)`, then BUILD with its state."""

    __slots__ = ("base", "dtype")

    def __init__(self, code, align=False, copy=True) -> None:
        if code is _BFLOAT16:
            self.base = np.dtype(ml_dtypes.bfloat16)
        elif type(code) is str and code in _DTYPE_CODES:
            self.base = np.dtype(code)
        else:
            raise ValueError(f"numpy.dtype({code!r}) is not a dtype of a checkpoint")
        if type(align) not in (bool, int) or align or type(copy) not in (bool, int):
            raise ValueError(f"numpy.dtype({code!r}, {align!r}, {copy!r}): unexpected arguments")
        self.dtype: np.dtype | None = None

    def __setstate__(self, state) -> None:
        """(3, byte order, None, None, None, item size or -1, alignment or -1, flags), as NumPy writes
        a plain dtype; the dtype is made from its code, never from the state."""
        if not (
            self.dtype is None and type(state) is tuple and len(state) == 8 and _is_int(state[0]) and state[0] == 3
            and type(state[1]) is str and state[1] in _BYTE_ORDERS and all(part is None for part in state[2:5])
            and all(map(_is_int, state[5:])) and state[5] in (-1, self.base.itemsize)
            and state[6] in (-1, self.base.alignment)
        ):
            raise ValueError(f"{state!r} is not the state of a {self.base} dtype")
        self.dtype = self.base.newbyteorder(_BYTE_ORDERS[state[1]])


class _Array:
    """An array being unpickled: `_reconstruct(numpy.ndarray, (0,), b"b")`, then BUILD with its state."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        """(1, shape, dtype, Fortran order, bytes), as NumPy writes an array: checked, then given to NumPy."""
        if self.array is not None or type(state) is not tuple or len(state) != 5:
            raise ValueError("not the state of an array")
        version, shape, dtype, fortran, data = state
        if not (_is_int(version) and version == 1 and type(shape) is tuple and len(shape) <= 32):
            raise ValueError(f"not the state of an array (version {version!r}, shape {shape!r})")
        if not all(_is_int(n) and n >= 0 for n in shape):
            raise ValueError(f"array shape {shape!r} is not a tuple of sizes")
        if type(dtype) is not _Dtype or dtype.dtype is None or type(fortran) is not bool:
            raise ValueError(f"array dtype {dtype!r} or order {fortran!r} is not as NumPy writes them")
        itemsize = dtype.dtype.itemsize
        if math.prod(max(n, 1) for n in shape) * itemsize > sys.maxsize:
            raise ValueError(f"array shape {shape} is too large")
        nbytes = math.prod(shape) * itemsize
        if type(data) not in (bytes, bytearray) or len(data) != nbytes:
            found = f"{len(data)} bytes" if type(data) in (bytes, bytearray) else f"a {type(data).__name__}"
            raise ValueError(f"an array of shape {shape} and dtype {dtype.dtype} needs {nbytes} bytes, got {found}")
        array = _reconstruct(np.ndarray, (0,), b"b")
        array.__setstate__((1, shape, dtype.dtype, fortran, data))
        self.array = array


def _new_array(cls, shape, typecode) -> _Array:
    """`_reconstruct(numpy.ndarray, (0,), b"b")`, the call NumPy pickles every array as."""
    if not (cls is _NDARRAY and type(shape) is tuple and shape == (0,) and type(typecode) is bytes
            and typecode == b"b"):
        raise ValueError(f"_reconstruct({cls!r}, {shape!r}, {typecode!r}) is not how NumPy pickles an array")
    return _Array()


# Every global a release tensor file may reference, except `__main__.QuantizedWeight8bit`.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _Global("numpy.core.multiarray._reconstruct", _new_array),  # NumPy 1
    ("numpy._core.multiarray", "_reconstruct"): _Global("numpy._core.multiarray._reconstruct", _new_array),  # NumPy 2
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Global("numpy.dtype", _Dtype),
    ("ml_dtypes", "bfloat16"): _BFLOAT16,
}


class SafeUnpickler(pickle._Unpickler):
    """Unpickler that resolves only the release's globals, as stand-ins (`_Global`); any other global
    raises `UnsafePickleError`. Arrays come out as `_Array`s; `weight` gives the loaded weight.

    `__main__.QuantizedWeight8bit` resolves to `stand_in`, a fresh empty class made for this file:
    the pickle can fill its instances' `__dict__` but cannot touch `grok.model.quant.QuantizedWeight8bit`
    (whose class attributes it could otherwise overwrite with BUILD).

    This is the pure-Python unpickler: its memo is a dict, where the C one allocates a table as long
    as the largest index a PUT opcode names (5 bytes of a file could take gigabytes). It is as fast
    on tensor files, which are a few dozen opcodes around one or two large byte strings.
    """

    def __init__(self, file: BinaryIO, label: str) -> None:
        super().__init__(file)
        self.label = label
        self.stand_in = type("QuantizedWeight8bit", (), {"__module__": "__main__"})

    def find_class(self, module: str, name: str):
        if (module, name) == _RELEASE_CLASS:
            return self.stand_in
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise UnsafePickleError(f"{self.label}: refuses to load global {module}.{name}")
        return found

    def weight(self, obj) -> Weight:
        """The weight an unpickled object stands for: a NumPy array or a `QuantizedWeight8bit` of two."""
        if type(obj) is _Array and obj.array is not None:
            return obj.array
        if type(obj) is self.stand_in:
            state = vars(obj)
            if set(state) != {"weight", "scales"} or any(
                type(v) is not _Array or v.array is None for v in state.values()
            ):
                found = {key: "ndarray" if type(v) is _Array else type(v).__name__ for key, v in state.items()}
                raise CheckpointError(
                    f"{self.label}: QuantizedWeight8bit must hold NumPy arrays 'weight' and 'scales', found {found}"
                )
            return QuantizedWeight8bit(weight=state["weight"].array, scales=state["scales"].array)
        raise CheckpointError(
            f"{self.label}: holds a {type(obj).__name__}, not a NumPy array or QuantizedWeight8bit"
        )


def load_tensor(path: PathLike) -> Weight:
    """One tensor file, safely: a NumPy array or a `QuantizedWeight8bit` of two NumPy arrays."""
    label = str(path)
    try:
        with open_regular_file(path) as file:
            unpickler = SafeUnpickler(file, label)
            return unpickler.weight(unpickler.load())
    except CheckpointError:
        raise
    except OSError as err:
        raise CheckpointError(f"{label}: cannot be read: {err}") from err
    except Exception as err:  # truncated, not a pickle, or calls and states that NumPy does not write
        raise CheckpointError(f"{label}: not a valid tensor pickle ({type(err).__name__}: {err})") from err


def iter_pickles(directory: Path, names: Sequence[str], expected: Sequence) -> Iterator[tuple[str, Weight]]:
    """Each expected weight from its tensor file, in release file order, checked against `expected`."""
    check_files_present(directory, names)
    layers = LayerScaleBlocks()
    for i, (name, want) in enumerate(zip(names, expected)):
        path = directory / tensor_file_name(i)
        label = f"{path} ({name})"
        weight = load_tensor(path)
        check_weight(label, want, weight)
        layers.check(label, name, weight)
        yield name, weight

