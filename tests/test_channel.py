"""The leader-follower channel (grok/parallel/channel.py) on localhost sockets, in threads: the
handshake refuses a mismatched fingerprint naming the process and the field, messages arrive in
order, and a peer that closes or falls silent is reported lost within the heartbeat timeout."""

import socket
import threading
import time

import numpy as np
import pytest

from grok.parallel import channel, wire

FINGERPRINT = {"config": "abc", "rules": "tensor_parallel.toml (123)", "mesh": "data=1,model=4", "checkpoint": "x"}


class Lost:
    """Records the first loss reported, and when."""

    def __init__(self):
        self.reason, self.event, self.at = None, threading.Event(), None

    def __call__(self, reason: str) -> None:
        self.reason, self.at = reason, time.monotonic()
        self.event.set()


def start(fingerprints: list[dict], timeout_s: float = 2.0):
    """A leader and one follower per fingerprint (processes 1, 2, ...), connected; returns
    (leader or the exception it raised, [follower or exception], leader's Lost, [followers' Lost])."""
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    lost = [Lost() for _ in fingerprints]
    followers: list = [None] * len(fingerprints)

    def connect(i: int) -> None:
        try:
            followers[i] = channel.Follower.connect(address, i + 1, fingerprints[i], lost[i], wait_s=10)
        except Exception as err:
            followers[i] = err

    threads = [threading.Thread(target=connect, args=(i,)) for i in range(len(fingerprints))]
    for thread in threads:
        thread.start()
    leader_lost = Lost()
    try:
        leader = channel.Leader.accept(listener, len(fingerprints), FINGERPRINT, timeout_s, leader_lost, wait_s=10)
    except Exception as err:
        leader = err
    finally:
        listener.close()
    for thread in threads:
        thread.join(10)
    return leader, followers, leader_lost, lost


def test_messages_reach_every_follower_in_order_then_stop():
    leader, followers, leader_lost, _ = start([FINGERPRINT, FINGERPRINT])
    messages = [wire.encode({"op": "call", "seq": i, "args": {"tokens": np.arange(i, dtype=np.int32)}})
                for i in range(50)]
    for message in messages:
        leader.send(message)
    leader.close()
    for follower in followers:
        received = list(follower.messages())  # ends at stop
        assert [m["seq"] for m in received] == list(range(50))
        np.testing.assert_array_equal(received[7]["args"]["tokens"], np.arange(7))
    assert leader.sent_bytes == sum(len(m) + 8 for m in messages)
    assert leader_lost.reason is None


@pytest.mark.parametrize("field", ["rules", "checkpoint"])
def test_a_follower_that_loaded_something_else_is_refused_naming_process_and_field(field):
    other = {**FINGERPRINT, field: "something else"}
    leader, followers, _, _ = start([FINGERPRINT, other])
    assert isinstance(leader, channel.Mismatch)
    assert str(leader).startswith(f"process 2 does not match process 0 in its {field}: something else there, ")
    assert "\n" not in str(leader)
    # Every follower hears why, so none waits for a start that will not come.
    assert all(isinstance(f, channel.Mismatch) and str(f) == str(leader) for f in followers)


def test_a_follower_that_goes_away_is_lost_at_once():
    leader, followers, leader_lost, _ = start([FINGERPRINT, FINGERPRINT], timeout_s=30)
    followers[1]._sock.shutdown(socket.SHUT_RDWR)  # as the kernel does for a killed process
    assert leader_lost.event.wait(5)
    assert leader_lost.reason.startswith("lost process 2: ")
    with pytest.raises(channel.ChannelError, match="lost process 2"):
        leader.send(wire.encode({"op": "call"}))
    leader.close()


def test_a_silent_peer_is_lost_after_the_heartbeat_timeout():
    """A follower that stops sending heartbeats (a hung host) is lost to the leader within the
    timeout, and a follower whose leader falls silent gives up within it too."""
    timeout = 1.0
    leader, followers, leader_lost, lost = start([FINGERPRINT], timeout_s=timeout)
    start_time = time.monotonic()
    followers[0]._beat.stop()  # the follower falls silent
    assert leader_lost.event.wait(5 * timeout)
    assert leader_lost.reason == f"lost process 1: no heartbeat for {timeout:g} s"
    assert leader_lost.at - start_time < 2 * timeout + channel.heartbeat_interval(timeout)

    leader, followers, leader_lost, lost = start([FINGERPRINT], timeout_s=timeout)
    start_time = time.monotonic()
    leader._beat.stop()  # the leader falls silent
    assert lost[0].event.wait(5 * timeout)
    assert lost[0].reason == f"no message or heartbeat from the leader for {timeout:g} s"
    assert lost[0].at - start_time < 2 * timeout + channel.heartbeat_interval(timeout)
    assert list(followers[0].messages()) == []  # and its loop ends


def test_heartbeats_keep_a_quiet_link_alive():
    timeout = 0.8
    leader, followers, leader_lost, lost = start([FINGERPRINT], timeout_s=timeout)
    time.sleep(4 * timeout)
    assert leader_lost.reason is None and lost[0].reason is None
    leader.close()
    assert list(followers[0].messages()) == []


def test_a_connection_that_is_not_a_follower_is_turned_away():
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    stranger = socket.create_connection(address)
    channel.send_frame(stranger, wire.encode({"op": "GET / HTTP/1.1"}))
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        f=channel.Follower.connect(address, 1, FINGERPRINT, Lost(), wait_s=10)))
    thread.start()
    leader = channel.Leader.accept(listener, 1, FINGERPRINT, 5.0, Lost(), wait_s=10)
    thread.join(10)
    assert list(leader.followers) == [1]
    with pytest.raises(ConnectionError):
        channel.recv_frame(stranger)  # closed on it
    leader.close()
    assert list(result["f"].messages()) == []
    listener.close()
