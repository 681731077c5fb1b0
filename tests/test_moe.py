"""The fast mixture-of-experts strategies ("ragged", "gather", "auto") against the all-experts reference.

Tolerance: the strategies follow the same precision rules (bf16-rounded input matmuls, f32 from
there on, bf16 gates, f32 sum, bf16 output) and differ only in which rows a matmul sees at once
and in the weights' layout (the CPU format is transposed), so f32 sums may associate differently
and a bf16 rounding may then land one bf16 unit in the last place apart (at most 2**-7 of the
value). We require at least 99% of the elements bit-identical and every element within one such
unit; measured on CPU: about 1 element in 1000 differs, by one unit. Whole-model logits go through a few
layers of such roundings (and a flipped last bit can move a near-tie routing decision), so there
we allow 1% of the row maximum, far below what a wrong expert or gate does (tens of percent).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grok import PRESETS, native
from grok.model import ops, transformer, weights
from grok.model.platform import tracing_for
from grok.model.quant import F32Experts, QuantizedWeight8bit, quantize, to_f32_weight, to_rows_weight
from grok.model.transformer import no_constraint
from grok.parallel.sharding import Sharder, load_rules, make_mesh, mesh_of

moe = jax.jit(ops.moe, static_argnums=6)


def expert_weights(rng, e: int, d: int, f: int) -> tuple[QuantizedWeight8bit, ...]:
    """Stacked 8-bit expert weights as released: per-column scales in, 8 row blocks of scales out."""
    w_in = quantize(rng.standard_normal((e, d, f)) * 0.3)
    w_gate = quantize(rng.standard_normal((e, d, f)) * 0.3)
    w_out = quantize(rng.standard_normal((e, f, d)) * 0.3, blocks=8)
    assert w_out.scales.shape == (e, 8, d)
    return tuple(jax.tree.map(jnp.asarray, w) for w in (w_in, w_gate, w_out))


def routed(rng, n: int, d: int, e: int, k: int):
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    gates, experts = ops.route(x, jnp.asarray(rng.standard_normal((d, e)), jnp.float32), k)
    return x, gates, experts


def assert_near_exact(got, expected):
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=2**-7, atol=1e-6)
    assert np.mean(got == expected) >= 0.99


@pytest.mark.parametrize(
    "num_experts,k,n",
    [(4, 2, 1), (8, 2, 1), (8, 3, 1), (4, 3, 2), (8, 2, 5), (4, 2, 13), (8, 3, 13), (8, 2, 40), (4, 3, 40)],
)
def test_fast_moe_equals_all_experts(num_experts, k, n):
    """8-bit stacked weights and their CPU form; one token, a few, and several times E."""
    rng = np.random.default_rng(100 * num_experts + 10 * k + n)
    d, f = 32, 48
    w = expert_weights(rng, num_experts, d, f)
    x, gates, experts = routed(rng, n, d, num_experts, k)
    expected = moe(x, gates, experts, *w, "all_experts")
    assert expected.dtype == jnp.bfloat16
    f32 = [to_f32_weight(a, experts_axis=0) for a in w]
    for impl in ("ragged", "gather"):
        assert_near_exact(moe(x, gates, experts, *w, impl), expected)
        assert_near_exact(moe(x, gates, experts, *f32, impl), expected)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("num_experts,k,n", [(8, 2, 1), (8, 2, 4), (4, 2, 2), (8, 2, 16)])
def test_accelerator_decode_moe_equals_all_experts(platform, num_experts, k, n):
    """The decode-batch mixture an accelerator runs (`ops.moe_decode` by way of "auto": selected
    experts' slices for a few tokens, every expert once for more), traced for it, run here."""
    rng = np.random.default_rng(1000 + 100 * num_experts + n)
    w = expert_weights(rng, num_experts, 32, 48)
    x, gates, experts = routed(rng, n, 32, num_experts, k)
    expected = moe(x, gates, experts, *w, "all_experts")
    if platform == "gpu":  # as a GPU holds them (`transformer.held_params`)
        w = tuple(map(to_rows_weight, w))
    with tracing_for(platform):
        got = jax.jit(ops.moe, static_argnums=6)(x, gates, experts, *w, "auto")
        for split in (True, False):
            assert_near_exact(jax.jit(ops.moe_decode, static_argnums=6)(x, gates, experts, *w, split), expected)
    assert_near_exact(got, expected)


@pytest.mark.parametrize("num_experts,k,n", [(8, 2, 1), (4, 3, 2), (8, 2, 40)])
def test_cpu_format_moe_without_the_native_kernel_equals_all_experts(monkeypatch, num_experts, k, n):
    """Where the native kernel is not built, the CPU format's gather and ragged paths run on
    XLA's dot (test_native covers the kernel's `moe_grouped`)."""
    monkeypatch.setattr(native, "available", lambda: False)
    rng = np.random.default_rng(100 * num_experts + 10 * k + n)
    w = expert_weights(rng, num_experts, 32, 48)
    x, gates, experts = routed(rng, n, 32, num_experts, k)
    expected = moe(x, gates, experts, *w, "all_experts")
    f32 = [to_f32_weight(a, experts_axis=0) for a in w]
    for impl in ("ragged", "gather"):
        with_xla = jax.jit(lambda *args: ops.moe(*args, impl=impl))  # a new function: traced afresh
        assert "grok_grouped_matmul_t" not in str(jax.make_jaxpr(with_xla)(x, gates, experts, *f32))
        assert_near_exact(with_xla(x, gates, experts, *f32), expected)


def test_fast_moe_float_weights_and_f32_activations():
    """Float (not 8-bit) weights and f32 activations take the same paths with the same numbers."""
    rng = np.random.default_rng(7)
    e, d, f, n = 5, 16, 24, 9
    w = tuple(jnp.asarray(rng.standard_normal(shape) * 0.3, jnp.float32) for shape in ((e, d, f), (e, d, f), (e, f, d)))
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    gates, experts = ops.route(x, jnp.asarray(rng.standard_normal((d, e)), jnp.float32), 2)
    expected = moe(x, gates, experts, *w, "all_experts")
    for impl in ("ragged", "gather"):
        got = moe(x, gates, experts, *w, impl)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["ragged", "gather"])
