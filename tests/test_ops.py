"""One focused test per numerics detail of grok.model.ops / grok.model.quant / the tied embedding.

Every expected value is written out here in NumPy (bf16 rounding via ml_dtypes), and where a
plausible wrong variant exists the test also checks that it gives a clearly different answer.
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grok.model import ops
from grok.model.config import PRESETS
from grok.model.quant import QuantizedWeight8bit
from grok.model.quant import dequantize as _dequantize
from grok.model.quant import quantize
from grok.model.transformer import InOutEmbed, build

BF16 = ml_dtypes.bfloat16
GROK1 = PRESETS["grok-1"]


def bf16(x) -> np.ndarray:
    """Round to bf16 and hand the values back as float32."""
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


# The ops run jitted, as in the engine (and eager op-by-op dispatch would make the file slow).
apply_rope = jax.jit(ops.apply_rope)
_attention = jax.jit(ops.attention, static_argnums=4)


def attention(q, k, v, mask, multiplier):
    """`ops.attention` with keys and values given as [b, s, kv, d] (the oracle's layout)."""
    return _attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, multiplier)


attention_mask = jax.jit(ops.attention_mask)
route = jax.jit(ops.route, static_argnums=2)
expert_ffn = jax.jit(ops.expert_ffn)
moe_all_experts = jax.jit(ops.moe_all_experts)
rms_norm = jax.jit(ops.rms_norm)
dequantize = jax.jit(_dequantize)


def f32(x) -> np.ndarray:
    """A JAX (or NumPy) array as a float32 NumPy array."""
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# NumPy oracles (float64 unless stated; bf16 roundings applied explicitly)
# ---------------------------------------------------------------------------------------------


