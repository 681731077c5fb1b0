"""Self-checks of the plain-NumPy Grok-1 reference (tests/numpy_reference.py)."""

from __future__ import annotations

import math
import time

import ml_dtypes
import numpy as np
import pytest

from grok.model.config import GrokConfig
from grok.model.quant import QuantizedWeight8bit

try:
    from tests.numpy_reference import (
        attention,
        bf16,
        dequantize,
        gelu_tanh,
        moe,
        reference_forward,
        rms_norm,
        rope,
    )
except ImportError:  # tests/ on sys.path instead of the repository root
    from numpy_reference import (  # type: ignore[no-redef]
        attention,
        bf16,
        dequantize,
        gelu_tanh,
        moe,
        reference_forward,
        rms_norm,
        rope,
    )


def tiny_config(**changes: object) -> GrokConfig:
    """The small test model: 4 experts, 2 selected, GQA with G = 2."""
    fields: dict[str, object] = dict(
        emb_size=64,
        key_size=16,
        num_q_heads=4,
        num_kv_heads=2,
        num_layers=2,
        vocab_size=256,
        widening_factor=2.0,
        attn_output_multiplier=1 / math.sqrt(16),
        num_experts=4,
        num_selected_experts=2,
        embedding_multiplier_scale=math.sqrt(64),
        output_multiplier_scale=1 / math.sqrt(3),
        pad_token=0,
        eos_token=2,
        sequence_len=64,
    )
    fields.update(changes)
    return GrokConfig(**fields)  # type: ignore[arg-type]


def random_quantized(rng: np.random.Generator, shape: tuple[int, ...], blocks: int, fan_in: int) -> QuantizedWeight8bit:
    """Random int8 weight with bf16 scales of size ~1/(127*sqrt(fan_in)) per column and row block."""
    *lead, n_in, n_out = shape
    weight = rng.integers(-127, 128, size=shape, dtype=np.int8)
    scales = rng.uniform(0.5, 1.5, size=(*lead, blocks, n_out)) / (127.0 * math.sqrt(fan_in / 3.0))
    return QuantizedWeight8bit(weight=weight, scales=scales.astype(ml_dtypes.bfloat16))


def random_params(config: GrokConfig, seed: int = 0) -> dict[str, dict[str, object]]:
    """A random parameter tree with the checkpoint's paths, shapes and storage types."""
    rng = np.random.default_rng(seed)
    D, V, E, F = config.emb_size, config.vocab_size, config.num_experts, config.ffn_size
    Hd, Kd = config.num_q_heads * config.key_size, config.num_kv_heads * config.key_size
    params: dict[str, dict[str, object]] = {
        "language_model/in_out_embed": {"embeddings": rng.normal(0, 0.1, (V, D)).astype(np.float32)},
        "language_model/rms_norm": {"scale": rng.uniform(0.5, 1.5, D).astype(np.float32)},
    }
    for i in range(config.num_layers):
        p = f"transformer/decoder_layer_{i}"
        params[f"{p}/multi_head_attention/query"] = {"w": random_quantized(rng, (D, Hd), 1, D)}
        params[f"{p}/multi_head_attention/key"] = {"w": random_quantized(rng, (D, Kd), 1, D)}
        params[f"{p}/multi_head_attention/value"] = {"w": random_quantized(rng, (D, Kd), 1, D)}
        params[f"{p}/multi_head_attention/linear"] = {"w": random_quantized(rng, (Hd, D), 8, Hd)}
        for norm in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"):
            params[f"{p}/{norm}"] = {"scale": rng.uniform(0.5, 1.5, D).astype(np.float32)}
        params[f"{p}/router"] = {"w": rng.normal(0, 1.0 / math.sqrt(D), (D, E)).astype(np.float32)}
        params[f"{p}/moe/linear"] = {"w": random_quantized(rng, (E, D, F), 1, D)}
        params[f"{p}/moe/linear_v"] = {"w": random_quantized(rng, (E, D, F), 1, D)}
        params[f"{p}/moe/linear_1"] = {"w": random_quantized(rng, (E, F, D), 8, F)}
    return params


def random_tokens(config: GrokConfig, batch: int = 2, length: int = 16, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, config.vocab_size, size=(batch, length)).astype(np.int32)


def is_bf16_exact(x: np.ndarray) -> bool:
    return bool(np.array_equal(bf16(x), x))


# ---------------------------------------------------------------- helpers