def test_unselected_experts_never_run(impl):
    """An expert no token selected holds NaN weights: the fast paths never touch it (all_experts'
    0 * NaN poisons every token), and the other experts' results are unchanged."""
    rng = np.random.default_rng(3)
    e, d, f, n = 6, 16, 32, 7
    w = expert_weights(rng, e, d, f)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    experts = jnp.asarray([[0, 2], [2, 5], [5, 0], [0, 2], [2, 0], [5, 2], [0, 5]], jnp.int32)  # 1, 3, 4 unused
    gates = jnp.asarray(rng.uniform(0.1, 0.5, (n, 2)), jnp.float32)
    clean = moe(x, gates, experts, *w, "all_experts")

    def poison(q: QuantizedWeight8bit) -> QuantizedWeight8bit:
        return QuantizedWeight8bit(weight=q.weight, scales=q.scales.at[jnp.array([1, 3, 4])].set(jnp.nan))

    poisoned = [poison(q) for q in w]
    assert np.all(np.isnan(np.asarray(moe(x, gates, experts, *poisoned, "all_experts"), np.float32)))
    assert_near_exact(moe(x, gates, experts, *poisoned, impl), clean)
    f32 = [to_f32_weight(q, experts_axis=0) for q in poisoned]
    assert all(np.isnan(np.asarray(a.values_t[3])).all() for a in f32)
    assert_near_exact(moe(x, gates, experts, *f32, impl), clean)


