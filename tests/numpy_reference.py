"""Independent plain-NumPy reference of the Grok-1 forward pass (a test oracle).

Written from /work/shared/GROK1.md only. Everything is computed in float32 NumPy and every bf16
rounding the spec lists is applied explicitly with `bf16`. Arrays returned hold bf16-exact
values stored as float32.

Grok-2's differences, written from its release's config.json and SGLang's model code (each a config
field; zero or absent keeps Grok-1's math): RoPE at `rope_base`; past `attn_temperature_len` a
query at position p multiplies its capped attention logits by log2(p) / log2(len); the router's
logits soft-capped at `router_softcap` before the softmax; a dense gated-GELU MLP of width
`residual_ffn_size` beside the MoE, the two added and divided by sqrt(2); an untied output table;
the final logits soft-capped at `output_softcap` after the output multiplier.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

if TYPE_CHECKING:  # only for annotations; the reference duck-types quantized weights
    from grok.model.config import GrokConfig
    from grok.model.quant import QuantizedWeight8bit

RMS_NORM_EPS = 1e-5
ROPE_BASE = 10000.0
SOFTCAP = 30.0
MASKED_LOGIT = -1e30


def bf16(x: Any) -> np.ndarray:
    """Round to bfloat16 (round-to-nearest-even) and return the values as float32."""
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def bf16_scalar(c: float) -> np.float32:
    """A Python constant as JAX's weak typing makes it when multiplied into bf16 activations."""
    return np.float32(bf16(np.float32(c)))


