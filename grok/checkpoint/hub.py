"""`run.py download`: fetch the released checkpoint from the Hugging Face Hub, and check it is complete.

Grok-2's repository (xai-org/grok-2) is laid out otherwise: its safetensors files and
`tokenizer.tok.json` at the top (`grok.checkpoint.grok2_release`); `download` fetches those into
`local_dir` itself, and `verify_download` opens every file's header and checks each weight's
tensors are there, with the shapes the config expects, and that the tokenizer loads.

`download` fetches `ckpt-0/*` (older revisions of the repository call the directory `ckpt/`) and
`tokenizer.model` with `huggingface_hub.snapshot_download` into a plain directory, with progress
bars. Running it again continues an interrupted download: files already complete (recorded in
`LOCAL_DIR/.cache/huggingface/`) are kept without a request, and an HTTP transfer cut off midway is
retried by `huggingface_hub` from where it stopped (a `Range` request). A file whose process was
killed mid-transfer is fetched again from its start.

`verify_download` then checks, without reading any tensor, that every tensor file the config
expects is there with a plausible size, and that the tokenizer is there.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import httpx2
import numpy as np
import tqdm
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import XetDownloadError
from huggingface_hub.hf_api import RepoFile, RepoFolder

from grok.checkpoint import grok2_release
from grok.checkpoint.files import (
    CHECKPOINT_SUBDIR,
    LEGACY_CHECKPOINT_SUBDIR,
    CheckpointError,
    PathLike,
    expected_weights,
    tensor_file_name,
    tensor_files,
)
from grok.model.config import GrokConfig
from grok.model.quant import QuantizedWeight8bit
from grok.model.weights import checkpoint_shapes, flatten, quantized_shape

log = logging.getLogger("grok")

REPO_ID = "xai-org/grok-1"
TOKENIZER_FILE = "tokenizer.model"
GROK2_TOKENIZER_FILE = "tokenizer.tok.json"
# A release tensor file is its arrays' bytes plus a pickle header of a few hundred bytes; anything
# beyond this allowance is not the file the config expects.
PICKLE_OVERHEAD = 64 * 1024
_SHOWN = 5  # names listed per kind of problem

# What a failed transfer raises: HTTP status errors and files that fail their size check (OSError
# subclasses in huggingface_hub), connection errors of its HTTP client, and Xet transfer errors.
_TRANSFER_ERRORS = (OSError, httpx2.HTTPError, XetDownloadError)


class DownloadError(CheckpointError):
    """The Hub could not be reached, or a transfer failed; what was complete is kept for the next try."""


def download(
    repo_id: str = REPO_ID,
    local_dir: PathLike = "checkpoints",
    revision: str | None = None,
    endpoint: str | None = None,
    progress: bool = True,
) -> Path:
    """Download the checkpoint directory and the tokenizer of `repo_id` into `local_dir`.

    Returns the directory that holds the tensor files: `local_dir/ckpt-0`, or `local_dir/ckpt` for
    a revision that names it so (`grok.checkpoint.files.resolve_checkpoint_dir(local_dir)` finds either).
    `revision` is a branch, tag or commit (default: the main branch); `endpoint` a Hub URL (default:
    `HF_ENDPOINT`, else huggingface.co). Raises `DownloadError` when the Hub cannot be reached or a
    transfer fails; run it again to continue. Check the result with `verify_download`.
    """
    local_dir = Path(local_dir)
    api = HfApi(endpoint=endpoint)
    try:
        commit = api.model_info(repo_id, revision=revision).sha
        top = {entry.path: entry for entry in api.list_repo_tree(repo_id, revision=commit)}
    except _TRANSFER_ERRORS as err:
        raise DownloadError(f"cannot list {repo_id} at revision {revision or 'main'}: {err}") from err
    if any(grok2_release.COMMON.match(path) for path, entry in top.items() if isinstance(entry, RepoFile)):
        return _download_release(repo_id, top, commit, local_dir, endpoint, progress)
    folders = [d for d in (CHECKPOINT_SUBDIR, LEGACY_CHECKPOINT_SUBDIR) if isinstance(top.get(d), RepoFolder)]
    subdir = folders[0] if folders else None
    if subdir is None or not isinstance(top.get(TOKENIZER_FILE), RepoFile):
        wanted = f"{CHECKPOINT_SUBDIR}/ (or {LEGACY_CHECKPOINT_SUBDIR}/) and {TOKENIZER_FILE}"
        raise DownloadError(
            f"{repo_id} at revision {revision or 'main'} (commit {commit}) does not hold {wanted}; "
            f"it holds: {', '.join(sorted(top)) or 'nothing'}"
        )

    log.info("downloading %s/ and %s of %s (commit %s) into %s", subdir, TOKENIZER_FILE, repo_id, commit, local_dir)
    _snapshot(repo_id, commit, local_dir, [f"{subdir}/*", TOKENIZER_FILE], endpoint, progress)
    log.info("checkpoint: %s, tokenizer: %s", local_dir / subdir, local_dir / TOKENIZER_FILE)
    return local_dir / subdir


def _download_release(repo_id: str, top: dict, commit: str, local_dir: Path, endpoint: str | None,
                      progress: bool) -> Path:
    """Grok-2's layout: its safetensors files and tokenizer into `local_dir` itself."""
    if not isinstance(top.get(GROK2_TOKENIZER_FILE), RepoFile):
        raise DownloadError(f"{repo_id} (commit {commit}) holds Grok-2's safetensors but no {GROK2_TOKENIZER_FILE}")
    log.info("downloading the safetensors files and %s of %s (commit %s) into %s", GROK2_TOKENIZER_FILE, repo_id,
             commit, local_dir)
    _snapshot(repo_id, commit, local_dir, ["*.safetensors", GROK2_TOKENIZER_FILE], endpoint, progress)
    return local_dir