def test_bucket_sizes_and_auto_choice():
    assert ops.bucket_sizes(1) == (0, 1)
    assert ops.bucket_sizes(8) == (0, 1, 4, 8)
    sizes = ops.bucket_sizes(512)
    assert sizes[0] == 0 and sizes[-1] == 512 and len(sizes) <= 20
    assert all(b <= max(8, 1.5 * a) for a, b in zip(sizes[1:], sizes[2:]))  # at most 50% padding past 8
    assert ops.bucket_sizes(100)[-1] == 100
    assert ops.choose_moe_impl("auto", 1, 2, 8) == "gather"
    assert ops.choose_moe_impl("auto", 4, 2, 8) == "gather"
    assert ops.choose_moe_impl("auto", 5, 2, 8) == "ragged"
    assert ops.choose_moe_impl("all_experts", 500, 2, 8) == "all_experts"
    # Expert parallelism: "ragged" would all-gather every expert to every device; "gather" does not.
    assert ops.choose_moe_impl("auto", 4, 2, 8, experts_split=True) == "gather"
    assert ops.choose_moe_impl("auto", 5, 2, 8, experts_split=True) == "all_experts"
    with pytest.raises(ValueError, match="unknown moe_impl 'dense'"):
        ops.choose_moe_impl("dense", 1, 2, 8)
    with pytest.raises(ValueError, match="unknown moe_impl"):
        transformer.build(PRESETS["tiny"], moe_impl="dense")


def test_expert_split_is_read_from_the_sharding_rules():
    split = lambda rules, data, model_size: transformer.experts_split(Sharder(load_rules(rules), make_mesh(data, model_size)).constrain)
    assert split("expert_parallel", 1, 8) and split("expert_parallel", 2, 4)
    assert not split("expert_parallel", 8, 1)  # a model axis of one device splits nothing
    assert not split("tensor_parallel", 1, 8) and not split("replicated", 1, 8)
    assert not transformer.experts_split(no_constraint)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("n", [1, 2])
def test_accelerator_decode_moe_on_split_experts_equals_all_experts(platform, n):
    """Experts split over 4 devices (and their ffn width over 2): a token or two slice their experts
    on the devices that hold them (`ops.ExpertSplit`, a shard_map), the sums meet after."""
    config = PRESETS["shard"]  # 8 experts, widths that divide by 8
    sharder = Sharder(load_rules("expert_tensor_parallel"), mesh_of({"data": 1, "expert": 4, "model": 2}, jax.devices()[:8]))
    rng = np.random.default_rng(7 + n)
    d, f, e = config.emb_size, config.ffn_size, config.num_experts
    w = expert_weights(rng, e, d, f)
    x, gates, experts = routed(rng, n, d, e, 2)
    expected = moe(x, gates, experts, *w, "all_experts")
    with tracing_for(platform):
        split = transformer.expert_split(config, sharder.constrain)
        if platform == "gpu":
            w = tuple(map(to_rows_weight, w))
        shardings = [_held_sharding(sharder.mesh, a, spec) for a, spec in zip(w, split.specs)]
        w = tuple(jax.device_put(a, s) for a, s in zip(w, shardings))
        got = jax.jit(lambda *args: ops.moe_decode(*args, split))(x, gates, experts, *w)
    assert_near_exact(got, expected)


def _held_sharding(mesh, w, spec):
    held = ops._held_spec(w, spec)
    return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), held,
                        is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


def test_f32_weights_hold_the_dequantized_bf16_values():
    rng = np.random.default_rng(5)
    q = jax.tree.map(jnp.asarray, quantize(rng.standard_normal((3, 16, 8)), blocks=8))
    f32 = to_f32_weight(q, experts_axis=0)
    assert isinstance(f32, F32Experts) and f32.shape == (3, 16, 8) and len(f32.values_t) == 3
    expected = np.asarray(jax.jit(transformer.as_matrix, static_argnums=1)(q, jnp.bfloat16), np.float32)
    for e in range(3):
        value = np.asarray(f32.values_t[e]).T  # stored [out, in]
        assert f32.values_t[e].dtype == jnp.float32
        np.testing.assert_array_equal(value, expected[e])
        np.testing.assert_array_equal(value.astype(ml_dtypes.bfloat16).astype(np.float32), expected[e])