def test_bf16_rounds_to_nearest_even() -> None:
    # 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
    assert bf16(np.float32(1 + 2**-8)) == 1.0
    assert bf16(np.float32(1 + 3 * 2**-8)) == 1 + 2**-6
    assert bf16(np.float32(math.sqrt(64 * 96))) == 78.5  # Grok-1 embedding multiplier under jit
    assert bf16(np.float32(1 / math.sqrt(3))) == 0.578125


def test_gelu_tanh_known_values() -> None:
    x = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0], np.float32)
    expected = np.array([-0.00363752, -0.15880801, 0.0, 0.34571401, 0.84119199, 1.95459769])
    np.testing.assert_allclose(gelu_tanh(x), expected, rtol=1e-5, atol=1e-6)
    # It is the tanh approximation, not the erf GELU (erf gelu(1) = 0.841345).
    assert abs(float(gelu_tanh(np.float32(1.0))) - 0.841345) > 1e-4


def test_rms_norm_plain_scale_and_eps() -> None:
    x = np.array([[3.0, 4.0]], np.float32)
    scale = np.array([2.0, 0.5], np.float32)
    rms = math.sqrt((9 + 16) / 2 + 1e-5)
    expected = bf16(np.array([[3.0 / rms * 2.0, 4.0 / rms * 0.5]], np.float32))
    np.testing.assert_array_equal(rms_norm(x, scale), expected)
    # Epsilon matters for tiny inputs: a zero vector stays zero, a small one is damped.
    tiny = np.full((1, 4), 1e-3, np.float32)
    np.testing.assert_allclose(rms_norm(tiny, np.ones(4, np.float32)), 1e-3 / math.sqrt(1e-6 + 1e-5), rtol=1e-2)


def test_rope_position_zero_is_identity() -> None:
    rng = np.random.default_rng(0)
    x = bf16(rng.normal(size=(2, 1, 3, 8)))
    np.testing.assert_array_equal(rope(x, np.array([0])), x)


