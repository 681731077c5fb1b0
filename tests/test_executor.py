"""The executor's calls as messages (grok/serving/executor.py, grok/parallel/wire.py): a follower
that replays a leader's calls ends with the same device state, and a message out of sequence or
malformed is an error."""

import jax
import numpy as np
import pytest

from grok import PRESETS, Grok
from grok.model import weights
from grok.parallel import wire
from grok.serving.engine import Engine, Request, Scheduling
from grok.serving.executor import Executor, ReplayError
from grok.serving.programs import row_settings

CONFIG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def grok():
    return Grok(CONFIG, weights.stack_layers(weights.random_params(CONFIG, 9), CONFIG.num_layers))


def test_a_follower_replaying_the_leaders_calls_holds_the_same_state(grok):
    sent = []
    engine = Engine(grok, max_batch=2, cache_len=64, scheduling=Scheduling(prefix_cache_bytes=1 << 20, block_size=8,
                                                                           speculate=2))
    engine.executor.send = sent.append
    prompts = [list(range(3, 30)), list(range(3, 20)) + [7, 7, 7], list(range(3, 30))]  # a shared prefix
    engine.generate([Request(p, max_tokens=6) for p in prompts])
    calls = [wire.decode(m)["call"] for m in sent]
    assert {"prefill", "decode", "restore", "save"} <= set(calls)
    follower = Executor(grok, 2, 64, engine.executor.blocks.mask.shape[0], 8)
    for message in sent:
        follower.replay(message)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        (engine.executor.memory, engine.executor.blocks), (follower.memory, follower.blocks))
    assert all(jax.tree.leaves(same))


def test_a_message_out_of_sequence_or_not_a_call_is_refused(grok):
    leader, sent = Executor(grok, 1, 32), []
    leader.send = sent.append
    tokens, settings = np.zeros((1, 16), np.int32), row_settings(1)
    leader.prefill(0, tokens, 4, True, settings)
    leader.decode(np.zeros((1, 1), np.int32), np.ones(1, np.int32), settings)
    follower = Executor(grok, 1, 32)
    with pytest.raises(ReplayError, match="call 1 arrived where call 0 was due"):
        follower.replay(sent[1])
    follower.replay(sent[0])
    with pytest.raises(ReplayError, match="not an executor call: 'shutdown'"):
        follower.replay(wire.encode({"op": "call", "seq": 1, "call": "shutdown", "args": {}}))
    follower.replay(sent[1])
    assert follower.calls == leader.calls == 2


def test_wire_round_trip_and_refusals():
    message = {"seq": 3, "args": {"tokens": np.arange(6, dtype=np.int32).reshape(2, 3), "rows": [1, 2],
                                  "reset": True, "settings": {"top_p": np.ones(2, np.float32)}}}
    back = wire.decode(wire.encode(message))
    np.testing.assert_array_equal(back["args"]["tokens"], message["args"]["tokens"])
    assert back["args"]["rows"] == [1, 2] and back["args"]["reset"] is True and back["seq"] == 3
    data = wire.encode(message)
    with pytest.raises(wire.WireError, match="runs past"):
        wire.decode(data[:-4])
    with pytest.raises(wire.WireError, match="not accepted"):
        wire.decode(data.replace(b'"int32"', b'"int3x"'))  # the same length: only the dtype is wrong
    with pytest.raises(wire.WireError, match="are not sent"):
        wire.encode({"x": np.array(["a"])})
    with pytest.raises(wire.WireError, match="not JSON"):
        wire.decode(b"\x05\x00\x00\x00{oops")
