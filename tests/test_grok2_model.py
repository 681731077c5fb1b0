"""Grok-2's model on the same modules as Grok-1 (grok/model: each difference a config field) against
the NumPy reference (tests/numpy_reference.py, which writes them from the release's config and
SGLang's model code): RoPE base, attention temperature past a length, router and output soft-caps,
the dense MLP beside the MoE, the untied output table. On one device (the scanned model, and the
int8 CPU path), and on 8 devices under tensor_parallel and expert_tensor_parallel; cached decode
equals the full forward past the temperature length; and each field changes the logits, so none
passes by doing nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from test_generation import assert_cached_decode_equals_full_forward
from test_model_vs_reference import TOLERANCE, assert_matches_reference, prompt_set, relative_error

from grok import PRESETS, Grok
from grok.model import transformer, weights
from grok.parallel.sharding import Sharder, load_rules, mesh_of

# Grok-2's fields at tiny sizes: a temperature length inside the 24-token prompts, caps the random
# model's router and output logits reach (about 1 and 16 in size), a dense MLP, its own output table.
GROK2_FIELDS = dict(rope_base=208533.0, attn_temperature_len=8, router_softcap=1.0, output_softcap=10.0,
                    tie_embeddings=False)
TINY = PRESETS["tiny"].replace(residual_ffn_size=96, **GROK2_FIELDS)
SHARD = PRESETS["shard"].replace(residual_ffn_size=128, **GROK2_FIELDS)  # widths that divide by 8


@pytest.fixture(scope="module")
def tiny_params():
    return weights.random_params(TINY, 5)


def test_the_grok2_preset_is_the_release():
    config = PRESETS["grok-2"]
    assert (config.emb_size, config.num_layers, config.num_q_heads, config.num_kv_heads, config.key_size) == (
        8192, 64, 64, 8, 128)
    assert (config.ffn_size, config.residual_ffn_size, config.num_experts, config.num_selected_experts) == (
        16384, 32768, 8, 2)
    assert (config.vocab_size, config.sequence_len, config.rope_base) == (131072, 131072, 208533496)
    assert (config.attn_temperature_len, config.router_softcap, config.output_softcap) == (1024, 30, 50)
    assert round(config.embedding_multiplier_scale, 2) == 90.51 and config.output_multiplier_scale == 0.5
    assert not config.tie_embeddings
    shapes = weights.model_shapes(config)  # abstractly: the tree holds the dense MLP and the output table
    assert shapes["transformer/decoder_layer/dense_mlp/linear"]["w"].shape == (64, 8192, 32768)
    assert shapes["language_model/in_out_embed"]["unembeddings"].shape == (131072, 8192)


@pytest.mark.parametrize("seed", [0, 1])
def test_logits_and_layers_match_the_reference(seed, monkeypatch):
    params = weights.random_params(TINY, seed)
    tokens = prompt_set(TINY, seed)
    apply = jax.jit(transformer.build(TINY, return_hidden=True).apply)
    out = apply(weights.stack_layers(params, TINY.num_layers), jnp.asarray(tokens))
    assert_matches_reference(TINY, params, tokens, out, f"grok-2 tiny/{seed}", monkeypatch)


def test_the_int8_cpu_path_matches_the_reference(tiny_params):
    grok = Grok(TINY, weights.stack_layers(tiny_params, TINY.num_layers))
    assert not grok.scan_layers  # the CPU format: unrolled, native int8 kernels
    tokens = prompt_set(TINY, 5)[0]
    ref, _ = numpy_reference.reference_forward(tiny_params, TINY, tokens[None])
    err = relative_error(grok.logits(tokens), ref[0])
    assert err.max() < TOLERANCE, err.max()


@pytest.mark.parametrize("rules, mesh", [
    ("tensor_parallel", {"data": 1, "model": 8}),
    ("expert_tensor_parallel", {"data": 1, "expert": 2, "model": 4}),
])
def test_eight_devices_match_the_reference(rules, mesh):
    params = weights.random_params(SHARD, 2)
    sharder = Sharder(load_rules(rules), mesh_of(mesh, jax.devices()[:8]))
    grok = Grok(SHARD, weights.stack_layers(params, SHARD.num_layers), sharder=sharder)
    tokens = prompt_set(SHARD, 2)[0]
    ref, _ = numpy_reference.reference_forward(params, SHARD, tokens[None])
    err = relative_error(grok.logits(tokens), ref[0])
    assert err.max() < TOLERANCE, err.max()


def test_cached_decode_equals_the_full_forward_past_the_temperature_length(tiny_params):
    """A 12-token prompt (positions past 8 already), then 8 tokens one at a time."""
    grok = Grok(TINY, weights.stack_layers(tiny_params, TINY.num_layers), cpu_format=False)
    assert_cached_decode_equals_full_forward(grok, TINY)


@pytest.mark.parametrize("field, grok1_value", [
    ("rope_base", 10000.0), ("attn_temperature_len", 0), ("router_softcap", 0.0), ("output_softcap", 0.0),
    ("residual_ffn_size", 0), ("tie_embeddings", True),
])
def test_each_field_changes_the_logits(tiny_params, field, grok1_value):
    """The model with one field back at Grok-1's value is far from the reference: every field is used."""
    tokens = prompt_set(TINY, 5)
    ref, _ = numpy_reference.reference_forward(tiny_params, TINY, tokens)
    config = TINY.replace(**{field: grok1_value})
    out = transformer.build(config).apply(weights.stack_layers(tiny_params, TINY.num_layers), jnp.asarray(tokens))
    err = relative_error(np.asarray(out.logits, np.float32), ref)
    assert err[tokens > 0].max() > TOLERANCE, f"{field}: {err[tokens > 0].max():.4f}"