def _snapshot(repo_id: str, commit: str, local_dir: Path, patterns: list[str], endpoint: str | None,
              progress: bool) -> None:
    """`snapshot_download` of `patterns` at exactly `commit` (even if the branch moves meanwhile); a
    failed transfer is a DownloadError saying to run it again."""
    try:
        snapshot_download(repo_id, revision=commit, local_dir=local_dir, allow_patterns=patterns, endpoint=endpoint,
                          tqdm_class=None if progress else _NoProgress)
    except _TRANSFER_ERRORS as err:
        raise DownloadError(
            f"download of {repo_id} into {local_dir} stopped: {err}. Run it again to continue "
            "(files already complete are kept)"
        ) from err


class _NoProgress(tqdm.tqdm):
    """A progress bar that never shows (for `progress=False`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def verify_download(local_dir: PathLike, config: GrokConfig) -> None:
    """Check that `local_dir` holds a complete release checkpoint for `config`, without reading it.

    `local_dir` is the directory given to `download`. Every tensor file the config expects must be
    in `local_dir/ckpt-0` (or `local_dir/ckpt`) with at least the bytes of its arrays and at most
    `PICKLE_OVERHEAD` more (for an 8-bit weight, with its scales in any number of row blocks that
    divides its input size; sizes reported are the release's), no other tensor file may be there,
    and `local_dir/tokenizer.model` must be a non-empty file.
    Raises `CheckpointError` saying what is missing, short or unexpected (the first few names of
    each, and how many).
    """
    local_dir = Path(local_dir)
    if local_dir.is_dir() and grok2_release.is_release(local_dir):
        return _verify_release(local_dir, config)
    directory = _downloaded_checkpoint_dir(local_dir)
    names, expected = flatten(checkpoint_shapes(config))
    missing, short, long = [], [], []
    for i, (name, want) in enumerate(zip(names, expected)):
        path = directory / tensor_file_name(i)
        if not path.is_file():
            missing.append(f"{path.name} ({name})")
            continue
        size, payloads = path.stat().st_size, _payloads(want)
        if any(low <= size <= low + PICKLE_OVERHEAD for low in payloads):
            continue
        low = _payload_bytes(want)  # as released
        if size < low:
            short.append(f"{path.name} ({name}: {size:,} of at least {low:,} bytes)")
        else:
            long.append(f"{path.name} ({name}: {size:,} bytes, expected at most {low + PICKLE_OVERHEAD:,})")
    wanted = {tensor_file_name(i) for i in range(len(names))}
    unexpected = sorted(tensor_files(directory) - wanted) if directory.is_dir() else []

    problems = [
        _listing(f"of {len(names)} tensor files missing", missing),
        _listing("truncated", short),
        _listing("larger than their tensors", long),
        _listing("unexpected for this config", unexpected),
    ]
    tokenizer = local_dir / TOKENIZER_FILE
    if not tokenizer.is_file():
        problems.append(f"{TOKENIZER_FILE} missing")
    elif tokenizer.stat().st_size == 0:
        problems.append(f"{TOKENIZER_FILE} empty")
    problems = [problem for problem in problems if problem]
    if problems:
        raise CheckpointError(
            f"incomplete checkpoint in {directory}: {'; '.join(problems)}. "
            "Run download again to fetch what is missing"
        )
    log.info("%s: all %d tensor files present with plausible sizes, and %s", directory, len(names), TOKENIZER_FILE)


def _verify_release(local_dir: Path, config: GrokConfig) -> None:
    """Grok-2's release: every weight's tensors in the files' headers with the shapes `config` expects
    (nothing read but the headers; a truncated file fails its header's check), and a non-empty tokenizer."""
    names, expected, _ = expected_weights(config)
    try:
        for _ in grok2_release.iter_weights(local_dir, names, grok2_release.expected_release(expected, False), False):
            pass
    except CheckpointError as err:
        raise CheckpointError(f"incomplete checkpoint in {local_dir}: {err}. Run download again to fetch what is "
                              "missing") from None
    tokenizer = local_dir / GROK2_TOKENIZER_FILE
    if not tokenizer.is_file() or tokenizer.stat().st_size == 0:
        raise CheckpointError(f"incomplete checkpoint in {local_dir}: {GROK2_TOKENIZER_FILE} missing or empty. "
                              "Run download again to fetch what is missing")
    log.info("%s: all %d weights present with the expected shapes, and %s", local_dir, len(names),
             GROK2_TOKENIZER_FILE)


def _downloaded_checkpoint_dir(local_dir: Path) -> Path:
    for name in (CHECKPOINT_SUBDIR, LEGACY_CHECKPOINT_SUBDIR):
        if (local_dir / name).is_dir():
            return local_dir / name
    return local_dir / CHECKPOINT_SUBDIR  # reported as missing all its files


def _payloads(want) -> list[int]:
    """Bytes of the arrays of weight `want` as it may be stored: an 8-bit one with its scales in any
    number of row blocks that divides its input size (`grok.checkpoint.files.check_weight`)."""
    if not isinstance(want, QuantizedWeight8bit):
        return [_payload_bytes(want)]
    return [_payload_bytes(quantized_shape(want.shape, nb)) for nb in _divisors(want.shape[-2])]


@functools.cache
def _divisors(n: int) -> tuple[int, ...]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return tuple(sorted({*small, *(n // d for d in small)}))


def _payload_bytes(weight) -> int:
    arrays = [weight.weight, weight.scales] if isinstance(weight, QuantizedWeight8bit) else [weight]
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in arrays)


def _listing(what: str, items: list[str]) -> str:
    if not items:
        return ""
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"{len(items)} {what}: {', '.join(items[:_SHOWN])}{more}"
