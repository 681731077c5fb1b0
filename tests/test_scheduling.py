"""The engine's scheduling features: prefix caching, prefill beside running streams, prompt-lookup
speculative decoding. Each must leave every output exactly what the request gets alone on a
plain engine."""

import numpy as np
import pytest

from grok import Grok, PRESETS, SamplingParams, weights
from grok.engine import Engine, Request, Scheduling, prompt_lookup
from grok.prefix_cache import block_hashes, bytes_per_block
from grok import model

# A small embedding scale: with the stock scale, random embeddings swamp the layers and greedy
# decoding repeats the last prompt token whatever the cache holds; with this one every token
# depends on the whole context, so a wrong key or value changes the output.
CONFIG = PRESETS["tiny"].replace(vocab_size=328, sequence_len=128, embedding_multiplier_scale=0.05)
GREEDY = SamplingParams(temperature=0)
CACHE_LEN = 128
BLOCK = 8
_rng = np.random.RandomState(0)
SHARED = _rng.randint(3, 328, size=40).tolist()  # 5 blocks
PROMPTS = [SHARED + _rng.randint(3, 328, size=n).tolist() for n in (3, 9, 17)] + [_rng.randint(3, 328, size=21).tolist()]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def params():
    return weights.stack_layers(weights.random_params(CONFIG, 5), CONFIG.num_layers)


@pytest.fixture(scope="module", params=[False, True], ids=["int8", "cpu_format"])
def grok(request, params):
    return Grok(CONFIG, params, None, cpu_format=request.param)


def engine(grok, max_batch=4, **scheduling) -> Engine:
    return Engine(grok, max_batch=max_batch, cache_len=CACHE_LEN, scheduling=Scheduling(prefill_chunk=16, **scheduling))


def prefix_bytes(grok, blocks: int) -> int:
    return blocks * bytes_per_block(CONFIG, BLOCK, CONFIG.num_kv_heads, model.cache_dtype())


@pytest.fixture(scope="module")
def alone(grok):
    """Each prompt's greedy output on a plain engine, with nothing else running."""
    plain = engine(grok)
    return [plain.generate([Request(p, MAX_TOKENS, GREEDY)])[0].token_ids for p in PROMPTS]


def test_outputs_depend_on_the_whole_prompt(alone):
    """Else equal outputs would prove nothing about the keys and values reused."""
    assert len({tuple(a) for a in alone}) == len(alone)
    assert all(len(set(a)) > 3 for a in alone)


def test_prefix_cache_reuses_blocks_and_changes_no_output(grok, alone):
    cached = engine(grok, prefix_cache_bytes=prefix_bytes(grok, 64), block_size=BLOCK)
    outputs = []
    for prompt in PROMPTS:
        before = cached.stats["prefix_hit_tokens"]
        outputs.append(cached.generate([Request(prompt, MAX_TOKENS, GREEDY)])[0].token_ids)
        hit = cached.stats["prefix_hit_tokens"] - before
        # The first prompt finds nothing; the others share its 40-token (5-block) start.
        assert hit == (0 if prompt is PROMPTS[0] or prompt is PROMPTS[3] else len(SHARED))
    assert outputs == alone
    # The same prompt again reuses every full block but the one holding its last token.
    again = cached.generate([Request(PROMPTS[2], MAX_TOKENS, GREEDY)])[0].token_ids
    assert again == alone[2]
    # A next turn (prompt + answer + more) also reuses the blocks of the generated tokens.
    turn = PROMPTS[1] + alone[1] + [70, 71, 72]
    before = cached.stats["prefix_hit_tokens"]
    want = engine(grok).generate([Request(turn, MAX_TOKENS, GREEDY)])[0].token_ids
    assert cached.generate([Request(turn, MAX_TOKENS, GREEDY)])[0].token_ids == want
    assert cached.stats["prefix_hit_tokens"] - before == (len(PROMPTS[1]) + MAX_TOKENS - 1) // BLOCK * BLOCK


def test_eviction_never_changes_a_running_request(grok, alone):
    """A store of 3 blocks, far less than the workload: blocks are evicted while requests that
    restored them still run, and every output stays the same."""
    small = engine(grok, prefix_cache_bytes=prefix_bytes(grok, 3), block_size=BLOCK)
    assert small.prefix_cache.capacity == 3
    requests = [Request(p, MAX_TOKENS, GREEDY) for p in PROMPTS + PROMPTS[::-1] + PROMPTS]
    results = small.generate(requests)
    assert [r.token_ids for r in results] == alone + alone[::-1] + alone
    assert small.prefix_cache.evicted > 0 and small.stats["prefix_hit_tokens"] > 0
    assert small.prefix_cache.used <= 3 and small.active == 0


