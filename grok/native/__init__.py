"""Native CPU kernels: C++ sources here, compiled on first use and called through XLA's FFI.

Two libraries:
- `matmul_t.cc`, for the f32 CPU format: `matmul_t`, the product of a few rows with a float32
  weight [out, in], where XLA:CPU's own dot reads the weight at about half the machine's bandwidth,
  optionally batched (a decode step's attention logits); and `grouped_matmul_t`, the ragged
  product of a mixture of experts. It needs AVX2 and FMA (`available()`).
- `int8_matmul.cc`, for the released 8-bit weights read as stored: `int8_matmul`, rows of bf16 or
  f32 values times int8 weights with bf16 scales (one weight, or one per group of rows: the
  experts of a mixture), and `bf16_matmul_t`, bf16 rows times a bf16 table transposed (the tied
  output projection). Each has four code paths, chosen at run time by `isa()`
  (`int8_available()`): AVX-512 with BF16 multiplying bf16 pairs (`vdpbf16ps`), the same
  multiplying in f32 with FMAs (for CPUs whose `vdpbf16ps` is slow), AVX2 with FMA, and portable C++.

Both need a C++17 compiler (`$CXX`, default `g++`). Where a library cannot be built, or
`GROK_NATIVE_KERNELS=0`, its `available` function is False and callers use XLA's ops: the same
numbers up to float32 summation order, only slower. Compiled libraries are cached under
`$GROK_CACHE_DIR` (default `~/.cache/grok`), keyed by the source, the flags and the jaxlib version.
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
import numpy as np
from jaxtyping import Array, Float, Int, Int8, Shaped

HERE = pathlib.Path(__file__).parent
log = logging.getLogger("grok")
TARGETS = {"grok_matmul_t": "GrokMatmulT", "grok_grouped_matmul_t": "GrokGroupedMatmulT"}
INT8_TARGETS = {"grok_int8_matmul": "GrokInt8Matmul", "grok_bf16_matmul_t": "GrokBf16MatmulT"}
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w")
# Baseline flags: the AVX2 and AVX-512 paths are compiled per function (target attributes), so
# the library loads on any x86-64 CPU (and elsewhere builds its portable path only).
INT8_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")

# `isa()`'s names, in the code's numbering, and the /proc/cpuinfo flags each needs.
ISAS = {"portable": 0, "avx2": 1, "avx512": 2, "avx512-fma": 3}
_AVX512_BF16 = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
ISA_CPU_FLAGS = {"portable": (), "avx2": ("avx2", "fma"), "avx512": _AVX512_BF16, "avx512-fma": _AVX512_BF16}
# "avx512" does one vdpbf16ps where "avx512-fma" does two FMAs: it is chosen where a vdpbf16ps
# costs less than this many FMAs (measured: 4 on an Intel Xeon, Emerald Rapids).
BF16_DOT_COST_LIMIT = 2.0
ISA_VARIABLE = "GROK_NATIVE_ISA"

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


def int8_matmul(
    x: Float[Array, "r d_in"],
    weight: Int8[Array, "*e d_in d_out"],
    scales: Shaped[Array, "*e nb d_out"],
    group_sizes: Int[Array, "e"] | None = None,
) -> Float[Array, "r d_out"]:
    """x @ (weight * scales) in float32 by the native kernel (call only when `int8_available()`),
    the weight's values rounded to bf16 first (GROK1.md). x is bf16 or f32 (as it is: its values
    are used exactly). Stacked weights [e, in, out] take x's rows grouped: the first
    group_sizes[0] rows times weight 0, the next group_sizes[1] times weight 1, ...; rows past the
    groups are zero, and a weight whose group is empty is not read."""
    if weight.ndim == 2:
        weight, scales = weight[None], scales[None]
        group_sizes = jnp.full((1,), x.shape[0], jnp.int32)
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        x = x.astype(jnp.float32)
    out = jax.ShapeDtypeStruct((x.shape[0], weight.shape[-1]), jnp.float32)
    call = jax.ffi.ffi_call("grok_int8_matmul", out)
    return call(x, group_sizes.astype(jnp.int32), weight, scales.astype(jnp.bfloat16), **_attributes())


def bf16_matmul_t(x: Float[Array, "m d_in"], table: Float[Array, "d_out d_in"]) -> Float[Array, "m d_out"]:
    """x @ table.T in float32 for bf16 x and a bf16 table (f32 sums of exact products), by the
    native kernel (call only when `int8_available()`)."""
    out = jax.ShapeDtypeStruct((x.shape[0], table.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call("grok_bf16_matmul_t", out)
    return call(x.astype(jnp.bfloat16), table.astype(jnp.bfloat16), **_attributes())


def _attributes() -> dict:
    return {"isa": np.int32(ISAS[isa()]), "threads": np.int64(_threads or 0)}


def isa() -> str:
    """The int8 kernels' code path: `$GROK_NATIVE_ISA` (portable, avx2, avx512 or avx512-fma) if
    set, else the best this CPU has: between the two AVX-512 paths, the one `bf16_dot_cost()`
    favours. Read when a computation is traced."""
    flags = _cpu_flags()
    supported = [name for name, needs in ISA_CPU_FLAGS.items() if all(f in flags for f in needs)]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        supported = ["portable"]
    forced = os.environ.get(ISA_VARIABLE, "").strip().lower()
    if not forced:
        if "avx512" in supported:
            return "avx512" if bf16_dot_cost() < BF16_DOT_COST_LIMIT else "avx512-fma"
        return supported[-1]
    if forced not in ISAS:
        raise ValueError(f"${ISA_VARIABLE}={forced!r}: expected one of {', '.join(ISAS)}")
    if forced not in supported:
        raise ValueError(f"${ISA_VARIABLE}={forced}: this CPU lacks {', '.join(ISA_CPU_FLAGS[forced])}")
    return forced


@functools.cache
def bf16_dot_cost() -> float:
    """How many 16-lane FMAs one vdpbf16ps costs on this CPU, timed once per process (about 10 ms;
    call only where the CPU has AVX-512 BF16 and `int8_available()`)."""
    library = _load(HERE / "int8_matmul.cc", INT8_FLAGS)
    measure = library.GrokBf16DotCost
    measure.restype = ctypes.c_double
    cost = measure()
    log.info("one vdpbf16ps costs %.1f FMAs here", cost)
    return cost


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        return frozenset(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


@functools.cache
def available() -> bool:
    """Whether the f32 kernels are built and registered with XLA (built now if needed; warns once if not)."""
    reason = _unsupported_reason()
    return _register("matmul_t.cc", FLAGS, TARGETS, reason, "using XLA's dot, which is slower for decoding")


@functools.cache
def int8_available() -> bool:
    """Whether the int8 kernels are built and registered with XLA (built now if needed; warns once if not)."""
    reason = None if shutil.which(_compiler()) else f"no C++ compiler {_compiler()!r} on PATH (set $CXX)"
    return _register("int8_matmul.cc", INT8_FLAGS, INT8_TARGETS, reason, "8-bit weights go through XLA, several times slower")


def _register(source: str, flags: tuple[str, ...], targets: dict[str, str], reason: str | None, fallback: str) -> bool:
    """Build `source` (if not cached), load it and register its targets; False, with one warning
    naming why and what happens instead, where that fails or the kernels are turned off."""
    if os.environ.get("GROK_NATIVE_KERNELS", "1") == "0":
        return False
    library = reason if reason is not None else _load(HERE / source, flags)
    if isinstance(library, str):
        warnings.warn(f"native CPU kernels of {source} off ({library}); {fallback}")
        log.warning("native CPU kernels of %s off (%s); %s", source, library, fallback)
        return False
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def _load(source: pathlib.Path, flags: tuple[str, ...]) -> ctypes.CDLL | str:
    """The compiled library, or why there is none."""
    try:
        return ctypes.CDLL(str(_build(source, flags)))
    except (OSError, subprocess.CalledProcessError) as error:
        return f"building {source.name} failed: {_first_line(error)}"


def _unsupported_reason() -> str | None:
    """Why the f32 kernels cannot be built here, if they cannot."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    flags = _cpu_flags()
    if not flags:
        return "cannot read /proc/cpuinfo to check for AVX2 and FMA"
    if "avx2" not in flags or "fma" not in flags:
        return "the CPU lacks AVX2 or FMA"
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler {_compiler()!r} on PATH (set $CXX)"
    return None


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _build(source: pathlib.Path, flags: tuple[str, ...]) -> pathlib.Path:
    """The compiled library, compiling it into the cache first if it is not there."""
    key = hashlib.sha256(source.read_bytes() + repr((flags, jaxlib.__version__, _compiler())).encode()).hexdigest()
    cache = pathlib.Path(os.environ.get("GROK_CACHE_DIR", pathlib.Path.home() / ".cache" / "grok")) / "native"
    library = cache / f"{source.stem}-{key[:16]}.so"
    if not library.exists():
        log.info("compiling the native CPU kernels %s into %s (once per machine, a few seconds)", source.name, cache)
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:  # compile aside, then move: safe for concurrent processes
            built = pathlib.Path(scratch) / library.name
            command = [_compiler(), *flags, f"-I{jax.ffi.include_dir()}", "-o", str(built), str(source)]
            subprocess.run(command, check=True, capture_output=True, text=True)
            os.replace(built, library)
    return library


def _first_line(error: Exception) -> str:
    text = getattr(error, "stderr", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