def np_rope_half(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE: pairs (i, i + d/2) share the frequency inv_freq[i]."""
    d = x.shape[-1]
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    phase = positions[..., None].astype(np.float64) * inv_freq  # [b, t, d/2]
    cos = np.cos(np.concatenate([phase, phase], -1))[:, :, None, :]
    sin = np.sin(np.concatenate([phase, phase], -1))[:, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = np.concatenate([-x2, x1], -1)
    return x * cos + rotated * sin


def np_rope_interleaved(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The wrong (GPT-J) convention: pairs (2i, 2i + 1) share inv_freq[i]."""
    d = x.shape[-1]
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    phase = positions[..., None].astype(np.float64) * inv_freq
    cos, sin = np.cos(phase)[:, :, None, :], np.sin(phase)[:, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x, dtype=np.float64)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out


def np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_attention(q, k, v, mask, multiplier, cap=True, cap_before_mult=False, kv_of_head=None):
    """Loop-level grouped-query attention with the Grok softcap and -1e30 masking."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            kvi = hi // g if kv_of_head is None else kv_of_head(hi, kv, g)
            logits = q[bi, :, hi, :].astype(np.float64) @ k[bi, :, kvi, :].T.astype(np.float64)
            if cap_before_mult:
                logits = multiplier * (30.0 * np.tanh(logits / 30.0))
            else:
                logits = logits * multiplier
                if cap:
                    logits = 30.0 * np.tanh(logits / 30.0)
            logits = np.where(mask[bi], logits, -1e30)
            out[bi, :, hi, :] = np_softmax(logits) @ v[bi, :, kvi, :].astype(np.float64)
    return out


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation, written out."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU: the wrong variant."""
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def np_expert(x, w_in, w_gate, w_out, gelu=gelu_tanh):
    """(gelu(x @ w_in) * (x @ w_gate)) @ w_out in float64."""
    x = x.astype(np.float64)
    return (gelu(x @ w_in) * (x @ w_gate)) @ w_out


# ---------------------------------------------------------------------------------------------
# 1. Rotary embedding
# ---------------------------------------------------------------------------------------------


def test_rope_rotate_half_matches_numpy_and_not_interleaved():
    """apply_rope pairs dims (i, i + d/2) with inv_freq = 1/10000**(2i/d); not (2i, 2i+1)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 11, 19, 30, 63]], np.int32)
    got = f32(apply_rope(jnp.asarray(x), jnp.asarray(positions)))
    expected = np_rope_half(x.astype(np.float64), positions)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    wrong = np_rope_interleaved(x.astype(np.float64), positions)
    assert np.abs(wrong - expected).max() > 0.5


def test_rope_position_zero_is_identity():
    """At position 0 every phase is 0, so RoPE leaves x unchanged."""
    x = np.random.default_rng(1).standard_normal((1, 3, 2, 8)).astype(np.float32)
    got = f32(apply_rope(jnp.asarray(x), jnp.zeros((1, 3), jnp.int32)))
    np.testing.assert_array_equal(got, x)


def test_rope_uses_absolute_positions():
    """A chunk at offset 40 is rotated by its absolute positions 40.., not by 0.. (relative)."""
    x = np.random.default_rng(2).standard_normal((1, 4, 2, 8)).astype(np.float32)
    positions = np.arange(40, 44, dtype=np.int32)[None]
    got = f32(apply_rope(jnp.asarray(x), jnp.asarray(positions)))
    np.testing.assert_allclose(got, np_rope_half(x.astype(np.float64), positions), atol=2e-5, rtol=0)
    chunk_relative = np_rope_half(x.astype(np.float64), np.arange(4)[None])
    assert np.abs(got - chunk_relative).max() > 0.5
    # The same vector at the same absolute position gets the same rotation, whatever the chunk.
    single = f32(apply_rope(jnp.asarray(x[:, 2:3]), jnp.asarray([[42]], jnp.int32)))
    np.testing.assert_allclose(single[:, 0], got[:, 2], atol=1e-6, rtol=0)


def test_rope_bf16_computed_in_f32_and_cast_back():
    """bf16 input: rotation in f32 (float64 oracle), result rounded once to bf16, dtype bf16."""
    x = bf16(np.random.default_rng(3).standard_normal((1, 6, 2, 16)) * 4)
    positions = np.array([[3, 9, 17, 25, 33, 51]], np.int32)
    got = apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(positions))
    assert got.dtype == jnp.bfloat16
    expected = bf16(np_rope_half(x.astype(np.float64), positions))
    # At most a rare one-ulp flip where the f32 result sits on a bf16 rounding boundary.
    np.testing.assert_allclose(f32(got), expected, rtol=2**-7, atol=1e-6)
    assert np.mean(f32(got) == expected) > 0.97


# ---------------------------------------------------------------------------------------------
# 2-3. Attention: softcap, masking, grouped-query heads
# ---------------------------------------------------------------------------------------------


def _softcap_inputs():
    """q . k = 120, 140, 160 for the three keys: scaled by 0.5 they are 60, 70, 80 (cap matters)."""
    d = 4
    q = np.zeros((1, 1, 1, d), np.float32)
    q[0, 0, 0, 0] = 10.0
    k = np.zeros((1, 3, 1, d), np.float32)
    k[0, :, 0, 0] = [12.0, 14.0, 16.0]
    v = np.zeros((1, 3, 1, d), np.float32)
    v[0, :, 0, :] = np.eye(3, d)  # output = the probabilities themselves
    mask = np.ones((1, 1, 3), bool)
    return q, k, v, mask


def test_attention_softcap_after_multiplier():
    """logits = 30 * tanh((q.k * multiplier) / 30) in f32: neither uncapped nor capped-then-scaled."""
    q, k, v, mask = _softcap_inputs()
    got = f32(attention(*map(jnp.asarray, (q, k, v, mask)), 0.5))
    expected = np_attention(q, k, v, mask, 0.5)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    probs = expected[0, 0, 0, :3]
    assert probs.min() > 0.05  # the cap leaves a mixed distribution
    no_cap = np_attention(q, k, v, mask, 0.5, cap=False)
    cap_first = np_attention(q, k, v, mask, 0.5, cap_before_mult=True)
    assert np.abs(no_cap - expected).max() > 0.3
    assert np.abs(cap_first - expected).max() > 0.1


def test_attention_random_matches_numpy_with_cap_active():
    """Random large q, k (many logits beyond the cap): ops.attention matches the NumPy oracle."""
    rng = np.random.default_rng(4)
    q = (rng.standard_normal((2, 4, 4, 8)) * 6).astype(np.float32)
    k = (rng.standard_normal((2, 4, 2, 8)) * 6).astype(np.float32)
    v = rng.standard_normal((2, 4, 2, 8)).astype(np.float32)
    mask = np.tril(np.ones((4, 4), bool))[None].repeat(2, 0)
    mult = 1 / math.sqrt(8)
    got = f32(attention(*map(jnp.asarray, (q, k, v, mask)), mult))
    expected = np_attention(q, k, v, mask, mult)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(np_attention(q, k, v, mask, mult, cap=False) - expected).max() > 0.05


def test_attention_mask_is_causal_and_key_valid():
    """attention_mask[b, i, j] = (j <= query_positions[b, i]) and key_valid[b, j]."""
    key_valid = np.array([[True, True, False, True, True, True], [False, True, True, True, True, False]])
    query_positions = np.array([[2, 3, 4], [0, 1, 5]], np.int32)  # a chunk at an offset, and another
    got = np.asarray(attention_mask(jnp.asarray(key_valid), jnp.asarray(query_positions)))
    expected = np.zeros((2, 3, 6), bool)
    for b in range(2):
        for i in range(3):
            for j in range(6):
                expected[b, i, j] = j <= query_positions[b, i] and key_valid[b, j]
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, expected)


def test_attention_masked_keys_have_no_influence():
    """Masked keys (future or pad) get -1e30: huge values at those keys do not leak into the output."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 3, 2, 8)).astype(np.float32)
    k = rng.standard_normal((1, 5, 1, 8)).astype(np.float32)
    v = rng.standard_normal((1, 5, 1, 8)).astype(np.float32)
    key_valid = np.array([[True, False, True, True, True]])  # key 1 is a pad token
    positions = np.array([[2, 3, 4]], np.int32)
    mask = np.asarray(attention_mask(jnp.asarray(key_valid), jnp.asarray(positions)))
    baseline = f32(attention(*map(jnp.asarray, (q, k, v, mask)), 0.25))
    np.testing.assert_allclose(baseline, np_attention(q, k, v, mask, 0.25), atol=1e-5, rtol=0)

    v_bad, k_bad = v.copy(), k.copy()
    v_bad[0, 1] = 1e20  # pad key: huge value, and a key that would win the softmax if unmasked
    k_bad[0, 1] = q[0, 0, 0] * 50
    poisoned = f32(attention(*map(jnp.asarray, (q, k_bad, v_bad, mask)), 0.25))
    np.testing.assert_array_equal(poisoned, baseline)
    # Query 0 (position 2) cannot see keys 3, 4: poison those too and its row stays the same.
    v_bad[0, 3:] = 1e20
    poisoned = f32(attention(*map(jnp.asarray, (q, k_bad, v_bad, mask)), 0.25))
    np.testing.assert_array_equal(poisoned[:, 0], baseline[:, 0])
    # Sanity: without the pad entry in the mask the poison would dominate.
    unmasked = mask.copy()
    unmasked[0, :, 1] = True
    leaked = f32(attention(*map(jnp.asarray, (q, k_bad, v_bad, unmasked)), 0.25))
    assert np.abs(leaked).max() > 1e10


def test_attention_pad_query_row_is_not_masked():
    """A query at a pad position still attends to earlier real keys (its own pad key is skipped)."""
    key_valid = np.array([[True, True, False]])
    mask = np.asarray(attention_mask(jnp.asarray(key_valid), jnp.asarray([[0, 1, 2]], jnp.int32)))
    np.testing.assert_array_equal(mask[0, 2], [True, True, False])
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 3, 1, 4)).astype(np.float32) for _ in range(3))
    got = f32(attention(*map(jnp.asarray, (q, k, v, mask)), 1.0))
    np.testing.assert_allclose(got, np_attention(q, k, v, mask, 1.0), atol=1e-5, rtol=0)


