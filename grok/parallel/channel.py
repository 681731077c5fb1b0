"""A pod's leader and its followers, linked by plain TCP streams off the device queue.

The leader (process 0) listens; each follower connects, says who it is with a fingerprint of what it
loaded (`hello`), and is let in (`welcome`) only when that fingerprint equals the leader's, else every
follower is told why (`refuse`) and the leader raises `Mismatch` naming the process and the field.
After that the leader sends messages (each a `grok.parallel.wire` message in a length-prefixed frame)
to every follower, in order; TCP neither loses nor reorders them.

Both sides send a heartbeat every `timeout_s / 4` (at most every 5 s) on a thread of their own, so
that a long compile or a quiet server is never taken for a dead peer, and each side watches the
other on a thread of its own: a closed connection, an error or `timeout_s` without a frame is a
lost peer, reported once to `on_lost` with a one-line reason. What to do then (end requests, exit)
is the caller's policy (`grok.serving.pod`).
"""

from __future__ import annotations

import logging
import queue
import socket
import struct
import threading
import time
from typing import Callable, Iterator

from grok.parallel import wire

log = logging.getLogger("grok")

_FRAME = struct.Struct("<Q")  # a frame's length in bytes
HEARTBEAT_MAX_S = 5.0


class ChannelError(RuntimeError):
    """The link between the pod's processes failed (a lost peer, a refused start)."""


class Mismatch(ChannelError):
    """A follower loaded something other than the leader did."""


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_FRAME.pack(len(data)) + data)


def recv_frame(sock: socket.socket) -> bytes:
    """The next frame's bytes; raises ConnectionError when the peer closes, TimeoutError past the
    socket's timeout."""
    (length,) = _FRAME.unpack(_recv_exactly(sock, _FRAME.size))
    return _recv_exactly(sock, length)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("the connection was closed")
        data.extend(chunk)
    return bytes(data)


def heartbeat_interval(timeout_s: float) -> float:
    return min(HEARTBEAT_MAX_S, timeout_s / 4)


def differences(mine: dict, theirs: dict) -> list[str]:
    """The fields in which two fingerprints differ, in the order of `mine`."""
    fields = list(mine) + [k for k in theirs if k not in mine]
    return [k for k in fields if mine.get(k) != theirs.get(k)]


