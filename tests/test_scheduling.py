"""The engine's scheduling features: prefix caching, prefill beside running streams, prompt-lookup
speculative decoding. Each must leave every output exactly what the request gets alone on a
plain engine."""

import numpy as np
import pytest

from grok import PRESETS, Grok, SamplingParams
from grok.model import transformer, weights
from grok.serving.engine import Engine, Request, Scheduling, prompt_lookup
from grok.serving.prefix_cache import block_hashes, bytes_per_block

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
    return blocks * bytes_per_block(CONFIG, BLOCK, CONFIG.num_kv_heads, transformer.cache_dtype())


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
    # The engine's chunks run the products over other row counts than the whole prompt does, so a
    # logit may round to the neighbouring bf16 value: one step of the top logit's magnitude (0.0625
    # here) is allowed, not the masked-out tokens' error (0.19 when the mask shifted).
    step = 2.0 ** (np.floor(np.log2(np.abs(np.sort(logits)[-4:]).max())) - 7)
    assert [lp for _, lp in event.top_logprobs] == pytest.approx(np.sort(logprobs)[::-1][:4], abs=step + 0.01)


def test_prompt_lookup():
    assert prompt_lookup([5, 6, 7, 1, 5, 6], 3, 3) == [7, 1, 5]  # after "5 6": "7 1 5"
    assert prompt_lookup([1, 2, 3, 9, 2, 3, 8, 1, 2, 3], 3, 2) == [9, 2]  # the longest match wins
    assert prompt_lookup([4, 8, 4, 9, 4], 2, 2) == [9, 4]  # the latest occurrence of "4"
    assert prompt_lookup([7, 7, 7], 3, 4) == [7, 7, 7, 7]  # a repeat goes on repeating
    assert prompt_lookup([1, 2, 1, 2], 2, 5) == [1, 2, 1, 2, 1]
    assert prompt_lookup([1, 2, 3], 3, 4) == [] and prompt_lookup([1], 3, 4) == []
    assert prompt_lookup([4, 8, 4, 9, 4], 2, 2, min_ngram=2) == []  # one recurring token is not enough
    assert prompt_lookup([4, 8, 4, 9, 4, 8], 2, 2, min_ngram=2) == [4, 9]


def test_block_names_chain_the_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], 3)
    assert len(a) == 2 and a == block_hashes([1, 2, 3, 4, 5, 6], 3)
    assert block_hashes([9, 2, 3, 4, 5, 6], 3)[1] != a[1]  # same second block, other first one
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, a) == block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 3)


@pytest.mark.parametrize(
    "field,value", [("prefill_budget", 0), ("prefill_chunk", 0), ("block_size", 0), ("speculate", -1),
                    ("prefix_cache_bytes", -5), ("speculate_max_batch", 0), ("lookup_min_ngram", 0)],
)
def test_bad_scheduling_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        Scheduling(**{field: value})


def test_sixteen_streams_beside_a_long_prompt_with_prefix_hits_and_evictions_through_the_server(params):
    """16 streaming clients (greedy and seeded sampled; prompts on three shared prefixes) and a long
    prompt, through the HTTP server, on an engine with every feature on and a prefix cache too
    small for the workload: each client gets exactly the tokens it gets alone on a plain engine,
    and afterwards every slot is free and every stored block can be evicted."""
    import asyncio
    import json

    import httpx2
    from test_server import running, wait_for

    from grok.server.app import create_app

    grok = Grok(CONFIG, params, None, cpu_format=True)
    busy = engine(grok, max_batch=8, prefill_budget=8, prefix_cache_bytes=prefix_bytes(grok, 6), block_size=BLOCK,
                  speculate=4, speculate_max_batch=8)
    rng = np.random.RandomState(1)
    prefixes = [rng.randint(3, 328, size=n).tolist() for n in (24, 32, 16)]
    prompts = [prefixes[i % 3] + rng.randint(3, 328, size=3 + i % 8).tolist() for i in range(16)]
    prompts.append(rng.randint(3, 328, size=110).tolist())  # the long one, last
    settings = [dict(temperature=0.0 if i % 2 == 0 else 2.0, top_p=1.0, seed=50 + i) for i in range(17)]
    max_tokens = [8 + i % 7 for i in range(16)] + [6]
    plain = engine(grok)
    alone = [plain.generate([Request(p, m, SamplingParams(**s))])[0].token_ids
             for p, m, s in zip(prompts, max_tokens, settings)]

    async def stream_one(session, i):
        await asyncio.sleep(0.3 if i == 16 else 0.01 * i)  # the long prompt comes while the others run
        body = {"model": "m", "prompt": prompts[i], "max_tokens": max_tokens[i], "stream": True, "logprobs": 0,
                **settings[i]}
        ids = []
        async with session.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    return ids
                if line.startswith("data: "):
                    logprobs = json.loads(line[6:])["choices"][0]["logprobs"]
                    ids += [int(t[len("<|token:") : -2]) for t in (logprobs or {}).get("tokens", [])]
        raise AssertionError("the stream ended without [DONE]")

    async def main(url):
        async with httpx2.AsyncClient(base_url=url, timeout=120, limits=httpx2.Limits(max_connections=32)) as session:
            return await asyncio.wait_for(asyncio.gather(*(stream_one(session, i) for i in range(17))), timeout=300)

    with running(create_app(busy, "m")) as url:
        got = asyncio.run(main(url))
        wait_for(lambda: busy.active == 0 and busy.queued == 0)
    assert got == alone
    cache = busy.prefix_cache
    assert busy.stats["prefix_hit_tokens"] > 0 and cache.evicted > 0 and busy.stats["accepted"] > 0
    assert busy.active == 0 and not busy._admitted
    assert len(cache.allocate([bytes([i]) * 32 for i in range(cache.capacity)], keep=set())) == cache.capacity


