"""Calls under a time limit, so that a regression that blocks (a read of a FIFO, a runaway case of a
fuzzer) fails its test instead of hanging the suite; and FIFOs to block on."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, TypeVar

import pytest

T = TypeVar("T")


def call_with_timeout(fn: Callable[[], T], seconds: float, on_timeout: Callable[[], None] | None = None) -> T:
    """`fn()` in a daemon thread: what it returns, or the exception it raised; a test failure if it
    takes longer than `seconds`. `on_timeout` is then called to unblock the thread, if it can be."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if on_timeout is not None:
            on_timeout()
            thread.join(seconds)
        pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {seconds} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def make_fifo(path: Path) -> Callable[[], None]:
    """Create a FIFO at `path`; returns a function that releases a reader blocked on it (it reads EOF)."""
    os.mkfifo(path)

    def release() -> None:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # fails (ENXIO) when no reader waits
        except OSError:
            pass

    return release