class _Beat:
    """Calls `send` with a heartbeat every `interval_s` until stopped."""

    def __init__(self, send: Callable[[bytes], None], interval_s: float):
        self._stop = threading.Event()
        message = wire.encode({"op": "heartbeat"})

        def beat() -> None:
            while not self._stop.wait(interval_s):
                try:
                    send(message)
                except OSError:
                    return  # the watcher reports the loss

        threading.Thread(target=beat, name="grok-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


class Leader:
    """Process 0's end: one connection per follower (`accept` makes it)."""

    def __init__(self, followers: dict[int, socket.socket], timeout_s: float, on_lost: Callable[[str], None]):
        self.followers = followers
        self.timeout_s = timeout_s
        self.lost: str | None = None  # why a follower was lost, once one was
        self.sent_bytes = 0
        self._on_lost = on_lost
        self._write = threading.Lock()  # one frame at a time on each socket
        self._losing = threading.Lock()
        self._closing = False
        self._beat = _Beat(self._send_raw, heartbeat_interval(timeout_s))
        for process, sock in followers.items():
            threading.Thread(target=self._watch, args=(process, sock), name=f"grok-watch-{process}",
                             daemon=True).start()

    @classmethod
    def accept(
        cls, listener: socket.socket, count: int, fingerprint: dict, timeout_s: float,
        on_lost: Callable[[str], None], wait_s: float = 600.0,
    ) -> Leader:
        """Wait (up to `wait_s`) for `count` followers on `listener`, check each one's fingerprint,
        and let them all in; raises Mismatch (after telling every follower) or ChannelError."""
        followers: dict[int, socket.socket] = {}
        deadline = time.monotonic() + wait_s
        try:
            while len(followers) < count:
                listener.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    missing = count - len(followers)
                    raise ChannelError(f"{missing} of {count} followers did not connect within {wait_s:.0f} s") from None
                sock.settimeout(max(1.0, deadline - time.monotonic()))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                hello = wire.decode(recv_frame(sock))
                process = hello.get("process")
                if hello.get("op") != "hello" or not isinstance(process, int) or process in followers or process < 1:
                    sock.close()
                    log.warning("refused a connection that is not a new follower's hello: %r", hello.get("op"))
                    continue
                followers[process] = sock
                differ = differences(fingerprint, hello.get("fingerprint") or {})
                if differ:
                    field = differ[0]
                    reason = (
                        f"process {process} does not match process 0 in its {field}: "
                        f"{hello['fingerprint'].get(field)} there, {fingerprint.get(field)} here"
                    )
                    for other in followers.values():
                        send_frame(other, wire.encode({"op": "refuse", "reason": reason}))
                    raise Mismatch(reason)
            welcome = wire.encode({"op": "welcome", "timeout_s": timeout_s})
            for sock in followers.values():
                sock.settimeout(None)
                send_frame(sock, welcome)
        except BaseException:
            for sock in followers.values():
                sock.close()
            raise
        return cls(followers, timeout_s, on_lost)

    def send(self, message: bytes) -> None:
        """Send a message to every follower; raises ChannelError once a follower is lost."""
        if self.lost is not None:
            raise ChannelError(self.lost)
        try:
            self._send_raw(message)
        except _SendFailed as err:
            self._lose(err.process, f"sending failed ({err.__cause__})")
            raise ChannelError(self.lost) from None
        self.sent_bytes += len(message) + _FRAME.size

    def close(self) -> None:
        """Tell the followers to stop, then close the connections."""
        self._closing = True
        self._beat.stop()
        if self.lost is None:
            try:
                self._send_raw(wire.encode({"op": "stop"}))
            except OSError:
                pass
        for sock in self.followers.values():
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _send_raw(self, message: bytes) -> None:
        with self._write:
            for process, sock in self.followers.items():
                try:
                    send_frame(sock, message)
                except OSError as err:
                    raise _SendFailed(process) from err

    def _watch(self, process: int, sock: socket.socket) -> None:
        """Read the follower's heartbeats; report it lost when they stop."""
        sock.settimeout(self.timeout_s)
        try:
            while True:
                frame = recv_frame(sock)
                if wire.decode(frame).get("op") != "heartbeat":
                    raise ConnectionError("it sent something other than a heartbeat")
        except TimeoutError:
            reason = f"no heartbeat for {self.timeout_s:g} s"
        except (OSError, wire.WireError) as err:
            reason = str(err) or type(err).__name__
        if not self._closing:
            self._lose(process, reason)

    def _lose(self, process: int, reason: str) -> None:
        with self._losing:
            if self.lost is not None:
                return
            self.lost = f"lost process {process}: {reason}"
        self._beat.stop()
        self._on_lost(self.lost)


class _SendFailed(ConnectionError):
    """Sending to follower `process` failed (the cause says how)."""

    def __init__(self, process: int):
        super().__init__(f"sending to process {process} failed")
        self.process = process


class Follower:
    """A follower's end: `connect` makes it; `messages()` yields what the leader sends."""

    def __init__(self, sock: socket.socket, timeout_s: float, on_lost: Callable[[str], None]):
        self.timeout_s = timeout_s
        self._sock = sock
        self._inbox: queue.Queue[dict | None] = queue.Queue()
        self._on_lost = on_lost
        self._write = threading.Lock()
        self._beat = _Beat(self._send_raw, heartbeat_interval(timeout_s))
        threading.Thread(target=self._read, name="grok-leader", daemon=True).start()

    @classmethod
    def connect(
        cls, address: tuple[str, int], process: int, fingerprint: dict, on_lost: Callable[[str], None],
        wait_s: float = 600.0,
    ) -> Follower:
        """Connect to the leader (retrying for up to `wait_s` while it loads), say hello, and wait to be
        let in; raises Mismatch with the leader's reason when refused."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                sock = socket.create_connection(address, timeout=max(1.0, deadline - time.monotonic()))
                break
            except OSError as err:
                if time.monotonic() > deadline:
                    raise ChannelError(f"could not reach the leader at {address[0]}:{address[1]}: {err}") from None
                time.sleep(0.2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            send_frame(sock, wire.encode({"op": "hello", "process": process, "fingerprint": fingerprint}))
            answer = wire.decode(recv_frame(sock))  # the leader answers once every follower said hello
        except (OSError, wire.WireError) as err:
            sock.close()
            raise ChannelError(f"the leader at {address[0]}:{address[1]} did not let this process in: {err}") from None
        if answer.get("op") == "refuse":
            sock.close()
            raise Mismatch(answer.get("reason", "refused"))
        if answer.get("op") != "welcome":
            sock.close()
            raise ChannelError(f"the leader answered {answer.get('op')!r} to hello")
        sock.settimeout(float(answer["timeout_s"]))
        return cls(sock, float(answer["timeout_s"]), on_lost)

    def messages(self) -> Iterator[dict]:
        """The leader's messages in order, heartbeats left out, until it says stop (or is lost)."""
        while True:
            message = self._inbox.get()
            if message is None or message.get("op") == "stop":
                self._beat.stop()
                return
            yield message

    def _send_raw(self, message: bytes) -> None:
        with self._write:
            send_frame(self._sock, message)

    def _read(self) -> None:
        try:
            while True:
                message = wire.decode(recv_frame(self._sock))
                if message.get("op") == "heartbeat":
                    continue
                self._inbox.put(message)
                if message.get("op") == "stop":
                    return
        except TimeoutError:
            reason = f"no message or heartbeat from the leader for {self.timeout_s:g} s"
        except (OSError, wire.WireError) as err:
            reason = f"the connection to the leader failed ({err or type(err).__name__})"
        self._beat.stop()
        self._inbox.put(None)
        self._on_lost(reason)
