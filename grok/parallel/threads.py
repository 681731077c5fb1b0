"""How many threads the CPU work uses: XLA:CPU's intra-op pool and the native kernels (`--threads`).

XLA:CPU (jaxlib 0.10) has no XLA flag, JAX config option or client option for its thread count.
The CPU client sizes its pools when it is created, from `DefaultThreadPoolSize()`
(xla/pjrt/utils.cc): the environment variable PJRT_NPROC, else NPROC, else the CPUs this process
may run on (its affinity mask). Both of its pools get max(that, the CPU device count) threads: the
intra-op pool ("XLAEigen", capped at 256), which runs XLA's parallel ops and is the
`ffi::ThreadPool` FFI custom calls such as grok.native's kernels receive, and the client's
dispatch pool. So the count is set by putting PJRT_NPROC into this process's environment before
JAX creates its CPU backend (the first `jax.devices()` or computation); setting it later changes
nothing in this process (only in the processes it starts). Measured on a 2-core AMD EPYC:
PJRT_NPROC=1 gives 1 XLAEigen thread and a 2048x2048 f32 matmul at 106 ms, PJRT_NPROC=2 gives 2
and 53 ms, PJRT_NPROC=4 gives 4; set after `import jax` but before the first device use it takes
effect, set after the first computation it does not.
"""

from __future__ import annotations

import logging
import os

from grok import native

log = logging.getLogger("grok")

ENV = "PJRT_NPROC"  # read by XLA:CPU when its client is created


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), else the machine's count: what XLA
    itself would use with no PJRT_NPROC."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def backend_started() -> bool:
    """Whether JAX has created its backends (after which XLA's thread count is fixed)."""
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # not JAX 0.10's layout: assume not, as before
        return False


def xla_pool_size(count: int, cpu_devices: int | None = None) -> int:
    """The threads XLA:CPU's intra-op pool gets for `count` (it needs one per CPU device)."""
    return min(max(count, cpu_devices or 1), 256)


def apply(count: int | None, cpu_devices: int | None = None) -> int:
    """Use `count` threads (None: `available_cpus()`) in XLA:CPU and the native kernels, and return
    the count. Call before anything touches JAX's devices; a count over the CPUs is allowed, with a
    warning."""
    explicit = count is not None
    if count is None:
        count = available_cpus()
    if count < 1:
        raise ValueError(f"--threads must be at least 1, got {count}")
    cpus = available_cpus()
    if count > cpus:
        log.warning("--threads %d is more than the %d CPUs this process may use; threads will share CPUs", count, cpus)
    if backend_started() and os.environ.get(ENV) != str(count):
        (log.warning if explicit else log.debug)(
            "JAX's CPU backend already exists, so XLA keeps its thread pool; --threads %d applies to the "
            "native kernels (and to processes started from here)", count,
        )
    os.environ[ENV] = str(count)
    native.set_threads(count)
    pool = xla_pool_size(count, cpu_devices)
    if pool != count:
        log.info("threads: %d (XLA:CPU's pool has %d: it needs one per CPU device)", count, pool)
    else:
        log.debug("threads: %d (XLA:CPU and the native kernels)", count)
    return count
