"""Fuzzing the release-format unpickler (`grok.checkpoint.pickles.load_tensor`).

Valid tensor files, mutated by byte flips, truncations and opcode splices, must each load (as plain
NumPy arrays of a numeric dtype) or be refused with a `CheckpointError` that names the file: no
other exception, no hang (a time limit per case), no crash of the process, and no side effect (no
file created, no module imported, no NumPy dtype or allow-listed class changed). Seeded: a failure
names its case, which reproduces.
"""

from __future__ import annotations

import os
import pickletools
import random
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from blocking import call_with_timeout

from grok.checkpoint import files, pickles
from grok.checkpoint.files import CheckpointError
from grok.checkpoint.pickles import ReleasePickler, load_tensor
from grok.model.quant import QuantizedWeight8bit

SEED = 1
CASES = 3000
CASE_TIMEOUT_S = 10.0
RECONSTRUCT = np.empty(0).__reduce__()[0]


class _NumPy1Pickler(ReleasePickler):
    """Names `_reconstruct` as NumPy 1.x writes it."""

    global_names = {**ReleasePickler.global_names, RECONSTRUCT: ("numpy.core.multiarray", "_reconstruct")}


def _weights() -> list[tuple[np.ndarray | QuantizedWeight8bit, type[ReleasePickler]]]:
    """Small weights of every kind a release holds, and the pickler to write each with."""
    rng = np.random.default_rng(0)
    return [
        (rng.standard_normal(6).astype(np.float32), ReleasePickler),
        (rng.standard_normal((2, 3)).astype(np.float32), ReleasePickler),
        (QuantizedWeight8bit(
            weight=rng.integers(-128, 128, (2, 4, 3), dtype=np.int8),
            scales=rng.standard_normal((2, 2, 3)).astype(ml_dtypes.bfloat16),
        ), ReleasePickler),
        (QuantizedWeight8bit(
            weight=rng.integers(-128, 128, (4, 3), dtype=np.int8), scales=np.ones((1, 3), ml_dtypes.bfloat16)
        ), _NumPy1Pickler),
    ]


def _valid_files(directory: Path) -> list[Path]:
    """The weights of `_weights` as tensor files, written by the release-format writer."""
    paths = []
    for i, (weight, pickler) in enumerate(_weights()):
        path = directory / files.tensor_file_name(i)
        with open(path, "wb") as file:
            pickler(file).dump(weight)
        paths.append(path)
    return paths


# Single opcodes worth splicing in: the ones that call, build, or reshuffle the stack and memo.
_OPCODES = [
    b"b", b"R", b"\x81", b"\x93", b"\x94", b"0", b"2", b"(", b"t", b")", b"\x85", b"\x86", b"\x87",
    b"}", b"u", b"s", b"]", b"e", b"N", b"\x88", b"\x89", b"K\x00", b"K\x01", b"h\x00", b"h\x03", b"h\x08",
    b"J\xff\xff\xff\xff", b"C\x01b", b"\x8c\x05numpy\x94\x8c\x05dtype\x93", b".",
]


class Mutator:
    """Seeded mutations of valid pickles: byte flips, truncations, and splices at opcode boundaries."""

    def __init__(self, pickles: list[bytes], seed: int) -> None:
        self.pickles = pickles
        self.bounds = [[pos for _, _, pos in pickletools.genops(data)] + [len(data)] for data in pickles]
        self.rng = random.Random(seed)

    def _piece(self) -> bytes:
        if self.rng.random() < 0.4:
            return self.rng.choice(_OPCODES)
        k = self.rng.randrange(len(self.pickles))
        bounds = self.bounds[k]
        a = self.rng.randrange(len(bounds) - 1)
        b = min(len(bounds) - 1, a + self.rng.randint(1, 6))
        return self.pickles[k][bounds[a]:bounds[b]]

    def __call__(self) -> tuple[str, bytes]:
        rng = self.rng
        k = rng.randrange(len(self.pickles))
        data, bounds = bytearray(self.pickles[k]), self.bounds[k]
        kind = rng.choice(["flip", "flip", "truncate", "splice", "splice", "insert", "delete"])
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(data))
                data[i] = rng.randrange(256) if rng.random() < 0.5 else data[i] ^ (1 << rng.randrange(8))
        elif kind == "truncate":
            del data[rng.randrange(len(data)):]
        else:
            at = rng.randrange(len(bounds) - 1)
            end = at if kind == "insert" else min(len(bounds) - 1, at + rng.randint(1, 4))
            data[bounds[at]:bounds[end]] = b"" if kind == "delete" else self._piece()
        return kind, bytes(data)


