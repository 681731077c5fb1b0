"""Continuous batching: per-request outputs independent of the batch, stops, logprobs, cancellation."""

import threading

import jax
import numpy as np
import pytest

from grok import PRESETS, Grok, SamplingParams
from grok.model import weights
from grok.serving.engine import Engine, Request, Scheduling
from grok.serving.tokenizer import ByteTokenizer

CONFIG = PRESETS["tiny"].replace(vocab_size=328)  # room for the byte tokenizer's ids
GREEDY = SamplingParams(temperature=0)
PROMPTS = [[70 + i for i in range(n)] for n in (3, 11, 6, 17)]


@pytest.fixture(scope="module")
def params():
    return weights.stack_layers(weights.random_params(CONFIG, 5), CONFIG.num_layers)


# Every test runs on both CPU weight formats (one CPU device): int8 (the released weights read by the
# native kernels) and f32; both with unrolled layers, one cache array per layer.
@pytest.fixture(scope="module", params=[False, True], ids=["int8", "cpu_format"])
def grok(request, params):
    return Grok(CONFIG, params, ByteTokenizer(), cpu_format=request.param)


@pytest.fixture(scope="module")
def engine(grok):
    return Engine(grok, max_batch=4, cache_len=48, prefill_chunk=8)


@pytest.fixture(scope="module")
def alone(engine):
    """Each prompt's greedy output with nothing else in the engine."""
    return [engine.generate([Request(p, max_tokens=8, sampling=GREEDY)])[0].token_ids for p in PROMPTS]


def test_logits_at_one_position_are_those_of_the_full_output(grok):
    """`apply(..., logits_at=i)` (the engine's prefill: the last token's logits only) equals row i
    of every position's logits."""
    import jax.numpy as jnp

    tokens = jnp.asarray([PROMPTS[3][:12], PROMPTS[1] + [0]], jnp.int32)
    full = grok.apply(grok.params, tokens).logits
    at = jnp.asarray([11, 10], jnp.int32)
    picked = grok.apply(grok.params, tokens, None, None, at).logits
    assert picked.shape == (2, 1, CONFIG.vocab_size)
    want = np.asarray(full[jnp.arange(2), at], np.float32)
    # Equal up to the summation order of a product of 1 row against one of 24 (one bf16 step at most).
    np.testing.assert_allclose(np.asarray(picked[:, 0], np.float32), want, rtol=0, atol=2**-7 * np.abs(want).max())


def test_batch_of_different_lengths_equals_alone(engine, alone):
    results = engine.generate([Request(p, max_tokens=8, sampling=GREEDY) for p in PROMPTS])
    assert [r.token_ids for r in results] == alone


def test_continuous_batching_admits_requests_midway(grok, alone):
    """Two slots, four requests of different lengths: later ones start as earlier ones finish."""
    small = Engine(grok, max_batch=2, cache_len=48, prefill_chunk=8)
    lengths = [3, 8, 5, 8]
    streams = [small.submit(Request(p, max_tokens=n, sampling=GREEDY)) for p, n in zip(PROMPTS, lengths)]
    assert small.queued == 4
    small.step()
    assert small.active == 2 and small.queued == 2
    results = [s.result() for s in streams]
    assert [r.token_ids for r in results] == [a[:n] for a, n in zip(alone, lengths)]
    assert small.active == 0 and small.queued == 0


