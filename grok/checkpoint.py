"""Reading and writing the release checkpoint format: a directory (`ckpt-0/`) of one pickle per weight.

File `tensor{i:05d}_000` holds weight i of `grok.weights.flatten(checkpoint tree)`, whose keys are
sorted as strings (so `decoder_layer_10` comes before `decoder_layer_2`): either an fp32 NumPy
array, or an 8-bit weight pickled as `__main__.QuantizedWeight8bit` with the instance state
`{"weight": int8 array, "scales": bf16 array}` (pickle protocol 4), exactly as released.
Pickles can run code, so files are read with an unpickler that admits only the release's globals,
and only as stand-ins that check every call and state before NumPy sees them (`SafeUnpickler`).

`iter_checkpoint` and `read_checkpoint` also read the converted safetensors format
(`grok.safetensors_checkpoint`, made by `grok.convert`); `checkpoint_format` tells which a
directory holds, and both are checked against the config in the same way.
"""

from __future__ import annotations

import contextlib
import encodings.raw_unicode_escape  # noqa: F401 - the UNICODE opcode's codec: no file makes pickle import it
import functools
import math
import os
import pickle
import re
import stat
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Literal, Sequence

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from grok.config import GrokConfig
from grok.quant import QuantizedWeight8bit
from grok.weights import Params, checkpoint_shapes, flatten, is_weight, model_path, quantized_shape, scale_block_count

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct

PathLike = str | os.PathLike
Weight = np.ndarray | QuantizedWeight8bit

PROTOCOL = 4
CHECKPOINT_SUBDIR = "ckpt-0"
LEGACY_CHECKPOINT_SUBDIR = "ckpt"  # what older revisions of the Hub repository call `ckpt-0/`
SAFETENSORS_SUBDIR = "safetensors"  # where `run.py convert` puts the converted checkpoint by default
SAFETENSORS_INDEX = "model.safetensors.index.json"
CHECKPOINT_SUBDIRS = (SAFETENSORS_SUBDIR, CHECKPOINT_SUBDIR, LEGACY_CHECKPOINT_SUBDIR)  # in order of preference
Format = Literal["pickle", "safetensors"]
_TENSOR_FILE = re.compile(r"tensor\d{5}_\d{3}")
_RELEASE_CLASS = ("__main__", "QuantizedWeight8bit")


class CheckpointError(Exception):
    """A checkpoint directory or tensor file that is missing, malformed, or does not fit the config."""


class UnsafePickleError(CheckpointError):
    """A tensor file whose pickle references a global outside the allow-list (nothing of it is run)."""


