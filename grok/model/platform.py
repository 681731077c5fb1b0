"""The kind of device the model is traced for: "cpu", "gpu" or "tpu".

Usually the default backend's. A deviceless compile for an accelerator (`grok.planning`) traces on
a CPU-only machine for another kind, and says so with `tracing_for`, so that the model takes the
accelerator's paths (bf16 caches, no native CPU kernels, int8 products that read each weight once)
rather than the CPU's.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("grok_target_platform", default=None)


def platform() -> str:
    """The platform being traced for: the one `tracing_for` set, else the default backend's."""
    return _TARGET.get() or jax.default_backend()


def on_cpu() -> bool:
    return platform() == "cpu"


@contextlib.contextmanager
def tracing_for(name: str) -> Iterator[None]:
    """Trace (and lower) the model for platform `name` inside this block, whatever the default backend."""
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}: expected one of {PLATFORMS}")
    token = _TARGET.set(name)
    try:
        yield
    finally:
        _TARGET.reset(token)