def test_attention_grouped_query_head_uses_kv_head_h_div_g():
    """H=6, K=2, G=3: query heads 0-2 read kv head 0, heads 3-5 read kv head 1 (not h % K)."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 3, 6, 4)).astype(np.float32)
    k = rng.standard_normal((1, 3, 2, 4)).astype(np.float32)
    v = rng.standard_normal((1, 3, 2, 4)).astype(np.float32)
    v[0, :, 1] += 100.0  # kv head 1 values are far from kv head 0 values
    mask = np.tril(np.ones((3, 3), bool))[None]
    got = f32(attention(*map(jnp.asarray, (q, k, v, mask)), 0.5))
    expected = np_attention(q, k, v, mask, 0.5)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.all(got[0, :, :3] < 50) and np.all(got[0, :, 3:] > 50)
    modulo = np_attention(q, k, v, mask, 0.5, kv_of_head=lambda h, kv, g: h % kv)
    assert np.abs(modulo - expected).max() > 50


def test_attention_f32_cache_of_bf16_values_gives_the_bf16_numbers():
    """bf16 queries over a float32 cache holding bf16 values (the CPU format) = over the bf16 cache
    (up to f32 summation order); the control shows both round the products to bf16 (GROK1.md: the
    logits are a bf16 einsum), which XLA:CPU skips unless told, and plain f32 math does not."""
    rng = np.random.default_rng(9)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 4, 16)) * 3, jnp.bfloat16) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    mask = jnp.asarray(np.tril(np.ones((5, 5), bool))[None].repeat(2, 0))
    bf16_cache = f32(attention(q, k, v, mask, 0.25))
    f32_cache = f32(attention(q, k.astype(jnp.float32), v.astype(jnp.float32), mask, 0.25))
    assert np.abs(f32_cache - bf16_cache).max() <= 2 ** -7 * np.abs(bf16_cache).max()
    assert np.mean(f32_cache == bf16_cache) > 0.99
    unrounded = f32(attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, 0.25))
    assert np.mean(unrounded == bf16_cache) < 0.5
    assert np.abs(unrounded - bf16_cache).max() > 10 * np.abs(f32_cache - bf16_cache).max()


# ---------------------------------------------------------------------------------------------
# 4. Router
# ---------------------------------------------------------------------------------------------


def test_route_softmax_over_all_experts_raw_topk():
    """Gates are the top-k of softmax over ALL E experts (f32), not renormalized; indices correct."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    gates, experts = route(jnp.asarray(x), jnp.asarray(w), 2)
    assert gates.dtype == jnp.float32
    probs = np_softmax(x.astype(np.float64) @ w.astype(np.float64))
    order = np.argsort(-probs, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.asarray(experts), order)
    np.testing.assert_allclose(np.asarray(gates), np.take_along_axis(probs, order, -1), rtol=1e-5)
    sums = np.asarray(gates).sum(-1)
    assert np.all(sums < 0.999)  # not renormalized: the other 2 experts keep some mass
    renormalized = np.take_along_axis(np_softmax(x @ w), order, -1)
    renormalized = renormalized / renormalized.sum(-1, keepdims=True)
    assert np.abs(renormalized - np.asarray(gates)).max() > 0.01
    # Softmax over only the selected logits would also sum to one: it is not what route returns.
    assert np.abs(np.asarray(gates).sum(-1) - 1).min() > 1e-3