def test_serve_flags_make_the_scheduling(params):
    from grok import cli

    grok = Grok(CONFIG, params, None, cpu_format=True)
    args = cli.build_parser().parse_args(["serve", "--max-batch", "4", "--cache-len", "64"])
    default = cli._scheduling(args, grok)
    kv_bytes = 2 * CONFIG.num_layers * 4 * CONFIG.num_kv_heads * 64 * CONFIG.key_size * 4  # f32 cache on CPU
    assert default.prefix_cache_bytes == int(cli.DEFAULT_SHARE * kv_bytes)
    assert (default.prefill_budget, default.speculate) == (None, cli.DEFAULT_SPECULATE)
    args = cli.build_parser().parse_args(["serve", "--prefix-cache-mb", "0", "--prefill-budget", "32",
                                          "--speculate", "0", "--speculate-max-batch", "3"])
    assert cli._scheduling(args, grok) == Scheduling(prefill_budget=32, speculate=0, speculate_max_batch=3)
    assert Engine(grok, max_batch=1, cache_len=64, scheduling=cli._scheduling(args, grok)).prefix_cache is None


def test_automatic_budget_follows_the_measured_times(grok):
    auto = engine(grok, max_batch=2)
    assert auto._buckets == [16] and auto.prefill_budget() == 16
    auto = Engine(grok, max_batch=2, cache_len=CACHE_LEN, scheduling=Scheduling(prefill_chunk=100))
    assert auto._buckets == [16, 32, 64, 100]
    assert auto.prefill_budget() == 16  # nothing measured yet
    auto._seconds.update({"decode": 0.1, "prefill 16": 0.03})
    assert auto.prefill_budget() == 32  # 16 tokens take 0.03 s: 32 should take 0.06, 64 0.12
    auto._seconds["prefill 32"] = 0.04
    assert auto.prefill_budget() == 64  # 32 took 0.04: 64 should take 0.08, 100 0.125
    auto._seconds["prefill 64"] = 0.11
    assert auto.prefill_budget() == 32  # 64 is slower than a decode step
    auto._seconds.update({"decode": 1.0, "prefill 64": 0.2})
    assert auto.prefill_budget() == 100
    assert Engine(grok, max_batch=1, cache_len=CACHE_LEN, scheduling=Scheduling(prefill_budget=40)).prefill_budget() == 40


def test_every_feature_on_a_sharded_engine(grok, params, alone):
    """Prefix cache (its store sharded like the cache: batch over `data`, kv heads over `model`),
    budgeted prefill and speculation on a 2 x 2 mesh give the single-device outputs (of the int8
    format: a sharded model keeps its weights int8)."""
    if not grok.scan_layers:
        pytest.skip("a sharded model is in the int8 format")
    import jax

    from grok.parallel.sharding import Sharder, load_rules, make_mesh

    sharder = Sharder(load_rules("tensor_parallel"), make_mesh(2, 2, jax.devices()[:4]))
    grok = Grok(CONFIG, params, None, sharder=sharder)
    sharded = engine(grok, prefill_budget=16, prefix_cache_bytes=prefix_bytes(grok, 8), block_size=BLOCK,
                     speculate=3, speculate_max_batch=4)
    assert len(sharded.executor.blocks.k.sharding.device_set) == 4
    first = sharded.generate([Request(p, MAX_TOKENS, GREEDY) for p in PROMPTS[:2]])
    second = sharded.generate([Request(p, MAX_TOKENS, GREEDY) for p in PROMPTS[2:]])
    assert [r.token_ids for r in first + second] == alone
    assert sharded.stats["prefix_hit_tokens"] > 0
