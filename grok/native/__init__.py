"""Native CPU kernels: C++ sources here, compiled on first use and called through XLA's FFI.

One kernel, in two entry points: `matmul_t`, the product of a few rows with a CPU-format weight
([out, in], float32), where XLA:CPU's own dot reads the weight at about half the machine's
bandwidth, optionally batched (one product per batch element: a decode step's attention logits);
and `grouped_matmul_t`, the ragged product of a mixture of experts (rows grouped by expert, each
group times its expert's weight). They need an x86-64 CPU with AVX2 and FMA and a C++17 compiler
(`$CXX`, default `g++`). Where either is missing, or `GROK_NATIVE_KERNELS=0`, `available()` is
False and callers use XLA's ops: the same numbers up to float32 summation order, only slower. The
compiled library is cached under `$GROK_CACHE_DIR` (default `~/.cache/grok`), keyed by the source,
the flags and the jaxlib version.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jaxlib
from jaxtyping import Array, Float, Int

SOURCE = pathlib.Path(__file__).with_name("matmul_t.cc")
log = logging.getLogger("grok")
TARGETS = {"grok_matmul_t": "GrokMatmulT", "grok_grouped_matmul_t": "GrokGroupedMatmulT"}
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w")

# From 2 up to this many rows the kernel beats XLA:CPU's dot (measured on a 2-core AMD EPYC
# machine: 1.4-2x at 2 to 16 rows); XLA's tiled GEMM catches up at about 32 rows, and its GEMV
# matches the kernel at 1 row.
MAX_ROWS = 16

_threads: int | None = None  # see `set_threads`


def set_threads(count: int | None) -> None:
    """Use at most `count` threads in the native kernels (None: every thread of XLA's intra-op pool).
    Takes effect for computations traced after the call."""
    global _threads
    if count is not None and count < 1:
        raise ValueError(f"thread count must be at least 1, got {count}")
    _threads = count


def threads() -> int | None:
    """The limit `set_threads` set (None: no limit)."""
    return _threads


def matmul_t(x: Float[Array, "*batch m d_in"], w_t: Float[Array, "*batch d_out d_in"]) -> Float[Array, "*batch m d_out"]:
    """x @ w_t.T in float32 by the native kernel, one product per element of the leading batch
    dimensions that x and w_t share (call only when `available()`)."""
    out = jax.ShapeDtypeStruct((*x.shape[:-1], w_t.shape[-2]), jnp.float32)
    return jax.ffi.ffi_call("grok_matmul_t", out)(x.astype(jnp.float32), w_t.astype(jnp.float32))


def grouped_matmul_t(
    x: Float[Array, "r d_in"], group_sizes: Int[Array, "e"], weights: Sequence[Float[Array, "d_out d_in"]]
) -> Float[Array, "r d_out"]:
    """The ragged product of a mixture of experts by the native kernel (call only when
    `available()`): x's rows come grouped by expert, the first group_sizes[0] rows times
    weights[0].T, the next group_sizes[1] times weights[1].T, ...; rows past the groups are zero.
    An expert whose group is empty has its weight left unread."""
    out = jax.ShapeDtypeStruct((x.shape[0], weights[0].shape[0]), jnp.float32)
    call = jax.ffi.ffi_call("grok_grouped_matmul_t", out)
    return call(x.astype(jnp.float32), group_sizes.astype(jnp.int32), *(w.astype(jnp.float32) for w in weights))


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA (built now if needed; warns once if not)."""
    if os.environ.get("GROK_NATIVE_KERNELS", "1") == "0":
        return False
    library = _load()
    if isinstance(library, str):
        warnings.warn(f"native CPU kernels off ({library}); using XLA's dot, which is slower for decoding")
        return False
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def _load() -> ctypes.CDLL | str:
    """The compiled library, or why there is none."""
    reason = _unsupported_reason()
    if reason is not None:
        return reason
    try:
        return ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as error:
        return f"building {SOURCE.name} failed: {_first_line(error)}"


def _unsupported_reason() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "cannot read /proc/cpuinfo to check for AVX2 and FMA"
    if "avx2" not in flags or "fma" not in flags:
        return "the CPU lacks AVX2 or FMA"
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler {_compiler()!r} on PATH (set $CXX)"
    return None


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _build() -> pathlib.Path:
    """The compiled library, compiling it into the cache first if it is not there."""
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, jaxlib.__version__, _compiler())).encode()).hexdigest()
    cache = pathlib.Path(os.environ.get("GROK_CACHE_DIR", pathlib.Path.home() / ".cache" / "grok")) / "native"
    library = cache / f"{SOURCE.stem}-{key[:16]}.so"
    if not library.exists():
        log.info("compiling the native CPU kernels into %s (once per machine, a few seconds)", cache)
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:  # compile aside, then move: safe for concurrent processes
            built = pathlib.Path(scratch) / library.name
            command = [_compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", "-o", str(built), str(SOURCE)]
            subprocess.run(command, check=True, capture_output=True, text=True)
            os.replace(built, library)
    return library


def _first_line(error: Exception) -> str:
    text = getattr(error, "stderr", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
