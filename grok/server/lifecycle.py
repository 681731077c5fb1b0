"""Running an app under uvicorn: `uvicorn_server` tells the app when its shutdown begins, so that
open requests get a grace period and then a final "shutting down" error; `serve` runs it until
SIGTERM or SIGINT and returns after SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette

from grok.server.app import create_app
from grok.server.handlers import SHUTDOWN_WAIT_S, _Server
from grok.serving.chat import ChatTemplate
from grok.serving.engine import Engine

API_KEY_ENV = "GROK_API_KEY"  # where the CLI reads the key from when `--api-key` is not given


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, which tells the app when its shutdown begins."""

    def __init__(self, config: uvicorn.Config, server: _Server, grace_s: float | None):
        super().__init__(config)
        self.app_server, self.grace_s = server, grace_s

    async def shutdown(self, sockets=None) -> None:
        self.app_server.close(self.grace_s)
        await super().shutdown(sockets)


def uvicorn_server(app: Starlette, graceful_shutdown_s: float | None = 30, **config: Any) -> uvicorn.Server:
    """A uvicorn server for an app of `create_app` (`config`: `uvicorn.Config`'s arguments). Told to
    stop (SIGINT, SIGTERM, `should_exit`), it admits no new request, gives open ones
    `graceful_shutdown_s` (None: as long as they take), then ends each with a final "shutting down"
    error; uvicorn's own limit, SHUTDOWN_WAIT_S later, cuts what is still left."""
    timeout = None if graceful_shutdown_s is None else graceful_shutdown_s + SHUTDOWN_WAIT_S
    config = uvicorn.Config(app, lifespan="on", timeout_graceful_shutdown=timeout, **config)
    return _Uvicorn(config, app.state.server, graceful_shutdown_s)


@contextlib.contextmanager
def _sigterm_returns():
    """Once it has shut down, uvicorn raises the signal that stopped it again, with the handler that
    was there before: for SIGTERM, how process managers stop a server, the default one would end
    the process with status 143 after a clean stop. A handler that does nothing lets `serve` return."""
    if threading.current_thread() is not threading.main_thread():  # uvicorn handles no signal there
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "grok-1",
    api_key: str | None = None,
    max_queue: int = 64,
    log_level: str = "info",
    graceful_shutdown_s: float | None = 30,
    chat_template: ChatTemplate | str | Path | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (see `uvicorn_server` for the shutdown); returns after SIGTERM.
    `chat_template`: as `create_app` takes it."""
    app = create_app(engine, model_name, api_key, max_queue, chat_template)
    server = uvicorn_server(app, graceful_shutdown_s, host=host, port=port, log_level=log_level)
    with _sigterm_returns():
        server.run()