def test_greedy_matches_the_full_forward(grok, alone):
    for prompt, output in zip(PROMPTS, alone):
        logits = grok.logits(prompt + output)
        assert output == logits[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    request = Request(PROMPTS[1], max_tokens=8, sampling=SamplingParams(temperature=30.0, top_p=0.9, seed=11))
    solo = engine.generate([request])[0].token_ids
    others = [Request(p, max_tokens=8, sampling=SamplingParams(temperature=30.0, seed=i)) for i, p in enumerate(PROMPTS)]
    mixed = engine.generate([others[0], request, others[2]])[1].token_ids
    assert solo == mixed
    reseeded = [Request(PROMPTS[1], max_tokens=8, sampling=SamplingParams(temperature=30.0, seed=s)) for s in range(4)]
    assert any(r.token_ids != solo for r in engine.generate(reseeded)), "the seed changes nothing"


def test_max_tokens_and_context_end_requests_exactly(engine):
    result = engine.generate([Request(PROMPTS[0], max_tokens=5, sampling=GREEDY)])[0]
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    prompt = list(range(70, 70 + 45))  # cache of 48: room for 3 new tokens
    result = engine.generate([Request(prompt, max_tokens=10, sampling=GREEDY)])[0]
    assert len(result.token_ids) == 3 and result.finish_reason == "context"
    with pytest.raises(ValueError, match="leaving no room"):
        engine.submit(Request(list(range(70, 70 + 48))))


def test_stop_strings_end_the_text_before_them(engine):
    full = engine.generate([Request("ab", max_tokens=12, sampling=GREEDY)])[0]
    assert len(full.text) >= 6
    stop = full.text[3:5]
    first = full.text.find(stop)
    streamed = list(engine.submit(Request("ab", max_tokens=12, sampling=GREEDY, stop=("zzz-never", stop))))
    assert "".join(e.text for e in streamed) == full.text[:first]
    assert streamed[-1].finish_reason == "stop"


def test_eos_ends_a_request(grok, params):
    params = dict(params)
    embeddings = np.array(params["language_model/in_out_embed"]["embeddings"])
    embeddings[CONFIG.eos_token] *= 100  # EOS becomes the greedy choice
    params["language_model/in_out_embed"] = {"embeddings": embeddings}
    engine = Engine(Grok(CONFIG, params, ByteTokenizer(), cpu_format=not grok.scan_layers), max_batch=1, cache_len=32)
    result = engine.generate([Request(PROMPTS[0], max_tokens=8, sampling=GREEDY)])[0]
    assert result.token_ids == [CONFIG.eos_token] and result.finish_reason == "eos" and result.text == ""


def test_logprobs_are_those_of_the_model(engine, grok, alone):
    events = list(engine.submit(Request(PROMPTS[2], max_tokens=4, sampling=GREEDY, logprobs=3)))
    logits = grok.logits(PROMPTS[2] + alone[2][:4]).astype(np.float64)
    logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True
    )
    for t, event in enumerate(events):
        row = logprobs[len(PROMPTS[2]) - 1 + t]
        assert event.logprob == pytest.approx(row[event.token_id], abs=2e-3)
        ids = [i for i, _ in event.top_logprobs]
        assert ids[0] == event.token_id and len(ids) == 3  # greedy: the chosen token is the likeliest
        assert ids == list(np.argsort(-row)[:3])
        assert [lp for _, lp in event.top_logprobs] == pytest.approx(list(np.sort(row)[::-1][:3]), abs=2e-3)


def test_bad_requests_are_refused_without_disturbing_others(engine):
    good = engine.submit(Request(PROMPTS[0], max_tokens=4, sampling=GREEDY))
    for bad, message in [
        (Request([70, 5000]), "outside the vocabulary"),
        (Request([]), "prompt is empty"),
        (Request([70], max_tokens=0), "max_tokens"),
        (Request([70], logprobs=9), "logprobs"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.submit(bad)
    assert len(good.result().token_ids) == 4


def test_cancel_frees_the_slot_and_threads_share_the_engine(grok, alone):
    engine = Engine(grok, max_batch=2, cache_len=48, prefill_chunk=8)
    engine.start()
    try:
        doomed = engine.submit(Request(PROMPTS[3], max_tokens=30, sampling=GREEDY))
        next(iter(doomed))
        doomed.cancel()
        assert list(doomed)[-1].finish_reason == "cancelled"
        results = [None] * 4

        def client(i):
            results[i] = engine.submit(Request(PROMPTS[i], max_tokens=8, sampling=GREEDY)).result().token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == alone
        assert engine.active == 0 and engine.queued == 0
    finally:
        engine.stop()


def test_only_the_executor_holds_device_arrays(grok):
    """Every device call goes through `engine.executor` (the place a pod's processes will mirror):
    after serving requests, with the prefix cache on, the engine itself holds host values only."""
    engine = Engine(grok, max_batch=2, cache_len=64, scheduling=Scheduling(prefix_cache_bytes=1 << 20, block_size=8))
    engine.generate([Request(list(range(3, 30)), max_tokens=4), Request(list(range(3, 20)), max_tokens=4)])
    assert engine.executor.blocks is not None
    held = {name: value for name, value in vars(engine).items() if name != "executor"}
    leaves = jax.tree.leaves(held, is_leaf=lambda x: isinstance(x, jax.Array))
    assert not [x for x in leaves if isinstance(x, jax.Array)]
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(engine.executor.memory))