def open_regular_file(path: PathLike, buffering: int = -1) -> BinaryIO:
    """`path` opened for reading if it is a regular file (after symbolic links), else a CheckpointError
    naming it: a FIFO would block the reader forever, a device never end.

    The file is opened without blocking (opening a FIFO waits for a writer), checked with `fstat`, and
    only then made blocking; an OSError (missing, unreadable) is the caller's to report.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{path}: is {_file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((kind for test, kind in kinds if test(mode)), "a special file")


def tensor_file_name(index: int) -> str:
    """Name of the file holding weight `index` of the flattened checkpoint tree."""
    return f"tensor{index:05d}_000"


def resolve_checkpoint_dir(directory: PathLike) -> Path:
    """`directory` itself when it holds a checkpoint, else its first subdirectory that does.

    Subdirectories are tried in the order `safetensors/` (a finished conversion: it has its index),
    `ckpt-0/`, `ckpt/` (the name in older revisions of the Hub repository). With none of them,
    `directory` itself is returned, for the reader to report what is missing there.
    """
    directory = Path(directory)
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise CheckpointError(f"checkpoint directory {directory} {problem}")
    return find_checkpoint_dir(directory) or directory


def find_checkpoint_dir(directory: PathLike) -> Path | None:
    """The directory that holds a checkpoint of either format: `directory` itself, or the first of its
    subdirectories `safetensors/`, `ckpt-0/`, `ckpt/` that does; None when none does."""
    directory = Path(directory)
    for candidate in (directory, *(directory / name for name in CHECKPOINT_SUBDIRS)):
        if candidate.is_dir() and _holds_checkpoint(candidate):
            return candidate
    return None


def checkpoint_format(directory: PathLike) -> Format:
    """Which format a checkpoint directory (as resolved) holds: "safetensors" when it has the index
    file that a finished conversion writes last, else "pickle" (the release format).

    A directory with safetensors files but no index is an unfinished conversion: an error.
    """
    directory = Path(directory)
    if (directory / SAFETENSORS_INDEX).is_file():
        return "safetensors"
    if not tensor_files(directory) and any(name.endswith(".safetensors") for name in os.listdir(directory)):
        raise CheckpointError(
            f"{directory} holds .safetensors files but no {SAFETENSORS_INDEX}: the conversion did not finish; "
            "run convert again to complete it"
        )
    return "pickle"


def _holds_checkpoint(directory: Path) -> bool:
    return (directory / SAFETENSORS_INDEX).is_file() or bool(tensor_files(directory))


# ----------------------------------------------------------------------------------------- writing


class ReleasePickler(pickle._Pickler):
    """Protocol-4 pickler that names globals as the release does: our 8-bit class is written as
    `__main__.QuantizedWeight8bit` (it lives in `grok.quant`); everything else as usual.

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


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only once fully written (temporary file, fsync, rename).

    If the body raises, the temporary file is removed; a process killed meanwhile leaves it behind
    under `temporary_name(path)` (a hidden name no reader looks at).
    """
    temporary = path.with_name(f"{temporary_name(path)}{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def temporary_name(path: Path) -> str:
    """Prefix of the temporary files `atomic_write` uses for `path` (the process id follows)."""
    return f".{path.name}.tmp"


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
    the pickle can fill its instances' `__dict__` but cannot touch `grok.quant.QuantizedWeight8bit`
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


def iter_checkpoint(
    directory: PathLike, config: GrokConfig, *, progress: bool = True, lazy: bool = False
) -> Iterator[tuple[str, Weight]]:
    """Yield (parameter path, weight) in release file order, each checked against what `config` expects.

    An 8-bit weight's scales may come in any number of row blocks that divides its input size, as
    the file has them (`check_weight`), the same number in every layer of a parameter.

    Reads either format (see `checkpoint_format`). Only one weight is in memory at a time (plus
    whatever the caller keeps). With `lazy`, a safetensors weight's arrays are
    `grok.safetensors_checkpoint.StoredArray`s, which read only the bytes of the slice they are
    indexed with (`stored[index]`), so a caller that needs only some shards reads only those;
    a pickle has to be read whole, so its arrays are NumPy arrays either way. Both have `shape`,
    `dtype` and `[index]`; a lazy weight stays readable after the iteration moves on.
    """
    directory = resolve_checkpoint_dir(directory)
    names, expected, _ = expected_weights(config)
    if checkpoint_format(directory) == "safetensors":
        from grok import safetensors_checkpoint  # imports this module

        weights = safetensors_checkpoint.iter_weights(directory, names, expected)
    else:
        weights = _iter_pickles(directory, names, expected)
    for name, weight in tqdm(weights, total=len(names), desc=f"reading {directory}", unit="file", disable=not progress):
        yield name, weight if lazy else jax.tree.map(np.asarray, weight)


def _iter_pickles(directory: Path, names: Sequence[str], expected: Sequence) -> Iterator[tuple[str, Weight]]:
    check_files_present(directory, names)
    layers = LayerScaleBlocks()
    for i, (name, want) in enumerate(zip(names, expected)):
        path = directory / tensor_file_name(i)
        label = f"{path} ({name})"
        weight = load_tensor(path)
        check_weight(label, want, weight)
        layers.check(label, name, weight)
        yield name, weight


def read_checkpoint(directory: PathLike, config: GrokConfig, *, progress: bool = True) -> Params:
    """Load a checkpoint of either format as a checkpoint tree of NumPy arrays.

    `directory` holds the checkpoint, or is a directory above it (see `resolve_checkpoint_dir`).
    """
    loaded = [weight for _, weight in iter_checkpoint(directory, config, progress=progress)]
    return jax.tree_util.tree_unflatten(expected_weights(config)[2], loaded)


@functools.lru_cache(maxsize=8)
def expected_weights(config: GrokConfig) -> tuple[tuple[str, ...], tuple, jax.tree_util.PyTreeDef]:
    """Names, abstract weights (release file order) and tree structure of `config`'s checkpoint.

    Kept per config: deriving them traces the model (`jax.eval_shape`), which costs more than
    reading a small checkpoint.
    """
    expected_tree = checkpoint_shapes(config)
    names, expected = flatten(expected_tree)
    return tuple(names), tuple(expected), jax.tree_util.tree_structure(expected_tree, is_leaf=is_weight)


def tensor_files(directory: Path) -> set[str]:
    """Names of the release tensor files (`tensorNNNNN_NNN`) in `directory`."""
    return {name for name in os.listdir(directory) if _TENSOR_FILE.fullmatch(name)}


def check_files_present(directory: Path, names: Sequence[str]) -> None:
    """Exactly the files tensor00000_000 .. tensor{N-1}_000, one per expected weight."""
    found = tensor_files(directory)
    wanted = [tensor_file_name(i) for i in range(len(names))]
    count = (
        f"expected {len(names)} tensor files for this config, found {len(found)}; "
        "the config probably does not match the checkpoint"
    )
    unexpected = sorted(found - set(wanted))
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor file {unexpected[0]} ({count})")
    for file_name, name in zip(wanted, names):
        if file_name not in found:
            hint = f" ({count})" if len(found) != len(names) else ""
            raise CheckpointError(f"{directory / file_name} ({name}) is missing{hint}")


def check_weight(label: str, want, found: Weight) -> None:
    """`found` (arrays or anything with `shape` and `dtype`) has the kind, dtypes and shapes of `want`.

    An 8-bit weight's scales may have any number of row blocks that divides its input size (see
    `_check_scales`), not only `want`'s.
    """
    if isinstance(want, QuantizedWeight8bit):
        if not isinstance(found, QuantizedWeight8bit):
            raise CheckpointError(
                f"{label}: expected an 8-bit weight (QuantizedWeight8bit), found a {found.dtype} array "
                f"of shape {found.shape}"
            )
        _check_array(label, "weight", want.weight, found.weight)
        _check_scales(label, want, found.scales)
    elif isinstance(found, QuantizedWeight8bit):
        raise CheckpointError(
            f"{label}: expected {np.dtype(want.dtype)} array of shape {tuple(want.shape)}, found an 8-bit weight"
        )
    else:
        _check_array(label, "array", want, found)


class LayerScaleBlocks:
    """Checks, weight after weight, that every layer of a stacked 8-bit parameter has its scales in the
    same number of row blocks (the layers become one array of the model tree)."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[int, str]] = {}  # model parameter -> (row blocks, label of the first layer)

    def check(self, label: str, name: str, weight) -> None:
        """`weight`, parameter `name` (a checkpoint path) read from `label`, agrees with earlier layers."""
        if not isinstance(weight, QuantizedWeight8bit):
            return
        path, leaf = name.rsplit("/", 1)
        parameter = f"{model_path(path)[0]}/{leaf}"
        blocks = scale_block_count(weight)
        first_blocks, first = self._first.setdefault(parameter, (blocks, label))
        if blocks != first_blocks:
            raise CheckpointError(
                f"{label}: scales in {blocks} row blocks, but {first} has {first_blocks}; every layer of "
                f"{parameter} must have the same number"
            )