def test_route_computes_in_f32_from_bf16_input():
    """bf16 activations are upcast to f32 before the router matmul and softmax."""
    rng = np.random.default_rng(9)
    x = bf16(rng.standard_normal((4, 8)))
    w = rng.standard_normal((8, 4)).astype(np.float32)
    gates, experts = route(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w), 2)
    assert gates.dtype == jnp.float32
    probs = np_softmax(x.astype(np.float64) @ w)
    np.testing.assert_allclose(np.asarray(gates), -np.sort(-probs, -1)[:, :2], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(experts), np.argsort(-probs, -1)[:, :2])


# ---------------------------------------------------------------------------------------------
# 5-6. Experts and mixture
# ---------------------------------------------------------------------------------------------


def test_expert_ffn_uses_tanh_gelu():
    """expert_ffn = (gelu_tanh(x @ w_in) * (x @ w_gate)) @ w_out; erf GELU is clearly different."""
    rng = np.random.default_rng(10)
    x = rng.uniform(-1, 1, (6, 4)).astype(np.float32)
    w_in = rng.uniform(-1, 1, (4, 8)).astype(np.float32)  # pre-activations spread over about -3..3
    w_gate = (rng.standard_normal((4, 8)) * 20).astype(np.float32)
    w_out = (rng.standard_normal((8, 4)) * 20).astype(np.float32)
    got = np.asarray(expert_ffn(*map(jnp.asarray, (x, w_in, w_gate, w_out))))
    assert got.dtype == np.float32
    expected = np_expert(x, w_in, w_gate, w_out)
    tol = 1e-3
    np.testing.assert_allclose(got, expected, atol=tol, rtol=1e-5)
    erf_version = np_expert(x, w_in, w_gate, w_out, gelu=gelu_erf)
    assert np.abs(erf_version - expected).max() > 10 * tol