# ---------------------------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------------------------


def prompts(config, seed: int) -> np.ndarray:
    """Right-padded prompts of different lengths, one with a pad token inside."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, config.vocab_size, size=(3, 20))
    for row, length in enumerate((20, 13, 6)):
        tokens[row, length:] = config.pad_token
    tokens[0, 4] = config.pad_token
    return tokens


def assert_logits_close(actual, expected, real):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    err = np.abs(actual - expected).max(-1) / np.abs(expected).max(-1)
    assert err[real].max() < 0.01, f"{err[real].max():.4f} of the row max"


@pytest.fixture(scope="module", params=["tiny", "shard"])
def setup(request):
    """A config (tiny: 4 experts; shard: 8), its stacked and per-layer weights, prompts, reference logits."""
    config = PRESETS[request.param]
    per_layer = weights.random_params(config, 11)
    stacked = weights.stack_layers(per_layer, config.num_layers)
    tokens = jnp.asarray(prompts(config, 1))
    reference = jax.jit(transformer.build(config, moe_impl="all_experts").apply)(stacked, tokens).logits
    return config, stacked, per_layer, tokens, reference


# ("auto" is "ragged" for these 60-token batches, see test_bucket_sizes_and_auto_choice; the
# cached decode test below runs it on both its paths.)
@pytest.mark.parametrize("moe_impl", ["ragged", "gather"])
def test_model_logits_equal_all_experts(setup, moe_impl):
    config, stacked, _, tokens, reference = setup
    logits = jax.jit(transformer.build(config, moe_impl=moe_impl).apply)(stacked, tokens).logits
    assert_logits_close(logits, reference, np.asarray(tokens) > config.pad_token)


def test_unrolled_f32_model_equals_all_experts(setup):
    """The CPU format (per-layer tree, f32 weights, unrolled layers) gives the reference logits."""
    config, _, per_layer, tokens, reference = setup
    params = transformer.f32_params(per_layer)
    assert isinstance(params["transformer/decoder_layer_0/moe/linear_1"]["w"], F32Experts)
    for moe_impl in ("auto", "all_experts"):
        apply = jax.jit(transformer.build(config, moe_impl=moe_impl, scan_layers=False).apply)
        assert_logits_close(apply(params, tokens).logits, reference, np.asarray(tokens) > config.pad_token)


# On 8 experts only: test_generation decodes the tiny model from its cache in both formats (against
# its own full forward, which test_model_logits_equal_all_experts checks against all_experts).
@pytest.mark.parametrize("setup", ["shard"], indirect=True)
def test_cached_decode_with_fast_moe_matches_full_forward(setup):
    """Prefill then one-token decode steps (auto: "gather" for one token, "ragged" for the prompt)
    give the full-forward all_experts logits, for the scanned 8-bit model and the unrolled f32 one."""
    config, stacked, per_layer, tokens, reference = setup
    row = np.asarray(tokens[:1])  # the 20-token prompt (with a pad inside)
    for params, scan in ((stacked, True), (transformer.f32_params(per_layer), False)):
        apply = jax.jit(transformer.build(config, moe_impl="auto", scan_layers=scan).apply, donate_argnums=2)
        out = apply(params, jnp.asarray(row[:, :12]), transformer.init_memory(config, 1, 32))
        logits = [np.asarray(out.logits[0], np.float32)]
        for t in range(12, 20):
            out = apply(params, jnp.asarray(row[:, t : t + 1]), out.memory)
            logits.append(np.asarray(out.logits[0], np.float32))
        real = row[0] > config.pad_token
        assert_logits_close(np.concatenate(logits), reference[0], real)
