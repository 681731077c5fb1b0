"""Running on a pod of several processes: process 0 leads, every other process mirrors its device calls.

On many processes every program that touches a sharded array must run on all of them, in the same
order, or its collectives wait forever. So only the leader schedules: it runs the HTTP server, the
engine, the tokenizer. Every device call it makes goes through an executor
(`grok.serving.executor.Executor`) that first sends the call to the followers over a TCP channel
(`grok.parallel.channel`); a follower (`Pod.follow`) runs each call it receives on its own executor,
and keeps no scheduling state.

`join` links the processes when the model is loaded: the leader publishes its channel's port through
`jax.distributed`'s key-value store, so the followers find it from the flags and cluster detection
that already started JAX. Each follower sends a fingerprint of what it loaded (`fingerprint`); the
leader refuses a mismatch, naming the process and the field.

A lost peer ends the run (a supervisor restarts the whole group): the leader ends every open request
with an error, logs which process was lost and exits 1 `EXIT_AFTER_S` later; a follower whose leader
is gone, or silent for the heartbeat timeout, exits 1 at once.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import threading
import weakref
from pathlib import Path
from typing import Callable

import jax

from grok.checkpoint.files import fingerprint_files
from grok.model.config import GrokConfig
from grok.parallel import channel
from grok.parallel.sharding import Sharder, mesh_text

log = logging.getLogger("grok")

CHANNEL_KEY = "grok/channel"  # where the leader publishes its channel's port (one key per join)
ENV_CHANNEL_PORT = "GROK_CHANNEL_PORT"  # the leader's channel port (default: any free one)
HEARTBEAT_TIMEOUT_S = 30.0
JOIN_WAIT_S = 1800.0  # how long the processes wait for each other at start-up
_JOINS = itertools.count()  # models joined so far in this run (a script may load more than one)
EXIT_AFTER_S = 2.0  # after a follower is lost, time for the requests' error events to reach clients


def fingerprint(config: GrokConfig, sharder: Sharder, checkpoint: Path | None, quantize: bool = False) -> dict[str, str]:
    """What every process of a pod must have loaded alike, field by field (the values are short
    texts, shown when two processes differ)."""

    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    rules = sharder.rules
    return {
        "config": digest(config.to_json()),
        "rules": f"{Path(rules.source).name} ({digest(repr((rules.axes, rules.params, rules.activations)))})",
        "mesh": mesh_text(dict(sharder.mesh.shape)),
        "checkpoint": "none" if checkpoint is None else fingerprint_files(checkpoint),
        "quantize": "int8 at load" if quantize else "as stored",
        "jax": jax.__version__,
    }


class Pod:
    """This process's part in a pod: the leader's channel to its followers, or a follower's to it."""

    def __init__(self, process: int):
        self.process = process
        self.messages = 0  # sent (leader) or received (follower) so far, heartbeats aside
        self._on_lost: list[weakref.WeakMethod] = []
        self._leader: channel.Leader | None = None
        self._follower: channel.Follower | None = None

    @property
    def leader(self) -> bool:
        return self.process == 0

    @property
    def sent_bytes(self) -> int:
        return self._leader.sent_bytes if self._leader is not None else 0

    def send(self, message: bytes) -> None:
        """(Leader) send a message to every follower; raises ChannelError once one is lost."""
        self._leader.send(message)
        self.messages += 1

    def watch(self, method: Callable[[str], None]) -> None:
        """Call `method` (a bound method, held weakly) with the reason when a peer is lost."""
        self._on_lost.append(weakref.WeakMethod(method))

    def follow(self, run: Callable[[dict], None]) -> None:
        """(Follower) pass each message the leader sends to `run`, until the leader says stop."""
        for message in self._follower.messages():
            self.messages += 1
            run(message)
        log.info("process %d: the leader stopped after %d messages", self.process, self.messages)

    def stop(self) -> None:
        """(Leader) tell the followers to stop."""
        if self._leader is not None:
            log.info("stopping %d followers after %d messages", len(self._leader.followers), self.messages)
            self._leader.close()

    def _lose(self, reason: str) -> None:
        if self.leader:
            log.error("%s; ending every request and exiting", reason)
            for ref in self._on_lost:
                callback = ref()
                try:
                    if callback is not None:
                        callback(reason)
                except Exception:
                    log.exception("ending the requests failed")
            threading.Timer(EXIT_AFTER_S, self._exit_now).start()
        else:
            log.error("process %d: %s; exiting", self.process, reason)
            self._exit_now()

    @staticmethod
    def _exit_now() -> None:
        """Exit at once: a clean exit would wait on the lost process (jax.distributed's shutdown)."""
        logging.shutdown()
        os._exit(1)


def join(fingerprint: dict[str, str], heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S) -> Pod | None:
    """Link this process with the rest of its pod (None on a single process): the leader waits for
    every follower to connect and checks their fingerprints; raises channel.Mismatch or ChannelError."""
    if jax.process_count() == 1:
        return None
    from jax._src.distributed import global_state  # the key-value store of the run jax.distributed started

    pod = Pod(jax.process_index())
    wait_ms = int(JOIN_WAIT_S * 1000)
    key = f"{CHANNEL_KEY}/{next(_JOINS)}"  # every process joins in the same order: the same key
    if pod.leader:
        text = os.environ.get(ENV_CHANNEL_PORT, "").strip() or "0"
        if not text.isdigit() or int(text) > 65535:
            raise ValueError(f"{ENV_CHANNEL_PORT}={text!r} is not a port number")
        port = int(text)
        with socket.create_server(("", port)) as listener:
            global_state.client.key_value_set(key, str(listener.getsockname()[1]))
            log.info("waiting for %d followers on port %d", jax.process_count() - 1, listener.getsockname()[1])
            pod._leader = channel.Leader.accept(listener, jax.process_count() - 1, fingerprint, heartbeat_timeout_s,
                                                pod._lose, JOIN_WAIT_S)
        log.info("%d followers joined; every device call goes to them first", jax.process_count() - 1)
    else:
        port = int(global_state.client.blocking_key_value_get(key, wait_ms))
        host = global_state.coordinator_address.rpartition(":")[0].strip("[]")
        pod._follower = channel.Follower.connect((host, port), pod.process, fingerprint, pod._lose, JOIN_WAIT_S)
        log.info("process %d: following the leader at %s:%d", pod.process, host, port)
    return pod