def bf16_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A bf16 matmul: both inputs rounded to bf16, f32 accumulation, output rounded to bf16."""
    return bf16(np.matmul(bf16(x), bf16(w)))


def _is_quantized(w: Any) -> bool:
    return hasattr(w, "weight") and hasattr(w, "scales")


def dequantize(w: QuantizedWeight8bit | Any) -> np.ndarray:
    """Value of an 8-bit weight: bf16(bf16(int8) * bf16(scales)), scales broadcast in row blocks.

    `weight` is [..., in, out]; `scales` is [..., nb, out]; input row block b (rows
    b*in/nb .. (b+1)*in/nb - 1) uses scales[..., b, :]. Returns float32 holding bf16 values.
    """
    weight = np.asarray(w.weight)
    scales = np.asarray(w.scales)
    *lead, n_in, n_out = weight.shape
    nb = scales.shape[-2]
    if n_in % nb:
        raise ValueError(f"input size {n_in} not divisible into {nb} scale blocks")
    if scales.shape[-1] != n_out or tuple(scales.shape[:-2]) != tuple(lead):
        raise ValueError(f"scales shape {scales.shape} does not fit weight shape {weight.shape}")
    blocks = bf16(weight.astype(np.float32)).reshape(*lead, nb, n_in // nb, n_out)
    value = bf16(blocks * bf16(scales.astype(np.float32))[..., :, None, :])
    return value.reshape(*lead, n_in, n_out)


def weight_value(w: QuantizedWeight8bit | np.ndarray | Any) -> np.ndarray:
    """A matmul weight as bf16-valued float32: dequantized if 8-bit, else rounded to bf16."""
    if _is_quantized(w):
        return dequantize(w)
    return bf16(np.asarray(w, dtype=np.float32))


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float = RMS_NORM_EPS) -> np.ndarray:
    """RMSNorm in f32 over the last axis, times the plain `scale`, rounded to bf16."""
    x = np.asarray(x, dtype=np.float32)
    mean_sq = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    normed = x * (np.float32(1.0) / np.sqrt(mean_sq + np.float32(eps)))
    return bf16(normed * np.asarray(scale, dtype=np.float32))


def rope(x: np.ndarray, positions: np.ndarray, base: float = ROPE_BASE) -> np.ndarray:
    """Rotate-half rotary embedding in f32, result rounded to bf16.

    x: [..., T, N, d] (N heads); positions: [T] or [..., T] absolute positions.
    out = x*cos(phase) + rotate_half(x)*sin(phase), rotate_half([x1, x2]) = [-x2, x1] (halves).
    """
    x = np.asarray(x, dtype=np.float32)
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary head size must be even, got {d}")
    exponents = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)
    pos = np.asarray(positions).astype(np.float32)
    phase = pos[..., None] * inv_freq  # [..., T, d/2]
    phase = np.concatenate([phase, phase], axis=-1)[..., None, :]  # [..., T, 1, d]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = np.concatenate([-x2, x1], axis=-1)
    return bf16(x * np.cos(phase) + rotated * np.sin(phase))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation: 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3))), in f32."""
    x = np.asarray(x, dtype=np.float32)
    c = np.float32(math.sqrt(2.0 / math.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x**3)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable float32 softmax."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(np.float32)


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap) in float32; cap 0 leaves x as it is."""
    x = np.asarray(x, np.float32)
    return np.float32(cap) * np.tanh(x / np.float32(cap)) if cap else x


def attention(
    x: np.ndarray, layer: dict[str, dict[str, Any]], config: GrokConfig, tokens: np.ndarray
) -> np.ndarray:
    """Grouped-query attention block on normed input x [B,T,D] (no cache); returns bf16 [B,T,D].

    `layer` maps the sub-paths "query", "key", "value", "linear" to {"w": ...}.
    """
    B, T, _ = x.shape
    H, K, d = config.num_q_heads, config.num_kv_heads, config.key_size
    G = H // K
    q = bf16_matmul(x, weight_value(layer["query"]["w"])).reshape(B, T, H, d)
    k = bf16_matmul(x, weight_value(layer["key"]["w"])).reshape(B, T, K, d)
    v = bf16_matmul(x, weight_value(layer["value"]["w"])).reshape(B, T, K, d)
    positions = np.arange(T)
    base = getattr(config, "rope_base", ROPE_BASE)
    q = rope(q, positions, base).reshape(B, T, K, G, d)  # query head h -> kv head h // G
    k = rope(k, positions, base)

    logits = bf16(np.einsum("btkgd,bskd->bkgts", q, k))  # bf16 einsum
    logits = logits * np.float32(config.attn_output_multiplier)
    logits = np.float32(SOFTCAP) * np.tanh(logits / np.float32(SOFTCAP))
    length = getattr(config, "attn_temperature_len", 0)
    if length:  # Grok-2: sharper attention past the training length, per query position
        scale = np.ones(T, np.float32)
        far = positions > length
        scale[far] = np.log2(positions[far].astype(np.float32)) / np.float32(np.log2(length))
        logits = logits * scale[None, None, None, :, None]

    causal = np.tril(np.ones((T, T), dtype=bool))  # [t, s]: s <= t
    key_ok = np.asarray(tokens) > config.pad_token  # [B, S]
    mask = causal[None, None, None, :, :] & key_ok[:, None, None, None, :]
    logits = np.where(mask, logits, np.float32(MASKED_LOGIT)).astype(np.float32)
    probs = bf16(softmax(logits, axis=-1))

    out = bf16(np.einsum("bkgts,bskd->btkgd", probs, v)).reshape(B, T, H * d)
    return bf16_matmul(out, weight_value(layer["linear"]["w"]))


def moe(x: np.ndarray, router_w: np.ndarray, experts: dict[str, Any], config: GrokConfig) -> np.ndarray:
    """Top-k mixture of gated-GELU experts on normed input x [..., D]; returns bf16 [..., D].

    `experts` maps "linear", "linear_v" ([E, D, F]) and "linear_1" ([E, F, D]) to weights.
    Gates are the raw (not renormalized) router probabilities of the selected experts.
    """
    lead = x.shape[:-1]
    xs = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])  # [N, D]
    E, k = config.num_experts, config.num_selected_experts
    router = np.asarray(router_w, dtype=np.float32)
    if router.shape[-1] != E:
        raise ValueError(f"router has {router.shape[-1]} experts, config says {E}")
    probs = softmax(softcap(xs @ router, getattr(config, "router_softcap", 0.0)), axis=-1)  # [N, E], f32
    # Top-k by probability; stable sort so ties go to the lower expert index.
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # [N, k]
    gates = np.take_along_axis(probs, top, axis=-1)  # [N, k]

    w_in = weight_value(experts["linear"])
    w_gate = weight_value(experts["linear_v"])
    w_out = weight_value(experts["linear_1"])
    out = np.zeros_like(xs)
    for rank in range(k):
        for e in range(E):
            rows = np.nonzero(top[:, rank] == e)[0]
            if rows.size == 0:
                continue
            xe = xs[rows]
            a = bf16_matmul(xe, w_in[e])
            b = bf16_matmul(xe, w_gate[e])
            y = np.matmul(gelu_tanh(a) * b, w_out[e])  # f32 from here on
            out[rows] += bf16(gates[rows, rank])[:, None] * y
    return bf16(out).reshape(*lead, x.shape[-1])


def reference_forward(
    params: dict[str, dict[str, object]], config: GrokConfig, tokens: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Full forward pass (positions 0..T-1, no cache) of tokens [B, T].

    Returns (logits [B, T, V] float32 holding bf16 values, [h after each decoder layer] as
    float32 [B, T, D] holding bf16 values).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    embeddings = np.asarray(params["language_model/in_out_embed"]["embeddings"], dtype=np.float32)
    emb_bf16 = bf16(embeddings)

    h = bf16(emb_bf16[tokens] * bf16_scalar(config.embedding_multiplier_scale))
    hidden: list[np.ndarray] = []
    for i in range(config.num_layers):
        prefix = f"transformer/decoder_layer_{i}"
        mha = {
            name: params[f"{prefix}/multi_head_attention/{name}"]
            for name in ("query", "key", "value", "linear")
        }
        norm = lambda name: params[f"{prefix}/{name}"]["scale"]  # noqa: E731

        attn = attention(rms_norm(h, norm("rms_norm")), mha, config, tokens)
        h = bf16(h + rms_norm(attn, norm("rms_norm_1")))

        experts = {name: params[f"{prefix}/moe/{name}"]["w"] for name in ("linear", "linear_v", "linear_1")}
        x = rms_norm(h, norm("rms_norm_2"))
        ffn = moe(x, params[f"{prefix}/router"]["w"], experts, config)
        if getattr(config, "residual_ffn_size", 0):  # Grok-2's dense MLP beside the experts
            mlp = {name: weight_value(params[f"{prefix}/dense_mlp/{name}"]["w"]) for name in ("linear", "linear_v", "linear_1")}
            gated = gelu_tanh(bf16_matmul(x, mlp["linear"])) * bf16_matmul(x, mlp["linear_v"])
            dense = bf16_matmul(bf16(gated), mlp["linear_1"])
            ffn = bf16((dense + ffn) * np.float32(1 / math.sqrt(2)))
        h = bf16(h + rms_norm(ffn, norm("rms_norm_3")))
        hidden.append(h)

    h = rms_norm(h, params["language_model/rms_norm"]["scale"])
    table = emb_bf16
    if not getattr(config, "tie_embeddings", True):
        table = bf16(np.asarray(params["language_model/in_out_embed"]["unembeddings"], np.float32))
    logits = bf16_matmul(h, table.T)
    logits = bf16(logits * bf16_scalar(config.output_multiplier_scale))
    logits = bf16(softcap(logits, getattr(config, "output_softcap", 0.0)))
    return logits.astype(np.float32), hidden