def test_rope_is_rotate_half() -> None:
    d = 4
    x = np.array([0.5, -1.25, 2.0, 0.75], np.float32)
    for p in (1, 3, 17):
        out = rope(x.reshape(1, 1, 1, d), np.array([p]))[0, 0, 0]
        expected = np.empty(d)
        for i in range(d // 2):
            theta = p / 10000 ** (2 * i / d)
            a, b = float(x[i]), float(x[i + d // 2])  # pairs (x[i], x[i + d/2]), not (x[2i], x[2i+1])
            expected[i] = a * math.cos(theta) - b * math.sin(theta)
            expected[i + d // 2] = b * math.cos(theta) + a * math.sin(theta)
        np.testing.assert_allclose(out, expected, rtol=2**-7, atol=1e-6)
        assert is_bf16_exact(out)


def test_rope_batched_positions_match_shared_positions() -> None:
    rng = np.random.default_rng(1)
    x = bf16(rng.normal(size=(2, 5, 3, 8)))
    shared = rope(x, np.arange(5))
    batched = rope(x, np.tile(np.arange(5), (2, 1)))
    np.testing.assert_array_equal(shared, batched)
    # A relative-position property: <rope(q, p), rope(k, p)> is independent of p (up to bf16).
    q, k = x[0, 0, 0], x[0, 1, 0]
    dots = [
        float(rope(q.reshape(1, 1, 1, 8), np.array([p]))[0, 0, 0] @ rope(k.reshape(1, 1, 1, 8), np.array([p]))[0, 0, 0])
        for p in (0, 5, 40)
    ]
    np.testing.assert_allclose(dots, dots[0], rtol=0.05, atol=0.05)


def test_dequantize_eight_row_blocks() -> None:
    rng = np.random.default_rng(2)
    n_in, n_out = 16, 3
    weight = rng.integers(-127, 128, size=(n_in, n_out), dtype=np.int8)
    scales = (2.0 ** np.arange(8 * n_out).reshape(8, n_out) / 1024).astype(ml_dtypes.bfloat16)
    value = dequantize(QuantizedWeight8bit(weight=weight, scales=scales))
    assert value.shape == (n_in, n_out) and value.dtype == np.float32
    rows = n_in // 8
    for b in range(8):
        block = slice(b * rows, (b + 1) * rows)
        np.testing.assert_array_equal(value[block], weight[block].astype(np.float32) * scales[b].astype(np.float32))


def test_dequantize_stacked_and_rounds_product_to_bf16() -> None:
    rng = np.random.default_rng(3)
    weight = rng.integers(-127, 128, size=(3, 8, 5), dtype=np.int8)
    scales = rng.uniform(0.01, 0.02, size=(3, 1, 5)).astype(ml_dtypes.bfloat16)
    value = dequantize(QuantizedWeight8bit(weight=weight, scales=scales))
    exact = weight.astype(np.float64) * scales.astype(np.float64)
    np.testing.assert_array_equal(value, bf16(exact))
    assert is_bf16_exact(value)
    # Two-block stacked scales: expert e, block b.
    scales2 = rng.uniform(0.01, 0.02, size=(3, 2, 5)).astype(ml_dtypes.bfloat16)
    value2 = dequantize(QuantizedWeight8bit(weight=weight, scales=scales2))
    np.testing.assert_array_equal(value2[1, 4:], bf16(weight[1, 4:].astype(np.float64) * scales2[1, 1].astype(np.float64)))
    with pytest.raises(ValueError):
        dequantize(QuantizedWeight8bit(weight=weight, scales=rng.uniform(size=(3, 3, 5)).astype(ml_dtypes.bfloat16)))


# ---------------------------------------------------------------- blocks


def test_attention_grouped_query_matches_per_head_loop() -> None:
    """Query head h must use kv head h // G; checked against an explicit per-head loop."""
    config = tiny_config()
    params = random_params(config)
    layer = {n: params[f"transformer/decoder_layer_0/multi_head_attention/{n}"] for n in ("query", "key", "value", "linear")}
    tokens = random_tokens(config, batch=2, length=6)
    tokens[1, 2] = config.pad_token
    rng = np.random.default_rng(4)
    x = bf16(rng.normal(size=(2, 6, config.emb_size)))
    got = attention(x, layer, config, tokens)

    H, K, d = config.num_q_heads, config.num_kv_heads, config.key_size
    G = H // K
    wq, wk, wv, wo = (dequantize(layer[n]["w"]) for n in ("query", "key", "value", "linear"))
    q = rope(bf16(x @ wq).reshape(2, 6, H, d), np.arange(6))
    k = rope(bf16(x @ wk).reshape(2, 6, K, d), np.arange(6))
    v = bf16(x @ wv).reshape(2, 6, K, d)
    heads = np.zeros((2, 6, H, d), np.float32)
    for b in range(2):
        for h in range(H):
            kv = h // G
            s = bf16(q[b, :, h] @ k[b, :, kv].T) * np.float32(config.attn_output_multiplier)
            s = 30 * np.tanh(s / 30)
            allowed = np.tril(np.ones((6, 6), bool)) & (tokens[b] > config.pad_token)[None, :]
            s = np.where(allowed, s, -1e30)
            p = np.exp(s - s.max(-1, keepdims=True))
            p = bf16(p / p.sum(-1, keepdims=True))
            heads[b, :, h] = bf16(p @ v[b, :, kv])
    expected = bf16(heads.reshape(2, 6, H * d) @ wo)
    np.testing.assert_allclose(got, expected, atol=1e-2 * float(np.abs(expected).max()))


def test_moe_gates_are_raw_probabilities() -> None:
    """With identical experts the output is (sum of the top-k bf16 gates) * expert output (< 1x)."""
    config = tiny_config(num_experts=5, num_selected_experts=3)
    rng = np.random.default_rng(5)
    D, F, E = config.emb_size, config.ffn_size, config.num_experts
    one = {
        "linear": random_quantized(rng, (1, D, F), 1, D),
        "linear_v": random_quantized(rng, (1, D, F), 1, D),
        "linear_1": random_quantized(rng, (1, F, D), 8, F),
    }
    experts = {
        n: QuantizedWeight8bit(weight=np.repeat(w.weight, E, 0), scales=np.repeat(w.scales, E, 0)) for n, w in one.items()
    }
    router = rng.normal(0, 1 / math.sqrt(D), (D, E)).astype(np.float32)
    x = bf16(rng.normal(size=(2, 3, D)))
    got = moe(x, router, experts, config)

    w_in, w_v, w_out = (dequantize(one[n])[0] for n in ("linear", "linear_v", "linear_1"))
    y = (gelu_tanh(bf16(x @ w_in)) * bf16(x @ w_v)) @ w_out
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    gate_sum = bf16(np.sort(probs, -1)[..., ::-1][..., :3]).sum(-1, keepdims=True)
    assert (gate_sum < 0.999).all()
    np.testing.assert_allclose(got, bf16(gate_sum * y), rtol=2e-2, atol=1e-2 * float(np.abs(y).max()))


def test_moe_selects_top_k_experts() -> None:
    """Zeroing an unselected expert changes nothing; zeroing a selected one does."""
    config = tiny_config()
    params = random_params(config)
    p = "transformer/decoder_layer_0"
    experts = {n: params[f"{p}/moe/{n}"]["w"] for n in ("linear", "linear_v", "linear_1")}
    router = np.zeros((config.emb_size, config.num_experts), np.float32)
    router[:, 2] = 1.0 / config.emb_size  # with x > 0 everywhere, experts 2 then 0 (tie-break by index) are chosen
    x = bf16(np.abs(np.random.default_rng(6).normal(size=(1, 4, config.emb_size))) + 0.1)
    base = moe(x, router, experts, config)

    def without(e: int) -> np.ndarray:
        w = experts["linear_1"]
        weight = w.weight.copy()
        weight[e] = 0
        changed = dict(experts, linear_1=QuantizedWeight8bit(weight=weight, scales=w.scales))
        return moe(x, router, changed, config)

    np.testing.assert_array_equal(without(3), base)
    np.testing.assert_array_equal(without(1), base)
    assert not np.array_equal(without(2), base)
    assert not np.array_equal(without(0), base)


# ---------------------------------------------------------------- full model


def test_forward_shapes_dtypes_and_bf16_values() -> None:
    config = tiny_config()
    params = random_params(config)
    tokens = random_tokens(config)
    start = time.perf_counter()
    logits, hidden = reference_forward(params, config, tokens)
    assert time.perf_counter() - start < 1.0
    assert logits.shape == (2, 16, config.vocab_size) and logits.dtype == np.float32
    assert len(hidden) == config.num_layers
    for h in hidden:
        assert h.shape == (2, 16, config.emb_size) and h.dtype == np.float32
        assert is_bf16_exact(h) and np.isfinite(h).all()
    assert is_bf16_exact(logits) and np.isfinite(logits).all()
    assert logits.std() > 1e-3  # not degenerate


def test_forward_is_causal() -> None:
    config = tiny_config()
    params = random_params(config)
    tokens = random_tokens(config)
    logits, hidden = reference_forward(params, config, tokens)
    changed = tokens.copy()
    changed[:, 10] = (changed[:, 10] + 7) % (config.vocab_size - 1) + 1
    logits2, hidden2 = reference_forward(params, config, changed)
    np.testing.assert_array_equal(logits2[:, :10], logits[:, :10])
    for h, h2 in zip(hidden, hidden2):
        np.testing.assert_array_equal(h2[:, :10], h[:, :10])
    assert not np.array_equal(logits2[:, 10:], logits[:, 10:])


def test_forward_pad_keys_are_ignored() -> None:
    """The pad token's embedding cannot influence other positions: pad keys are masked."""
    config = tiny_config()
    params = random_params(config)
    tokens = random_tokens(config)
    tokens[0, 4] = config.pad_token
    _, hidden = reference_forward(params, config, tokens)
    emb = params["language_model/in_out_embed"]["embeddings"].copy()
    emb[config.pad_token] = np.random.default_rng(7).normal(0, 1, config.emb_size)
    _, hidden2 = reference_forward(dict(params, **{"language_model/in_out_embed": {"embeddings": emb}}), config, tokens)
    keep = np.ones(16, bool)
    keep[4] = False
    for h, h2 in zip(hidden, hidden2):
        np.testing.assert_array_equal(h2[0, keep], h[0, keep])
        np.testing.assert_array_equal(h2[1], h[1])
        assert not np.array_equal(h2[0, 4], h[0, 4])  # the pad query itself is computed normally


def test_forward_float_weights_equal_their_quantized_values() -> None:
    """A plain float "w" is used as its bf16 value: passing dequantized weights changes nothing."""
    config = tiny_config()
    params = random_params(config)
    tokens = random_tokens(config)
    logits, _ = reference_forward(params, config, tokens)
    as_float = {
        path: {name: dequantize(v) if isinstance(v, QuantizedWeight8bit) else v for name, v in leaves.items()}
        for path, leaves in params.items()
    }
    logits2, _ = reference_forward(as_float, config, tokens)
    np.testing.assert_array_equal(logits2, logits)


def test_forward_batch_rows_are_independent() -> None:
    config = tiny_config()
    params = random_params(config)
    tokens = random_tokens(config)
    logits, _ = reference_forward(params, config, tokens)
    single, _ = reference_forward(params, config, tokens[1:])
    np.testing.assert_allclose(single[0], logits[1], atol=1e-2 * float(np.abs(logits).max()))
