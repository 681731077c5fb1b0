"""Reading and writing the release checkpoint format: a directory (`ckpt-0/`) of one pickle per weight.

File `tensor{i:05d}_000` holds weight i of `grok.weights.flatten(checkpoint tree)`, whose keys are
sorted as strings (so `decoder_layer_10` comes before `decoder_layer_2`): either an fp32 NumPy
array, or an 8-bit weight pickled as `__main__.QuantizedWeight8bit` with the instance state
`{"weight": int8 array, "scales": bf16 array}` (pickle protocol 4), exactly as released.
Pickles can run code, so files are read with an unpickler that admits only the release's globals.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import BinaryIO, Iterator

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from grok.config import GrokConfig
from grok.quant import QuantizedWeight8bit
from grok.weights import Params, checkpoint_shapes, flatten, is_weight

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct

PathLike = str | os.PathLike
Weight = np.ndarray | QuantizedWeight8bit

PROTOCOL = 4
CHECKPOINT_SUBDIR = "ckpt-0"
_TENSOR_FILE = re.compile(r"tensor\d{5}_\d{3}")
_RELEASE_CLASS = ("__main__", "QuantizedWeight8bit")

# Every global a release tensor file may reference, except `__main__.QuantizedWeight8bit`.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # written by NumPy 1.x
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # written by NumPy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
}


class CheckpointError(Exception):
    """A checkpoint directory or tensor file that is missing, malformed, or does not fit the config."""


class UnsafePickleError(CheckpointError):
    """A tensor file whose pickle references a global outside the allow-list (nothing of it is run)."""


def tensor_file_name(index: int) -> str:
    """Name of the file holding weight `index` of the flattened checkpoint tree."""
    return f"tensor{index:05d}_000"


def resolve_checkpoint_dir(directory: PathLike) -> Path:
    """`directory` itself, or its `ckpt-0/` subdirectory when `directory` holds no tensor files."""
    directory = Path(directory)
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise CheckpointError(f"checkpoint directory {directory} {problem}")
    if not _tensor_files(directory) and (directory / CHECKPOINT_SUBDIR).is_dir():
        return directory / CHECKPOINT_SUBDIR
    return directory


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
    foreign = sorted(_tensor_files(directory) - {tensor_file_name(i) for i in range(len(names))})
    if foreign:
        raise CheckpointError(
            f"{directory} already holds tensor files of another checkpoint ({foreign[0]}, ...); "
            "write into an empty directory"
        )
    for i, weight in enumerate(tqdm(weights, desc=f"writing {directory}", unit="file", disable=not progress)):
        _write_atomically(directory / tensor_file_name(i), _to_numpy(weight))


def _to_numpy(weight) -> Weight:
    if isinstance(weight, QuantizedWeight8bit):
        return QuantizedWeight8bit(weight=np.asarray(weight.weight), scales=np.asarray(weight.scales))
    return np.asarray(weight)


def _write_atomically(path: Path, obj: Weight) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            ReleasePickler(file).dump(obj)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------- reading


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the release's globals; any other raises `UnsafePickleError`.

    `__main__.QuantizedWeight8bit` resolves to `stand_in`, a fresh empty class made for this file:
    the pickle can fill its instances' `__dict__` but cannot touch `grok.quant.QuantizedWeight8bit`
    (whose class attributes it could otherwise overwrite with BUILD). `load_tensor` converts it.
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


def load_tensor(path: PathLike) -> Weight:
    """One tensor file, safely: a NumPy array or a `QuantizedWeight8bit` of two NumPy arrays."""
    label = str(path)
    try:
        with open(path, "rb") as file:
            unpickler = SafeUnpickler(file, label)
            obj = unpickler.load()
    except CheckpointError:
        raise
    except OSError as err:
        raise CheckpointError(f"{label}: cannot be read: {err}") from err
    except Exception as err:  # truncated, not a pickle, or state that NumPy rejects
        raise CheckpointError(f"{label}: not a valid tensor pickle ({type(err).__name__}: {err})") from err

    if type(obj) is np.ndarray:
        return obj
    if type(obj) is unpickler.stand_in:
        state = vars(obj)
        if set(state) != {"weight", "scales"} or any(type(v) is not np.ndarray for v in state.values()):
            found = {key: type(value).__name__ for key, value in state.items()}
            raise CheckpointError(
                f"{label}: QuantizedWeight8bit must hold NumPy arrays 'weight' and 'scales', found {found}"
            )
        return QuantizedWeight8bit(weight=state["weight"], scales=state["scales"])
    raise CheckpointError(f"{label}: holds a {type(obj).__name__}, not a NumPy array or QuantizedWeight8bit")


def iter_checkpoint(directory: PathLike, config: GrokConfig, *, progress: bool = True) -> Iterator[tuple[str, Weight]]:
    """Yield (parameter path, weight) file by file, each checked against what `config` expects.

    Only one file's weight is in memory at a time (plus whatever the caller keeps).
    """
    directory = resolve_checkpoint_dir(directory)
    names, expected = flatten(checkpoint_shapes(config))
    _check_files_present(directory, names)
    for i, (name, want) in enumerate(
        tqdm(list(zip(names, expected)), desc=f"reading {directory}", unit="file", disable=not progress)
    ):
        path = directory / tensor_file_name(i)
        weight = load_tensor(path)
        _check_weight(f"{path} ({name})", want, weight)
        yield name, weight


def read_checkpoint(directory: PathLike, config: GrokConfig, *, progress: bool = True) -> Params:
    """Load a release checkpoint (`DIR/ckpt-0` or `DIR`) as a checkpoint tree of NumPy arrays."""
    expected_tree = checkpoint_shapes(config)
    loaded = [weight for _, weight in iter_checkpoint(directory, config, progress=progress)]
    treedef = jax.tree_util.tree_structure(expected_tree, is_leaf=is_weight)
    return jax.tree_util.tree_unflatten(treedef, loaded)


def _tensor_files(directory: Path) -> set[str]:
    return {name for name in os.listdir(directory) if _TENSOR_FILE.fullmatch(name)}


def _check_files_present(directory: Path, names: list[str]) -> None:
    """Exactly the files tensor00000_000 .. tensor{N-1}_000, one per expected weight."""
    found = _tensor_files(directory)
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


def _check_weight(label: str, want, found: Weight) -> None:
    if isinstance(want, QuantizedWeight8bit):
        if not isinstance(found, QuantizedWeight8bit):
            raise CheckpointError(
                f"{label}: expected an 8-bit weight (QuantizedWeight8bit), found a {found.dtype} array "
                f"of shape {found.shape}"
            )
        _check_array(label, "weight", want.weight, found.weight)
        _check_array(label, "scales", want.scales, found.scales)
    elif isinstance(found, QuantizedWeight8bit):
        raise CheckpointError(
            f"{label}: expected {np.dtype(want.dtype)} array of shape {tuple(want.shape)}, found an 8-bit weight"
        )
    else:
        _check_array(label, "array", want, found)


def _check_array(label: str, what: str, want: jax.ShapeDtypeStruct, found: np.ndarray) -> None:
    dtype, shape = np.dtype(want.dtype), tuple(want.shape)
    if found.dtype != dtype or found.shape != shape:
        got = f"{found.shape}" if found.dtype == dtype else f"{found.dtype} of shape {found.shape}"
        raise CheckpointError(f"{label}: expected {dtype} {what} of shape {shape}, found {got}")