def test_a_long_prompt_is_prefilled_beside_running_streams(grok, alone):
    """With a budget of 8 prompt tokens per step, running streams get a token at every step while a
    long prompt is prefilled over many steps; nobody's output changes."""
    mixed = engine(grok, prefill_budget=8)
    short = [mixed.submit(Request(p, 40, GREEDY)) for p in PROMPTS[:3]]
    while not all(s._events.qsize() for s in short):  # all three past their prompts
        mixed.step()
    long_prompt = PROMPTS[3] + PROMPTS[2]  # 78 tokens: 10 steps of at most 8
    late = mixed.submit(Request(long_prompt, MAX_TOKENS, GREEDY))
    steps = 0
    while late._events.empty():
        counts = [s._events.qsize() for s in short]
        mixed.step()
        steps += 1
        assert [s._events.qsize() for s in short] == [c + 1 for c in counts], "a running stream missed a step"
    assert steps == -(-len(long_prompt) // 8)
    results = [s.result().token_ids for s in short]
    assert [r[:MAX_TOKENS] for r in results] == alone[:3]
    assert late.result().token_ids == engine(grok).generate([Request(long_prompt, MAX_TOKENS, GREEDY)])[0].token_ids


def test_several_short_prompts_share_one_step_s_budget(grok, alone):
    mixed = engine(grok, prefill_budget=64)
    streams = [mixed.submit(Request(p, MAX_TOKENS, GREEDY)) for p in PROMPTS[:2]]
    mixed.step()  # nothing decodes yet: prefill_chunk (16) per step
    mixed.step()
    running = mixed.submit(Request(PROMPTS[3], MAX_TOKENS, GREEDY))
    while running._events.empty():
        mixed.step()
    assert [s.result().token_ids for s in streams] == alone[:2] and running.result().token_ids == alone[3]


def test_speculation_changes_no_output(grok, alone):
    """Prompt lookup on: greedy outputs are identical, with proposals accepted (repeats in the
    prompt and in the output make some right), and seeded sampled requests are untouched (they are
    never speculated)."""
    spec = engine(grok, speculate=4, speculate_max_batch=4)
    repeats = PROMPTS[3][:6] * 4  # the model continues such a prompt partly as the repeat
    want = engine(grok).generate([Request(repeats, 24, GREEDY)])[0].token_ids
    results = spec.generate([Request(p, MAX_TOKENS, GREEDY) for p in PROMPTS] + [Request(repeats, 24, GREEDY)])
    assert [r.token_ids for r in results] == alone + [want]
    assert spec.stats["accepted"] > 0 and spec.stats["speculative_steps"] > 0
    assert spec.stats["accepted"] < spec.stats["proposed"]  # and some were wrong, and rolled back
    sampled = [Request(p, MAX_TOKENS, SamplingParams(temperature=3.0, seed=7 + i)) for i, p in enumerate(PROMPTS)]
    mixed = spec.generate(sampled[:2] + [Request(repeats, 24, GREEDY)] + sampled[2:])
    plain = engine(grok).generate(sampled)
    assert [r.token_ids for r in mixed[:2] + mixed[3:]] == [r.token_ids for r in plain]
    assert mixed[2].token_ids == want


def test_speculation_stops_exactly_at_max_tokens_and_the_context(grok):
    spec = engine(grok, speculate=4)
    repeats = PROMPTS[3][:5] * 5
    plain = engine(grok)
    for max_tokens in (1, 2, 5, 7):
        want = plain.generate([Request(repeats, max_tokens, GREEDY)])[0]
        got = spec.generate([Request(repeats, max_tokens, GREEDY)])[0]
        assert got.token_ids == want.token_ids and got.finish_reason == "length"
    near_end = (PROMPTS[3][:5] * 30)[: CACHE_LEN - 6]  # room for 6 tokens
    want = plain.generate([Request(near_end, 40, GREEDY, logprobs=2)])[0]
    got = spec.generate([Request(near_end, 40, GREEDY, logprobs=2)])[0]
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "context"


def test_logprobs_at_the_end_of_the_context_are_the_model_s(grok):
    """A last chunk padded past the end of the cache: its keys' mask is written where its keys are
    (a dynamic_update_slice used to shift the whole chunk back, masking real tokens out).
    The mask is written by code both weight formats share: one of them is enough."""
    if grok.scan_layers:
        pytest.skip("the CPU format's run covers it")
    small = Engine(grok, max_batch=1, cache_len=40, prefill_chunk=32)
    prompt = PROMPTS[3] + PROMPTS[0][:17]  # 38 tokens: chunks of 32 and 6, the 6 padded to 16
    event = next(iter(small.submit(Request(prompt, 1, GREEDY, logprobs=4))))
    logits = grok.logits(prompt)[-1].astype(np.float64)
    logprobs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert [t for t, _ in event.top_logprobs] == list(np.argsort(-logprobs)[:4])
    assert [lp for _, lp in event.top_logprobs] == pytest.approx(np.sort(logprobs)[::-1][:4], abs=0.05)


def test_prompt_lookup():
    assert prompt_lookup([5, 6, 7, 1, 5, 6], 3, 3) == [7, 1, 5]  # after "5 6": "7 1 5"
    assert prompt_lookup([1, 2, 3, 9, 2, 3, 8, 1, 2, 3], 3, 2) == [9, 2]  # the longest match wins
    assert prompt_lookup([4, 8, 4, 9, 4], 2, 2) == [9, 4]  # the latest occurrence of "4"
    assert prompt_lookup([7, 7, 7], 3, 4) == [7, 7, 7, 7]  # a repeat goes on repeating
    assert prompt_lookup([1, 2, 1, 2], 2, 5) == [1, 2, 1, 2, 1]
    assert prompt_lookup([1, 2, 3], 3, 4) == [] and prompt_lookup([1], 3, 4) == []


def test_block_names_chain_the_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], 3)
    assert len(a) == 2 and a == block_hashes([1, 2, 3, 4, 5, 6], 3)
    assert block_hashes([9, 2, 3, 4, 5, 6], 3)[1] != a[1]  # same second block, other first one
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, a) == block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 3)


@pytest.mark.parametrize(
    "field,value", [("prefill_budget", 0), ("prefill_chunk", 0), ("block_size", 0), ("speculate", -1),
                    ("prefix_cache_bytes", -5), ("speculate_max_batch", 0)],
)
def test_bad_scheduling_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        Scheduling(**{field: value})
