"""One HTTP request's run: `_Run` reads the engine streams of its choices, each in its own task, into
one sequence of events, counts them in the metrics, and cancels the streams when the client goes
away. Its `server` is the app's `grok.server.handlers._Server` (not imported: that module builds
runs), whose metrics and sets of live streams and reading tasks it keeps up to date."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from starlette.requests import Request

from grok.server.formats import _Choice, _Step
from grok.serving.engine import Stream, TokenEvent


class _Run:
    """The streams of one HTTP request, merged into one sequence of streamed choices.

    Each stream is read (`async for`) by its own task that runs to the stream's last event, so a
    stream's thread never waits forever; the request's client going away cancels them all.
    """

    def __init__(self, server, streams: list[Stream], request: Request, logprobs: bool):
        self.server = server
        self.streams = streams
        self.request = request
        self.choices = [_Choice(i, logprobs) for i in range(len(streams))]
        self.disconnected = False
        self._queue: asyncio.Queue[tuple[int, TokenEvent | BaseException]] = asyncio.Queue()
        self._accepted = time.monotonic()
        server.streams.update(streams)
        for i, stream in enumerate(streams):
            task = asyncio.create_task(self._pump(i, stream))
            server.pumps.add(task)
            task.add_done_callback(server.pumps.discard)
        # Watched from now on, even if the response never starts (the client left before).
        self._watcher = asyncio.create_task(self._watch_disconnect())

    async def _pump(self, index: int, stream: Stream) -> None:
        metrics = self.server.metrics
        first = True
        try:
            async for event in stream:
                if first and event.token_id >= 0:
                    metrics.ttft.observe(time.monotonic() - self._accepted)
                first = False
                if event.finish_reason not in ("stop", "cancelled"):
                    metrics.generated_tokens.inc()
                if event.finish_reason is not None:
                    metrics.finished.labels(event.finish_reason).inc()
                self._queue.put_nowait((index, event))
        except Exception as err:  # never expected; reported to the request, not lost
            self._queue.put_nowait((index, err))
        finally:
            self.server.streams.discard(stream)

    async def _watch_disconnect(self) -> None:
        """Cancel the streams as soon as the client goes away (also for non-streamed requests)."""
        while (await self.request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.01)
        if not all(stream.done for stream in self.streams):
            self.disconnected = True
        for stream in self.streams:
            stream.cancel()

    async def events(self) -> AsyncIterator[tuple[_Choice, _Step]]:
        """Each event as what it added to its choice (see `_Choice.add`), until every stream has ended."""
        remaining = len(self.streams)
        try:
            while remaining:
                index, event = await self._queue.get()
                if isinstance(event, BaseException):
                    raise event
                if event.finish_reason is not None:
                    remaining -= 1
                choice = self.choices[index]
                yield choice, choice.add(event)
        finally:
            self._watcher.cancel()
            early = remaining > 0 or any(c.finish_reason == "cancelled" for c in self.choices)
            if early:
                self.server.metrics.cancelled.inc()
            for stream in self.streams:  # the engine drops cancelled streams at its next step
                stream.cancel()
