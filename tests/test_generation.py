"""KV-cache decoding, sampling and the `Grok` API on a tiny random-weight model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok import PRESETS, Grok, SamplingParams
from grok.model import transformer, weights
from grok.serving.sampling import sample

CONFIG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def params():
    return weights.stack_layers(weights.random_params(CONFIG, 3), CONFIG.num_layers)


# 8-bit weights with scanned layers and a stacked cache, and the CPU format (f32 weights, unrolled
# layers, one cache array per layer).
@pytest.fixture(scope="module", params=[False, True], ids=["int8", "cpu_format"])
def grok(request, params):
    return Grok(CONFIG, params, cpu_format=request.param)


def test_cached_decode_equals_full_forward(grok):
    """Prefill a right-padded prompt, then decode token by token: logits match one full pass."""
    assert_cached_decode_equals_full_forward(grok, CONFIG)


def assert_cached_decode_equals_full_forward(grok, config):
    """A 12-token prompt prefilled (right-padded to 16), then 8 tokens decoded one at a time: the
    logits of every position match one full forward pass over the 20 tokens."""
    rng = np.random.default_rng(0)
    sequence = rng.integers(3, config.vocab_size, size=20)
    full = grok.logits(sequence)

    apply = jax.jit(grok.apply)
    prompt = np.zeros((1, 16), np.int32)
    prompt[0, :12] = sequence[:12]
    memory = transformer.init_memory(config, 1, 32, stacked=grok.scan_layers)
    out = apply(grok.params, jnp.asarray(prompt), memory, jnp.asarray([12]))
    cached = [np.asarray(out.logits[0, :12], np.float32)]
    memory = out.memory
    for t in range(12, 20):
        out = apply(grok.params, jnp.asarray([[sequence[t]]]), memory)
        memory = out.memory
        cached.append(np.asarray(out.logits[0], np.float32))
    cached = np.concatenate(cached)
    assert int(memory.step[0]) == 20
    scale = np.abs(full).max(-1, keepdims=True)
    assert np.abs(cached - full).max() / scale.min() < 0.02
    np.testing.assert_array_equal(cached.argmax(-1), full.argmax(-1))


def test_greedy_generation_follows_the_full_forward_argmax(grok):
    prompt = [5, 17, 99, 42]
    result = grok.generate(prompt, max_new_tokens=6, sampling=SamplingParams(temperature=0))
    # Causal: position t's logits in one pass over prompt + output see exactly what step t saw.
    logits = grok.logits(prompt + result.token_ids)
    assert result.token_ids == logits[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_seeded_sampling_is_reproducible(grok):
    settings = SamplingParams(temperature=5.0, top_p=0.9, seed=7)
    first = grok.generate([5, 6, 7], max_new_tokens=8, sampling=settings)
    again = grok.generate([5, 6, 7], max_new_tokens=8, sampling=settings)
    other = grok.generate([5, 6, 7], max_new_tokens=8, sampling=SamplingParams(temperature=5.0, top_p=0.9, seed=8))
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_top_k_and_top_p_stay_in_the_allowed_set():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * 3, jnp.float32)
    keys = jax.random.split(jax.random.key(0), 4)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    order = np.argsort(-probs, -1)
    for seed in range(20):
        keys = jax.random.split(jax.random.key(seed), 4)
        top_k = np.asarray(sample(logits, keys, jnp.ones(4), jnp.ones(4), jnp.full(4, 3)))
        assert all(top_k[b] in order[b, :3] for b in range(4))
        top_p = np.asarray(sample(logits, keys, jnp.ones(4), jnp.full(4, 0.5), jnp.zeros(4, jnp.int32)))
        for b in range(4):
            mass_before = probs[b, order[b]].cumsum() - probs[b, order[b]]
            assert top_p[b] in order[b, mass_before < 0.5]
    greedy = sample(logits, keys, jnp.zeros(4), jnp.ones(4), jnp.zeros(4, jnp.int32))
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1))


def test_generation_stops_at_eos(params):
    forced = dict(params)
    embed = np.array(forced["language_model/in_out_embed"]["embeddings"])
    embed[CONFIG.eos_token] *= 100  # make EOS overwhelmingly likely
    forced["language_model/in_out_embed"] = {"embeddings": jnp.asarray(embed)}
    result = Grok(CONFIG, forced).generate([5, 6], max_new_tokens=10, sampling=SamplingParams(temperature=0))
    assert result.token_ids == [CONFIG.eos_token] and result.finish_reason == "eos"


def test_context_limit_truncates_generation(grok):
    prompt = list(range(3, 3 + CONFIG.sequence_len - 3))
    result = grok.generate(prompt, max_new_tokens=10, sampling=SamplingParams(temperature=0))
    assert len(result.token_ids) == 3 and result.finish_reason == "context"
    with pytest.raises(ValueError, match="leaving no room"):
        grok.generate(list(range(3, 3 + CONFIG.sequence_len)), max_new_tokens=1)


@pytest.mark.parametrize(
    "prompt,kwargs,message",
    [
        ([5, CONFIG.vocab_size], {}, "token id 256 is outside the vocabulary"),
        ([], {}, "prompt is empty"),
        ("text", {}, "no tokenizer"),
        ([5], {"max_new_tokens": 0}, "max_tokens must be >= 1"),
    ],
)
def test_bad_requests_are_named(grok, prompt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        grok.generate(prompt, **kwargs)


def test_bad_sampling_settings_are_named():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize("rules,mesh", [("tensor_parallel", {"data": 1, "model": 8}),
                                        ("expert_tensor_parallel", {"data": 1, "expert": 4, "model": 2})])
def test_greedy_generation_on_the_gpu_path_follows_the_full_forward(params, rules, mesh):
    """Traced for a GPU and run here: parameters held as there (8-bit weights transposed, the table
    in bf16), sharded over 8 devices (the experts too: each device slices its own); decode steps
    take the decode-batch products, the full forward the prefill ones, and agree."""
    from grok.model.platform import tracing_for
    from grok.model.quant import Int8RowsWeight
    from grok.parallel.sharding import Sharder, load_rules, mesh_of

    prompt = [5, 17, 99, 42]
    with tracing_for("gpu"):
        grok = Grok(CONFIG, params, sharder=Sharder(load_rules(rules), mesh_of(mesh, jax.devices()[:8])))
        assert isinstance(grok.params["transformer/decoder_layer/moe/linear"]["w"], Int8RowsWeight)
        result = grok.generate(prompt, max_new_tokens=6, sampling=SamplingParams(temperature=0))
        logits = grok.logits(prompt + result.token_ids)
    assert result.token_ids == logits[len(prompt) - 1 : -1].argmax(-1).tolist()
