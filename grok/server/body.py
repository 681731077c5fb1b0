"""Request bodies left unread by an early answer (413, 408, 401...): the `_DrainBody` middleware
reads and drops them, within limits, so that a client still sending its body gets the answer
rather than a reset connection."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

DRAIN_MAX_BYTES = 64 << 20  # of an unread body, read and dropped after an early answer (413, 408, 401)
DRAIN_TIMEOUT_S = 5.0  # ... for at most this long, then the connection is closed


class _DrainBody:
    """ASGI middleware for answers sent before the request body was read (413, 408, 401, 404...):
    they say `Connection: close`, and before they end, the rest of the body is read and dropped
    (up to DRAIN_MAX_BYTES, for up to DRAIN_TIMEOUT_S). Closing a socket with unread bytes resets
    the connection, and a client still sending its body would see that reset, not the answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers", ())) if scope["type"] == "http" else {}
        if headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # no body to read
        unread = True

        async def tracking_receive():
            nonlocal unread
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                unread = False
            return message

        async def draining_send(message):
            if unread and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            elif unread and message["type"] == "http.response.body" and not message.get("more_body", False):
                await send({**message, "more_body": True})
                await _drain(tracking_receive)
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, tracking_receive, draining_send)


async def _drain(receive: Callable) -> None:
    """Read and drop the rest of a request body, within DRAIN_MAX_BYTES and DRAIN_TIMEOUT_S."""
    dropped = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while dropped <= DRAIN_MAX_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                dropped += len(message.get("body", b""))
