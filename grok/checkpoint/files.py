"""A checkpoint directory, in either format: where it is, which format it holds, what it must hold.

Two formats hold the same weights: the release's one pickle per weight (`grok.checkpoint.pickles`)
and the converted safetensors files (`grok.checkpoint.safetensors_format`, made by
`grok.checkpoint.convert`). This module is their common ground: finding the directory
(`resolve_checkpoint_dir`), telling the format (`checkpoint_format`), the weights a config expects
in release file order (`expected_weights`) and the checks every weight read passes
(`check_weight`, `LayerScaleBlocks`), and writing a file so that it is never seen partial
(`atomic_write`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import BinaryIO, Iterator, Literal, Sequence

import jax
import numpy as np

from grok.model.config import GrokConfig
from grok.model.quant import QuantizedWeight8bit
from grok.model.weights import checkpoint_shapes, flatten, is_weight, model_path, quantized_shape, scale_block_count

PathLike = str | os.PathLike
Weight = np.ndarray | QuantizedWeight8bit

CHECKPOINT_SUBDIR = "ckpt-0"
LEGACY_CHECKPOINT_SUBDIR = "ckpt"  # what older revisions of the Hub repository call `ckpt-0/`
SAFETENSORS_SUBDIR = "safetensors"  # where `run.py convert` puts the converted checkpoint by default
SAFETENSORS_INDEX = "model.safetensors.index.json"
CHECKPOINT_SUBDIRS = (SAFETENSORS_SUBDIR, CHECKPOINT_SUBDIR, LEGACY_CHECKPOINT_SUBDIR)  # in order of preference
Format = Literal["pickle", "safetensors", "grok2-release"]
_RELEASE_COMMON = re.compile(r".*-TP-common\.safetensors$")  # Grok-2's release (`grok.checkpoint.grok2_release`)
_TENSOR_FILE = re.compile(r"tensor\d{5}_\d{3}")


class CheckpointError(Exception):
    """A checkpoint directory or tensor file that is missing, malformed, or does not fit the config."""


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
    file that a finished conversion writes last, "grok2-release" for Grok-2's release files, else
    "pickle" (Grok-1's release format).

    A directory with safetensors files but no index is an unfinished conversion: an error.
    """
    directory = Path(directory)
    if (directory / SAFETENSORS_INDEX).is_file():
        return "safetensors"
    if _holds_release(directory):
        return "grok2-release"
    if not tensor_files(directory) and any(name.endswith(".safetensors") for name in os.listdir(directory)):
        raise CheckpointError(
            f"{directory} holds .safetensors files but no {SAFETENSORS_INDEX}: the conversion did not finish; "
            "run convert again to complete it"
        )
    return "pickle"


def _holds_checkpoint(directory: Path) -> bool:
    return (directory / SAFETENSORS_INDEX).is_file() or bool(tensor_files(directory)) or _holds_release(directory)


def _holds_release(directory: Path) -> bool:
    return any(_RELEASE_COMMON.match(name) for name in os.listdir(directory))

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


FINGERPRINT_BYTES = 64 << 10  # read from each end of every file by `fingerprint_files`


def fingerprint_files(directory: PathLike) -> str:
    """A short digest of a checkpoint directory's files: their names, sizes and first and last
    FINGERPRINT_BYTES, which tell two checkpoints apart without reading hundreds of gigabytes."""
    digest, count, total = hashlib.sha256(), 0, 0
    for path in sorted(Path(directory).iterdir()):
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open_regular_file(path) as f:
            digest.update(f.read(FINGERPRINT_BYTES))
            if size > FINGERPRINT_BYTES:
                f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                digest.update(f.read())
        count, total = count + 1, total + size
    return f"{digest.hexdigest()[:16]} ({count} files, {total / 1e9:.3g} GB)"


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