def test_expert_ffn_bf16_matmuls_then_f32():
    """bf16 inputs: both input matmuls rounded to bf16, then gelu, product and w_out matmul in f32."""
    rng = np.random.default_rng(11)
    x = bf16(rng.standard_normal((3, 16)))
    w_in, w_gate = bf16(rng.standard_normal((16, 8))), bf16(rng.standard_normal((16, 8)))
    w_out = bf16(rng.standard_normal((8, 16)))
    args = [jnp.asarray(a, jnp.bfloat16) for a in (x, w_in, w_gate, w_out)]
    h = bf16(x.astype(np.float64) @ w_in).astype(np.float64)
    g = bf16(x.astype(np.float64) @ w_gate).astype(np.float64)
    expected = (gelu_tanh(h) * g) @ w_out
    # Both eager and under jit, where XLA on CPU would otherwise fuse the upcast into the matmul.
    for fn in (ops.expert_ffn, jax.jit(ops.expert_ffn)):
        got = np.asarray(fn(*args))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-4)


def _moe_weights(rng, e, d, f):
    """Random stacked expert weights [E, D, F], [E, D, F], [E, F, D] in float32."""
    w_in = rng.standard_normal((e, d, f)).astype(np.float32) * 0.5
    w_gate = rng.standard_normal((e, d, f)).astype(np.float32) * 0.5
    w_out = rng.standard_normal((e, f, d)).astype(np.float32) * 0.5
    return w_in, w_gate, w_out


def test_moe_all_experts_weighted_sum_with_bf16_gates():
    """Output = sum over selected experts of bf16(gate) * expert(x); E = 5 (not 8)."""
    rng = np.random.default_rng(12)
    e, d, f, n = 5, 6, 10, 4
    x = rng.standard_normal((n, d)).astype(np.float32)
    w_in, w_gate, w_out = _moe_weights(rng, e, d, f)
    experts = np.array([[4, 1], [0, 3], [2, 4], [3, 0]], np.int32)
    gates = np.array([[0.4137, 0.2213], [0.5009, 0.3337], [0.2891, 0.2777], [0.6131, 0.1013]], np.float32)
    assert np.all(bf16(gates) != gates)  # the rounding is visible
    got = np.asarray(moe_all_experts(*map(jnp.asarray, (x, gates, experts, w_in, w_gate, w_out))))
    assert got.dtype == np.float32

    def mix(gate_values):
        out = np.zeros((n, d))
        for i in range(n):
            for j in range(2):
                ei = experts[i, j]
                out[i] += gate_values[i, j] * np_expert(x[i : i + 1], w_in[ei], w_gate[ei], w_out[ei])[0]
        return out

    expected = mix(bf16(gates).astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    assert np.abs(mix(gates.astype(np.float64)) - expected).max() > 20 * 2e-5


def test_moe_unselected_experts_contribute_nothing():
    """An expert no token selected may hold huge (finite) weights: the output does not change."""
    rng = np.random.default_rng(13)
    e, d, f, n = 6, 4, 8, 3
    x = rng.standard_normal((n, d)).astype(np.float32)
    w_in, w_gate, w_out = _moe_weights(rng, e, d, f)
    experts = np.array([[0, 2], [2, 5], [5, 0]], np.int32)  # experts 1, 3, 4 unused
    gates = np.array([[0.5, 0.25], [0.375, 0.125], [0.625, 0.25]], np.float32)  # bf16-exact
    args = (x, gates, experts, w_in, w_gate, w_out)
    clean = np.asarray(moe_all_experts(*map(jnp.asarray, args)))
    for unused in (1, 3, 4):
        w_in[unused] = 1e3
        w_gate[unused] = -1e3
        w_out[unused] = 1e3
    assert np.all(np.isfinite(np_expert(x, w_in[1], w_gate[1], w_out[1])))  # huge but finite
    poisoned = np.asarray(moe_all_experts(*map(jnp.asarray, args)))
    np.testing.assert_array_equal(poisoned, clean)
    expected = np.zeros((n, d))
    for i in range(n):
        for j in range(2):
            ei = experts[i, j]
            expected[i] += gates[i, j] * np_expert(x[i : i + 1], w_in[ei], w_gate[ei], w_out[ei])[0]
    np.testing.assert_allclose(clean, expected, rtol=2e-5, atol=2e-5)


def test_moe_bf16_output_dtype():
    """bf16 activations in: f32 accumulation, result cast to bf16."""
    rng = np.random.default_rng(14)
    e, d, f, n = 3, 4, 8, 2
    x = bf16(rng.standard_normal((n, d)))
    w_in, w_gate, w_out = (bf16(w) for w in _moe_weights(rng, e, d, f))
    experts = np.array([[2, 0], [1, 2]], np.int32)
    gates = np.array([[0.5, 0.25], [0.375, 0.125]], np.float32)
    args = [jnp.asarray(a, jnp.bfloat16) for a in (x, w_in, w_gate, w_out)]
    got = moe_all_experts(args[0], jnp.asarray(gates), jnp.asarray(experts), *args[1:])
    assert got.dtype == jnp.bfloat16
    expected = np.zeros((n, d))
    for i in range(n):
        for j in range(2):
            ei = experts[i, j]
            h = bf16(x[i].astype(np.float64) @ w_in[ei]).astype(np.float64)
            g = bf16(x[i].astype(np.float64) @ w_gate[ei]).astype(np.float64)
            expected[i] += gates[i, j] * ((gelu_tanh(h) * g) @ w_out[ei])
    np.testing.assert_allclose(f32(got), bf16(expected), rtol=2**-7, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# 7. RMSNorm
# ---------------------------------------------------------------------------------------------


def np_rms_norm(x: np.ndarray, scale: np.ndarray, eps: float = 1e-5, one_plus: bool = False):
    """x / sqrt(mean(x^2) + eps) * scale (or * (1 + scale), the wrong variant), in float64."""
    x = x.astype(np.float64)
    normed = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    return normed * ((1.0 + scale) if one_plus else scale)


def test_rms_norm_plain_scale_f32():
    """rms_norm = x * rsqrt(mean(x^2) + 1e-5) * scale, not * (1 + scale)."""
    rng = np.random.default_rng(15)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 16).astype(np.float32)
    got = np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(scale)))
    assert got.dtype == np.float32
    expected = np_rms_norm(x, scale)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(np_rms_norm(x, scale, one_plus=True) - expected).max() > 0.5