def _check_scales(label: str, want: QuantizedWeight8bit, found) -> None:
    """Scales [..., nb, out] with `want`'s dtype and shape but for nb: any count >= 1 that divides the input rows."""
    shape, rank, n_in = tuple(found.shape), len(want.scales.shape), want.shape[-2]
    blocks = shape[-2] if len(shape) == rank else None
    if blocks is not None and blocks >= 1 and n_in % blocks == 0:
        _check_array(label, "scales", quantized_shape(want.shape, blocks).scales, found)
        return
    *lead, _, n_out = want.scales.shape
    expected = "(" + ", ".join([*map(str, lead), "nb", str(n_out)]) + ")"
    problem = f"{len(shape)} dimensions, not {rank}" if blocks is None else f"{blocks} row blocks do not divide {n_in}"
    raise CheckpointError(
        f"{label}: expected {np.dtype(want.scales.dtype)} scales of shape {expected}, nb row blocks dividing "
        f"the {n_in} input rows; found {found.dtype} of shape {shape} ({problem})"
    )


def _check_array(label: str, what: str, want: jax.ShapeDtypeStruct, found: np.ndarray) -> None:
    dtype, shape = np.dtype(want.dtype), tuple(want.shape)
    if found.dtype != dtype or found.shape != shape:
        got = f"{found.shape}" if found.dtype == dtype else f"{found.dtype} of shape {found.shape}"
        raise CheckpointError(f"{label}: expected {dtype} {what} of shape {shape}, found {got}")