def _state(directory: Path) -> dict[str, object]:
    """What a pickle must not change: the files in `directory` (the working directory too), the imported
    modules, NumPy's dtypes, the allow-listed globals."""
    dtypes = [np.dtype(code) for code in np.typecodes["All"]] + [np.dtype(ml_dtypes.bfloat16)]
    allowed = [QuantizedWeight8bit, ml_dtypes.bfloat16, np.ndarray, np.dtype, *pickles._ALLOWED_GLOBALS.values()]
    return {
        "files": sorted(os.listdir(directory)),
        "modules": set(sys.modules),
        "dtypes": [
            (d.str, d.byteorder, d.itemsize, d.alignment, d.flags, d.fields, d.names, d.shape, d.metadata)
            for d in dtypes
        ],
        "classes": {repr(obj): sorted(dir(obj)) for obj in allowed},
    }


def _outcome(path: Path) -> str:
    """Load `path` under a time limit: "loaded" (checked to be plain numeric arrays) or "refused"."""
    try:
        weight = call_with_timeout(lambda: load_tensor(path), CASE_TIMEOUT_S)
    except CheckpointError as err:
        assert str(path) in str(err), f"the error does not name the file: {err}"
        return "refused"
    assert isinstance(weight, (np.ndarray, QuantizedWeight8bit)), type(weight)
    arrays = [weight] if isinstance(weight, np.ndarray) else [weight.weight, weight.scales]
    for array in arrays:
        assert type(array) is np.ndarray and array.dtype.kind in "biufV" and not array.dtype.hasobject, repr(array)
        array.tobytes(), repr(array)  # readable: shape, strides and dtype fit its memory
    return "loaded"


def test_valid_files_load(tmp_path):
    """Control for the fuzzer: the unmutated files load as what was written."""
    for path, (weight, _) in zip(_valid_files(tmp_path), _weights()):
        loaded = load_tensor(path)
        assert type(loaded) is type(weight)
        pairs = [(loaded, weight)] if isinstance(weight, np.ndarray) else [
            (loaded.weight, weight.weight), (loaded.scales, weight.scales)
        ]
        for got, want in pairs:
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


# Defects this fuzzer found in the unpickler as it was (pickle.Unpickler with NumPy's own globals):
FOUND = {
    # numpy.dtype("f4") given the state (3, "<", (None, None, None), -1, -1, 0): NumPy's
    # dtype.__setstate__ takes the 3-tuple for a subarray and the process dies (SIGSEGV).
    "crash": b"\x80\x04\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02f4\x89\x88\x87R(K\x03\x8c\x01<NNN\x87"
    b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.",
    # LONG_BINPUT 2**28: the C unpickler's memo becomes a table of 2**28 entries (4 GB at its peak,
    # and 7 s; 17 GB and a minute for the 2**30 of the case the fuzzer found).
    "memo": b"\x80\x04K\x01r\x00\x00\x00\x10.",
}
# The peak is this process's own high-water mark (VmHWM): getrusage's ru_maxrss survives exec, so
# it would report the (large) pytest process the child was forked from.
_LOAD_EACH = """
import sys
from grok.checkpoint.files import CheckpointError
from grok.checkpoint.pickles import load_tensor
for path in sys.argv[1:]:
    try:
        load_tensor(path)
        print("loaded", path)
    except CheckpointError as err:
        print("refused", err)
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
"""


def test_defects_found_by_fuzzing_are_refused(tmp_path):
    """In a subprocess under a time limit, as they crashed or exhausted the process before the fix."""
    paths = []
    for name, data in FOUND.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_EACH, *map(str, paths)], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-2000:]}"
    *lines, peak = result.stdout.splitlines()
    assert len(lines) == len(paths)
    for line, path in zip(lines, paths):
        assert line.startswith(f"refused {path}: not a valid tensor pickle") or line.startswith(f"refused {path}: holds")
    assert int(peak) < 2 << 30, f"peak memory {int(peak) / 2**30:.1f} GB"


def test_mutated_pickles_load_or_are_refused_with_no_side_effect(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    originals = [path.read_bytes() for path in _valid_files(tmp_path)]
    mutate = Mutator(originals, SEED)
    path = tmp_path / files.tensor_file_name(0)
    before = _state(tmp_path)
    counts = {"loaded": 0, "refused": 0}
    for case in range(CASES):
        kind, data = mutate()
        path.write_bytes(data)
        try:
            counts[_outcome(path)] += 1
        except (Exception, pytest.fail.Exception) as err:
            pytest.fail(f"case {case} ({kind}, seed {SEED}): {type(err).__name__}: {err}\npickle: {data!r}")
        after = _state(tmp_path)
        changed = [key for key in before if after[key] != before[key]]
        assert not changed, f"case {case} ({kind}, seed {SEED}) changed {changed}\npickle: {data!r}"
    # Both outcomes occur: the mutations reach past the first opcode, and some keep the file valid.
    assert counts["loaded"] > CASES // 100 and counts["refused"] > CASES // 2, counts