def test_rms_norm_epsilon_is_1e_5():
    """Tiny inputs (mean square ~ 1e-6): eps 1e-5 and 1e-6 give very different outputs."""
    x = (np.random.default_rng(16).standard_normal((2, 8)) * 1e-3).astype(np.float32)
    scale = np.ones(8, np.float32)
    got = np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(scale)))
    expected = np_rms_norm(x, scale, eps=1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    for wrong_eps in (1e-6, 0.0):
        assert np.abs(np_rms_norm(x, scale, eps=wrong_eps) - expected).max() > 0.1


def test_rms_norm_bf16_in_bf16_out():
    """bf16 in -> bf16 out, equal to the f32-computed value rounded once to bf16."""
    rng = np.random.default_rng(17)
    x = bf16(rng.standard_normal((4, 32)) * 3)
    scale = rng.uniform(0.5, 2.0, 32).astype(np.float32)
    got = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(scale))
    assert got.dtype == jnp.bfloat16
    expected = bf16(np_rms_norm(x, scale))
    # Allow a rare single-ulp flip where the f32 value sits on a bf16 rounding boundary.
    np.testing.assert_allclose(f32(got), expected, rtol=2**-7, atol=0)
    assert np.mean(f32(got) == expected) > 0.97


def test_rms_norm_computes_in_f32_not_input_dtype():
    """float16 input whose squares overflow float16 (65504): the f32 computation stays finite."""
    rng = np.random.default_rng(18)
    x = (rng.standard_normal((2, 8)) * 1000).astype(np.float16)
    with np.errstate(over="ignore"):
        assert np.any(np.isinf(x * x))  # computing in the input dtype would overflow
    scale = np.ones(8, np.float32)
    got = rms_norm(jnp.asarray(x), jnp.asarray(scale))
    assert got.dtype == jnp.float16
    expected = np_rms_norm(x.astype(np.float32), scale).astype(np.float16)
    np.testing.assert_allclose(np.asarray(got, np.float32), expected.astype(np.float32), rtol=2e-3)


# ---------------------------------------------------------------------------------------------
# 8. Embedding and output multipliers
# ---------------------------------------------------------------------------------------------


def _embed_config(**changes):
    """Tiny config with Grok-1's real multipliers (78.38... and 0.577...)."""
    fields = dict(
        embedding_multiplier_scale=GROK1.embedding_multiplier_scale,
        output_multiplier_scale=GROK1.output_multiplier_scale,
        vocab_size=32,
        emb_size=16,
    )
    fields.update(changes)
    return PRESETS["tiny"].replace(**fields)


def _embed_fns(config):
    """hk.transform'ed InOutEmbed.embed / .decode sharing one parameter tree."""
    embed = hk.without_apply_rng(hk.transform(lambda t: InOutEmbed(config).embed(t)))
    decode = hk.without_apply_rng(hk.transform(lambda h: InOutEmbed(config).decode(h)))
    return embed, decode


