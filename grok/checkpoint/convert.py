"""`run.py convert`: turn a release (pickle) checkpoint into the safetensors format.

The format and why it was chosen are described in `grok.checkpoint.safetensors_format`. Conversion is
exact (the same int8, bf16 and fp32 bytes), streams one weight at a time (the host holds at most
one release file, about 1.6 GB for Grok-1's largest) and can be resumed: every output file is
written under a temporary name and renamed when complete, so an interrupted conversion leaves only
whole files, which the next run keeps; the index, written last, marks the directory finished.

Each output file records its source file in its metadata (`source`: its path in the resolved source
directory, with `source_size` and `source_mtime_ns`), and is kept only while its source is that file.
A directory holding the conversion of another checkpoint (a source in another directory) is
refused before anything in it is touched.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from grok.checkpoint import files, grok2_release, pickles
from grok.checkpoint.files import SAFETENSORS_INDEX, CheckpointError, PathLike, Weight
from grok.checkpoint.safetensors_format import (
    FORMAT,
    file_name,
    open_file,
    tensor_keys,
    weight_of,
    write_file,
    write_index,
)
from grok.model.config import GrokConfig
from grok.model.quant import QuantizedWeight8bit

log = logging.getLogger("grok")
_OUTPUT_FILE = re.compile(r"tensor(\d{5})\.safetensors")
_STALE_TEMPORARY = re.compile(r"\.(tensor\d{5}\.safetensors|" + re.escape(SAFETENSORS_INDEX) + r")\.tmp\d+")


def convert(
    src_dir: PathLike, dst_dir: PathLike, config: GrokConfig, progress: bool = True, quantize: bool = False
) -> Path:
    """Convert the release checkpoint in `src_dir` (or its `ckpt-0/` or `ckpt/`) into `dst_dir`; returns `dst_dir`.

    Grok-2's release (bf16 safetensors) needs `quantize`: its int8 form (per-column bf16 scales, as
    `--quantize int8` makes at load) is written, once, for loading at one byte per weight without
    quantizing every time; Grok-1's checkpoints are 8-bit already.

    Every source file is checked against `config` as it is read (errors name the file and the
    parameter). Output files already in `dst_dir` with the expected tensors, dtypes and shapes,
    converted from the same source file as it is now (path, size, modification time), are kept, so
    running this again after an interruption only converts what is left; delete `dst_dir` to start
    over. A `dst_dir` converted from another directory is refused (a CheckpointError naming both).
    """
    src = Path(src_dir)
    files.resolve_checkpoint_dir(src)  # a CheckpointError if it does not exist
    if grok2_release.is_release(src):
        if not quantize:
            raise ValueError(f"{src} is Grok-2's release, which loads as it is; convert writes its int8 form: "
                             "pass --quantize int8")
        return _convert_release(src, Path(dst_dir), config, progress)
    if quantize:
        raise ValueError(f"{src} holds Grok-1's checkpoint, 8-bit already: --quantize int8 is for Grok-2's release")
    if not files.tensor_files(src):
        for name in (files.CHECKPOINT_SUBDIR, files.LEGACY_CHECKPOINT_SUBDIR):
            if (src / name).is_dir():
                src = src / name
                break
    if (src / SAFETENSORS_INDEX).is_file():
        raise CheckpointError(f"{src} is already in the safetensors format")
    dst = Path(dst_dir)
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"convert needs an output directory other than its input {src}")
    names, expected, _ = files.expected_weights(config)
    files.check_files_present(src, names)
    origin_dir = src.resolve()  # what the output records; not each file's target (the Hub's cache links blobs)
    _prepare_output(dst, len(names), origin_dir)

    weight_map: dict[str, str] = {}
    total_size = kept = 0
    layers = files.LayerScaleBlocks()
    bar = tqdm(list(zip(names, expected)), desc=f"converting {src} -> {dst}", unit="file", disable=not progress)
    for i, (name, want) in enumerate(bar):
        out = dst / file_name(i)
        weight_map.update(dict.fromkeys(tensor_keys(name, want), out.name))
        source = src / files.tensor_file_name(i)
        origin = source_record(origin_dir / source.name)
        converted = _converted(out, name, want, origin)
        if converted is not None:
            layers.check(f"{out} ({name})", name, converted)
            total_size += sum(_nbytes(array) for array in tensor_keys(name, converted).values())
            kept += 1
            continue
        weight = pickles.load_tensor(source)
        files.check_weight(f"{source} ({name})", want, weight)
        layers.check(f"{source} ({name})", name, weight)
        total_size += write_file(out, tensor_keys(name, weight), {"format": FORMAT, "name": name, **origin})
        del weight  # before the next file is read
    write_index(dst, weight_map, total_size, {"source": str(origin_dir)})
    resumed = f" ({kept} files were already converted)" if kept else ""
    log.info("converted %d weights (%.2f GB) from %s to %s%s", len(names), total_size / 1e9, src, dst, resumed)
    return dst


def _prepare_output(dst: Path, count: int, origin_dir: Path) -> None:
    """Make `dst` ready for a conversion of `count` weights from `origin_dir`: refused if it holds
    another checkpoint; unfinished (no index) until the end; temporary files of a killed run gone."""
    dst.mkdir(parents=True, exist_ok=True)
    _check_output_dir(dst, count)
    _check_same_source(dst, origin_dir)
    (dst / SAFETENSORS_INDEX).unlink(missing_ok=True)  # unfinished until it is written again at the end
    for path in dst.iterdir():
        if _STALE_TEMPORARY.fullmatch(path.name):
            path.unlink()  # left by a conversion that was killed (see `files.atomic_write`)


def _convert_release(src: Path, dst: Path, config: GrokConfig, progress: bool) -> Path:
    """Grok-2's release into the safetensors format, its matrices quantized to int8 (resumable as
    `convert`: an output file is kept while it records this release and weight)."""
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"convert needs an output directory other than its input {src}")
    names, expected, _ = files.expected_weights(config)
    wanted = grok2_release.expected_release(expected, quantize=True)
    origin_dir = src.resolve()
    _prepare_output(dst, len(names), origin_dir)
    release = grok2_release.Release(src)
    weight_map: dict[str, str] = {}
    total_size = kept = 0
    bar = tqdm(list(zip(names, wanted)), desc=f"quantizing {src} -> {dst}", unit="weight", disable=not progress)
    for i, (name, want) in enumerate(bar):
        out = dst / file_name(i)
        weight_map.update(dict.fromkeys(tensor_keys(name, want), out.name))
        origin = {"source": str(origin_dir / "release"), "weight": name, "quantize": "int8"}
        converted = _converted(out, name, want, origin)
        if converted is not None:
            total_size += sum(_nbytes(array) for array in tensor_keys(name, converted).values())
            kept += 1
            continue
        source = release.source(name)
        weight = grok2_release.quantized(source) if isinstance(want, QuantizedWeight8bit) else source
        files.check_weight(f"{src} ({name})", want, weight)
        total_size += write_file(out, tensor_keys(name, weight), {"format": FORMAT, "name": name, **origin})
    write_index(dst, weight_map, total_size, {"source": str(origin_dir), "quantize": "int8"})
    resumed = f" ({kept} files were already converted)" if kept else ""
    log.info("quantized %d weights (%.2f GB) from %s to %s%s", len(names), total_size / 1e9, src, dst, resumed)
    return dst


def _check_output_dir(dst: Path, count: int) -> None:
    """Refuse a directory that holds a release checkpoint, or the output of a larger model."""
    if files.tensor_files(dst):
        raise CheckpointError(f"{dst} holds release tensor files; convert into another directory")
    foreign = sorted(
        name for name in os.listdir(dst) if (match := _OUTPUT_FILE.fullmatch(name)) and int(match.group(1)) >= count
    )
    if foreign:
        raise CheckpointError(
            f"{dst} already holds files of another checkpoint ({foreign[0]}, ...); convert into an empty directory"
        )


def source_record(path: Path) -> dict[str, str]:
    """What an output file records of its source file `path` (in its resolved directory), as safetensors
    metadata (strings): which file it was, and which version of it (size and modification time)."""
    info = path.stat()
    return {"source": str(path), "source_size": str(info.st_size), "source_mtime_ns": str(info.st_mtime_ns)}


def _check_same_source(dst: Path, src: Path) -> None:
    """Refuse `dst` if one of its output files was converted from a directory other than `src` (resolved)."""
    for path in sorted(dst.iterdir()):
        if not _OUTPUT_FILE.fullmatch(path.name):
            continue
        try:
            recorded = open_file(path).metadata.get("source")
        except CheckpointError:
            continue  # damaged: converted again
        if recorded is not None and Path(recorded).is_absolute() and Path(recorded).parent != src:
            raise CheckpointError(
                f"{dst} holds a conversion of {Path(recorded).parent}, not of {src} ({path.name} was converted "
                f"from {recorded}); convert into another directory, or delete {dst} to start over"
            )


def _converted(path: Path, name: str, want, origin: dict[str, str]) -> Weight | None:
    """Weight `name` as `path` holds it (its tensors, unread) if that is a valid safetensors file holding
    exactly this weight's tensors with dtypes and shapes `check_weight` accepts for `want`, converted from
    the source that `origin` (`source_record`) describes; else None."""
    if not path.is_file():
        return None
    try:
        handle = open_file(path)
        if any(handle.metadata.get(key) != value for key, value in origin.items()):
            return None  # another source, or this one changed since
        weight = weight_of(str(path), name, {key: handle.array(key) for key in handle.keys()})
        files.check_weight(str(path), want, weight)
    except CheckpointError:
        return None
    return weight


def _nbytes(array) -> int:
    return int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