def test_bf16_constant_rounding_of_grok1_multipliers():
    """Grok-1's multipliers as bf16 constants: 78.38... -> 78.5 and 0.577... -> 0.578125."""
    assert float(bf16(GROK1.embedding_multiplier_scale)) == 78.5
    assert float(bf16(GROK1.output_multiplier_scale)) == 0.578125


@pytest.mark.parametrize("jit", [False, True])
def test_embed_multiplies_in_bf16(jit):
    """embed(tokens) == bf16(bf16(emb[tokens]) * bf16(78.38...)) with a bf16 result."""
    config = _embed_config()
    embed, _ = _embed_fns(config)
    tokens = jnp.asarray([[1, 5, 7, 31], [0, 2, 9, 9]], jnp.int32)
    params = embed.init(jax.random.PRNGKey(0), tokens)
    emb = (np.random.default_rng(19).standard_normal((32, 16)) * 0.7).astype(np.float32)
    params = jax.tree_util.tree_map(lambda _: jnp.asarray(emb), params)
    apply = jax.jit(embed.apply) if jit else embed.apply
    got = apply(params, tokens)
    assert got.dtype == jnp.bfloat16
    rows = bf16(emb[np.asarray(tokens)])
    expected = bf16(rows * np.float32(78.5))
    np.testing.assert_array_equal(f32(got), expected)
    f32_multiply = bf16(rows * np.float32(GROK1.embedding_multiplier_scale))
    assert np.sum(f32_multiply != expected) > 5  # a float32 constant would round differently


@pytest.mark.parametrize("jit", [False, True])
def test_decode_bf16_matmul_then_bf16_multiplier(jit):
    """decode(h) == bf16(bf16(h @ bf16(emb).T) * 0.578125), bf16 result (exact small integers)."""
    config = _embed_config()
    _, decode = _embed_fns(config)
    rng = np.random.default_rng(20)
    h = rng.integers(-3, 4, (2, 3, 16)).astype(np.float32)
    emb = rng.integers(-3, 4, (32, 16)).astype(np.float32)  # dot products are exact integers
    params = decode.init(jax.random.PRNGKey(0), jnp.asarray(h, jnp.bfloat16))
    params = jax.tree_util.tree_map(lambda _: jnp.asarray(emb), params)
    apply = jax.jit(decode.apply) if jit else decode.apply
    got = apply(params, jnp.asarray(h, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    dots = h @ emb.T
    expected = bf16(dots * np.float32(0.578125))
    np.testing.assert_array_equal(f32(got), expected)
    f32_multiply = bf16(dots * np.float32(GROK1.output_multiplier_scale))
    assert np.sum(f32_multiply != expected) > 5


def test_model_logits_scale_with_output_multiplier():
    """Full tiny model: doubling output_multiplier_scale doubles the (bf16) logits exactly."""
    config = PRESETS["tiny"].replace(num_layers=1)
    tokens = jnp.asarray([[5, 9, 3, 17]], jnp.int32)
    shapes = jax.eval_shape(build(config).init, jax.random.PRNGKey(1), tokens)  # no compile
    rng = np.random.default_rng(26)
    params = {
        module: {
            name: jnp.ones(leaf.shape) if name == "scale" else jnp.asarray(rng.standard_normal(leaf.shape) * 0.2)
            for name, leaf in leaves.items()
        }
        for module, leaves in shapes.items()
    }
    configs = (
        config,
        config.replace(output_multiplier_scale=2 * config.output_multiplier_scale),
        config.replace(embedding_multiplier_scale=3.0),
    )
    run_all = jax.jit(lambda p, t: [build(c).apply(p, t).logits for c in configs])  # one compile
    base, doubled, changed = run_all(params, tokens)
    assert base.dtype == jnp.bfloat16
    assert np.abs(f32(base)).max() > 0.1
    np.testing.assert_array_equal(f32(doubled), 2 * f32(base))
    assert np.abs(f32(changed) - f32(base)).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 9. 8-bit weights
# ---------------------------------------------------------------------------------------------


def np_dequantize(weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Row r of block b = r // (in / nb) uses scales[..., b, :]; value bf16(bf16(w) * bf16(s))."""
    *_, n_in, _ = weight.shape
    nb = scales.shape[-2]
    rows = np.arange(n_in) // (n_in // nb)
    per_row = bf16(scales)[..., rows, :]
    return bf16(weight.astype(np.float32) * per_row)


def test_dequantize_eight_row_blocks():
    """[in, out] int8 with [8, out] scales: scale row b covers input rows b*in/8 .. (b+1)*in/8 - 1."""
    rng = np.random.default_rng(21)
    weight = rng.integers(-127, 128, (32, 3)).astype(np.int8)
    scales = (rng.uniform(0.01, 0.1, (8, 3))).astype(np.float32).astype(BF16)
    got = dequantize(QuantizedWeight8bit(weight=jnp.asarray(weight), scales=jnp.asarray(scales)))
    assert got.dtype == jnp.bfloat16 and got.shape == (32, 3)
    expected = np_dequantize(weight, np.asarray(scales, np.float32))
    np.testing.assert_array_equal(f32(got), expected)
    for b in range(8):  # spelled out: rows 4b..4b+3 use scale row b
        block = weight[4 * b : 4 * b + 4].astype(np.float32) * np.asarray(scales[b], np.float32)
        np.testing.assert_array_equal(f32(got)[4 * b : 4 * b + 4], bf16(block))
    tiled = bf16(weight.astype(np.float32) * np.asarray(scales, np.float32)[np.arange(32) % 8])
    assert np.abs(tiled - expected).max() > 0.1  # interleaved (row % 8) assignment is wrong


def test_dequantize_per_column_scales():
    """[1, out] scales: one scale per output column, applied to every row."""
    rng = np.random.default_rng(22)
    weight = rng.integers(-127, 128, (6, 4)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, (1, 4)).astype(np.float32).astype(BF16)
    got = dequantize(QuantizedWeight8bit(weight=jnp.asarray(weight), scales=jnp.asarray(scales)))
    assert got.dtype == jnp.bfloat16
    expected = bf16(weight.astype(np.float32) * np.asarray(scales, np.float32)[0][None, :])
    np.testing.assert_array_equal(f32(got), expected)


def test_dequantize_stacked_experts():
    """[E, in, out] with [E, 8, out] (and [E, 1, out]): each expert uses its own block scales."""
    rng = np.random.default_rng(23)
    weight = rng.integers(-127, 128, (3, 16, 5)).astype(np.int8)
    for nb in (8, 1):
        scales = rng.uniform(0.01, 0.1, (3, nb, 5)).astype(np.float32).astype(BF16)
        got = dequantize(QuantizedWeight8bit(weight=jnp.asarray(weight), scales=jnp.asarray(scales)))
        assert got.dtype == jnp.bfloat16 and got.shape == (3, 16, 5)
        s = np.asarray(scales, np.float32)
        for e in range(3):
            for r in range(16):
                row = bf16(weight[e, r].astype(np.float32) * s[e, r // (16 // nb)])
                np.testing.assert_array_equal(f32(got)[e, r], row)


def test_dequantize_rounds_scales_to_bf16_first():
    """Float32 scales are cast to bf16 before the multiply: bf16(w * bf16(s)), not bf16(w * s)."""
    rng = np.random.default_rng(24)
    weight = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, (8, 8)).astype(np.float32)
    got = dequantize(QuantizedWeight8bit(weight=jnp.asarray(weight), scales=jnp.asarray(scales)))
    expected = np_dequantize(weight, scales)
    np.testing.assert_array_equal(f32(got), expected)
    rows = np.arange(16) // 2
    unrounded = bf16(weight.astype(np.float32) * scales[rows])
    assert np.sum(unrounded != expected) > 3


def test_quantize_roundtrip_is_close():
    """quantize(x, blocks=8) then dequantize is within half a quantization step (+ bf16 rounding)."""
    rng = np.random.default_rng(25)
    x = rng.standard_normal((32, 6)).astype(np.float32)
    x[:4] *= 10  # block 0 has a much larger range than the others
    q = quantize(x, blocks=8)
    assert q.weight.dtype == np.int8 and q.weight.shape == (32, 6)
    assert q.scales.shape == (8, 6) and q.scales.dtype == BF16
    back = f32(dequantize(QuantizedWeight8bit(weight=jnp.asarray(q.weight), scales=jnp.asarray(q.scales))))
    step = np.asarray(q.scales, np.float32)[np.arange(32) // 4]
    assert np.all(np.abs(back - x) <= 0.5 * step + 2**-8 * np.abs(x) + 1e-6)
    # Per-block scales matter: small-magnitude blocks are reconstructed far better than one scale allows.
    assert np.abs(back[4:] - x[4:]).max() < 0.5 * np.abs(x).max() / 127
