"""The real Grok-1 configuration, checked abstractly: no weight of it is ever allocated.

Shapes come from `grok.model.weights.model_shapes` (ShapeDtypeStructs), shardings from the shipped
partition rules, and the decode step is lowered and compiled ahead of time for the reference
(data=1, model=8) mesh of virtual CPU devices. Every byte count asserted here is derived by hand
from the parameter table in GROK1.md and written out as a literal, with its derivation.

Run with `-s` to see the compile times (printed, never asserted).
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from grok.model import transformer
from grok.model.config import PRESETS
from grok.model.quant import QuantizedWeight8bit
from grok.model.weights import model_shapes
from grok.parallel.sharding import Sharder, load_rules, make_mesh
from grok.planning.aot import compile_decode

GROK1 = PRESETS["grok-1"]
SHIPPED_RULES = ("tensor_parallel", "expert_parallel", "replicated")
MESH = (1, 8)  # (data, model): the reference mesh

# Abstract decode inputs for the compile tests: 4 sequences (divisible by data=1; not 8, so that a
# [B, D] activation is told apart from [E, D]-shaped arrays in the HLO) and a modest cache length,
# which changes the cache bytes but nothing structural in the program.
DECODE_BATCH = 4
DECODE_CACHE_LEN = 1024

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs the 8 virtual CPU devices set up by tests/conftest.py"
)

# ---------------------------------------------------------------------------------------------
# Hand-derived sizes (GROK1.md "Parameter tree"; int8 = 1 byte, bf16 = 2, fp32 = 4).
# ---------------------------------------------------------------------------------------------

# Whole model, one copy (what `replicated` puts on every device). Per decoder layer:
#   attention query   int8 [6144, 6144] = 6144 * 6144           =    37_748_736
#                     bf16 scales [1, 6144] = 6144 * 2           =        12_288
#   attention key     int8 [6144, 1024] = 6144 * 1024           =     6_291_456
#                     bf16 scales [1, 1024] = 1024 * 2           =         2_048
#   attention value   (as key: weight + scales)                  =     6_293_504
#   attention linear  int8 [6144, 6144]                          =    37_748_736
#                     bf16 scales [8, 6144] = 8 * 6144 * 2       =        98_304
#   moe linear        int8 [8, 6144, 32768] = 8 * 6144 * 32768  = 1_610_612_736
#                     bf16 scales [8, 1, 32768] = 8 * 32768 * 2  =       524_288
#   moe linear_v      (as moe linear: weight + scales)           = 1_611_137_024
#   moe linear_1      int8 [8, 32768, 6144]                      = 1_610_612_736
#                     bf16 scales [8, 8, 6144] = 64 * 6144 * 2   =       786_432
#   rms_norm, _1, _2, _3  fp32 [6144] each = 4 * 6144 * 4        =        98_304
#   router            fp32 [6144, 8] = 6144 * 8 * 4              =       196_608
#   sum: int8 4_919_918_592 + scales 1_949_696 + fp32 294_912    = 4_922_163_200 per layer
# Outside the layers: embeddings fp32 [131072, 6144] = 3_221_225_472, final rms_norm fp32 [6144]
# = 24_576, together 3_221_250_048.
# Total: 64 * 4_922_163_200 + 3_221_250_048 = 315_018_444_800 + 3_221_250_048
#      = 318_239_694_848 bytes (the spec's "about 318 GB").
FULL_LAYER_BYTES = 4_922_163_200
FULL_MODEL_BYTES = 318_239_694_848

# Per device under tensor_parallel on (data=1, model=8). Per decoder layer:
#   query  int8 [6144, 6144] columns split 8 ways -> [6144, 768] = 6144 * 768    =   4_718_592
#          scales [1, 6144] columns split          -> [1, 768] = 768 * 2           =       1_536
#   key    int8 [6144, 1024] columns split         -> [6144, 128] = 6144 * 128     =     786_432
#          scales [1, 1024] columns split          -> [1, 128] = 128 * 2           =         256
#   value  (as key: weight + scales)                                                =     786_688
#   linear int8 [6144, 6144] rows split            -> [768, 6144] = 768 * 6144     =   4_718_592
#          scales [8, 6144]: the 8 row blocks split with the rows -> [1, 6144] * 2 =      12_288
#          (attention: 11_010_048 int8 + 14_336 scales = 11_024_384)
#   moe linear   int8 [8, 6144, 32768] F split     -> [8, 6144, 4096] = 201_326_592
#                scales [8, 1, 32768] F split      -> [8, 1, 4096] = 8 * 4096 * 2  =      65_536
#   moe linear_v (as moe linear: weight + scales)                                   = 201_392_128
#   moe linear_1 int8 [8, 32768, 6144] F split     -> [8, 4096, 6144] = 201_326_592
#                scales [8, 8, 6144]: blocks split -> [8, 1, 6144] = 8 * 6144 * 2  =      98_304
#          (moe: 603_979_776 int8 + 229_376 scales = 604_209_152)
#   4 rms norms fp32 [6144], replicated = 98_304; router fp32 [6144, 8], replicated = 196_608
#   layer: 11_024_384 + 604_209_152 + 294_912                                      = 615_528_448
# Outside the layers: embeddings fp32 [131072, 6144] split on D (["-", "model"]) -> [131072, 768]
# = 131072 * 768 * 4 = 402_653_184; final rms_norm replicated = 24_576; together 402_677_760.
# Total: 64 * 615_528_448 + 402_677_760 = 39_393_820_672 + 402_677_760 = 39_796_498_432 bytes.
TP_LAYER_BYTES = 615_528_448
TP_DEVICE_BYTES = 39_796_498_432

# Per device under expert_parallel on (data=1, model=8). Attention is split exactly as above
# (11_024_384 per layer). Experts are split on E, one whole expert per device:
#   moe linear   int8 [8, 6144, 32768] -> [1, 6144, 32768] = 201_326_592
#                scales [8, 1, 32768] -> [1, 1, 32768] = 32768 * 2 = 65_536
#   moe linear_v (as moe linear: 201_326_592 + 65_536)
#   moe linear_1 int8 [8, 32768, 6144] -> [1, 32768, 6144] = 201_326_592
#                scales [8, 8, 6144] -> [1, 8, 6144] (row blocks not split) = 8 * 6144 * 2 = 98_304
#   norms and router replicated = 294_912
#   layer: 11_024_384 + 604_209_152 + 294_912 = 615_528_448, the same as tensor_parallel (every
#   large matrix is cut 8 ways in both layouts; only the cut differs).
# Outside the layers: as tensor_parallel (embeddings split on D), 402_677_760.
# Total: 64 * 615_528_448 + 402_677_760 = 39_796_498_432 bytes.
EP_LAYER_BYTES = 615_528_448
EP_DEVICE_BYTES = 39_796_498_432

# KV cache, tensor_parallel on (1, 8), one sequence at the full 8,192-token context: per layer the
# keys are [B, K, S, d] = [1, 8, 8192, 128] bf16 with kv heads split over `model` -> [1, 1, 8192,
# 128] = 8192 * 128 * 2 = 2_097_152 bytes per device; values the same. Over 64 layers:
#   keys 64 * 2_097_152 = 134_217_728 (128 MiB), values 134_217_728, together 268_435_456
#   bytes = 256 MiB per device per sequence.
KV_LAYER_BYTES_PER_DEVICE = 2_097_152
KV_BYTES_PER_DEVICE = 268_435_456

# The smallest whole weight matrix of the model: key (or value) int8 [6144, 1024] = 6 MiB.
SMALLEST_WEIGHT_BYTES = 6_291_456


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@functools.cache
def sharder(rules: str) -> Sharder:
    return Sharder(load_rules(rules), make_mesh(*MESH))


@functools.cache
def grok1_shapes(num_layers: int = GROK1.num_layers):
    return model_shapes(GROK1.replace(num_layers=num_layers))


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def per_device_bytes(shapes, shardings) -> int:
    """Bytes one device holds: each leaf's shard shape times its itemsize (both arrays of 8-bit weights)."""
    sizes = jax.tree.map(lambda s, sh: nbytes(sh.shard_shape(s.shape), s.dtype), shapes, shardings)
    return sum(jax.tree.leaves(sizes))


def distinct_shard_bytes(shapes, shardings) -> int:
    """Bytes of the distinct shards over all devices: a replicated leaf counts once."""

    def leaf(s, sh) -> int:
        blocks = {
            tuple((i.start, i.stop) for i in index)
            for index in sh.devices_indices_map(s.shape).values()
        }
        total = 0
        for block in blocks:
            dims = [(stop if stop is not None else n) - (start or 0) for (start, stop), n in zip(block, s.shape)]
            total += nbytes(dims, s.dtype)
        return total

    return sum(jax.tree.leaves(jax.tree.map(leaf, shapes, shardings)))


def layer_param_bytes(shapes, shardings) -> int:
    """Per-device bytes of one decoder layer (the stacked layer axis divided out)."""
    layers = {p: v for p, v in shapes.items() if p.startswith("transformer/decoder_layer/")}
    layer_shardings = {p: shardings[p] for p in layers}
    return per_device_bytes(layers, layer_shardings) // GROK1.num_layers


@functools.cache
def compiled_decode(rules: str, num_layers: int):
    """AOT-compiled decode step (`grok.serving.api` feeds one token per row), memory donated as in the API.

    Returns (compiled, compile seconds, the abstract memory it was compiled for).
    """
    s = sharder(rules)
    config = GROK1.replace(num_layers=num_layers)
    compiled, memory, lower_s, compile_s = compile_decode(config, s, DECODE_BATCH, DECODE_CACHE_LEN)
    print(
        f"\n[grok-1 decode, {rules}, {num_layers} layers, mesh {MESH}] "
        f"lower {lower_s:.2f} s, compile {compile_s:.2f} s"
    )
    return compiled, compile_s, memory


# An HLO instruction: `%name = <result type> opcode(operands...)`; the result may be a tuple.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+([a-z][a-z0-9-]*)\(", re.MULTILINE)
_ARRAY_TYPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def hlo_instructions(text: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """(opcode, [(element type, shape), ...]) for every instruction of an HLO module's text."""
    out = []
    for result, opcode in _INSTRUCTION.findall(text):
        arrays = [
            (dtype, tuple(int(n) for n in dims.split(",") if n)) for dtype, dims in _ARRAY_TYPE.findall(result)
        ]
        out.append((opcode, arrays))
    return out


_HLO_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                 "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def hlo_bytes(array: tuple[str, tuple[int, ...]]) -> int:
    dtype, shape = array
    return math.prod(shape) * _HLO_ITEMSIZE[dtype]


COUNTED_OPS = (
    "dot",
    "convolution",
    "all-reduce",
    "all-reduce-start",
    "all-gather",
    "all-gather-start",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "while",
    "custom-call",
)


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")


def hlo_computations(text: str) -> dict[str, str]:
    """Computation name -> its body text, for an HLO module's text."""
    out, name, lines = {}, None, []
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header and name is None:
            name, lines = header.group(1), []
        elif line.strip() == "}" and name is not None:
            out[name], name = "\n".join(lines), None
        elif name is not None:
            lines.append(line)
    return out


def loop_body_instructions(text: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """The instructions of every while loop's body (for a layer scan: what runs once per layer)."""
    computations = hlo_computations(text)
    bodies = set(re.findall(r"\bbody=%([^\s,)]+)", text))
    assert bodies, "no while loop in the program"
    return [inst for body in sorted(bodies) for inst in hlo_instructions(computations[body])]


def op_counts(text: str) -> dict[str, int]:
    counts = dict.fromkeys(COUNTED_OPS, 0)
    for opcode, _ in hlo_instructions(text):
        if opcode in counts:
            counts[opcode] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# 1. Every shipped rules file covers the real model on the reference mesh.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rules", SHIPPED_RULES)
def test_every_grok1_parameter_is_matched_on_the_reference_mesh(rules):
    shapes = grok1_shapes()
    shardings = sharder(rules).param_shardings(shapes)  # raises on an unmatched parameter
    assert jax.tree.structure(shardings) == jax.tree.structure(shapes)
    for sh in jax.tree.leaves(shardings):
        assert isinstance(sh, NamedSharding) and sh.mesh.shape == {"data": 1, "model": 8}


# ---------------------------------------------------------------------------------------------
# 2. Parameter bytes per device, against the hand-derived numbers above.
# ---------------------------------------------------------------------------------------------


def test_model_shapes_add_up_to_the_released_size():
    shapes = grok1_shapes()
    whole = sum(nbytes(s.shape, s.dtype) for s in jax.tree.leaves(shapes))
    assert whole == FULL_MODEL_BYTES
    quantized = [
        leaf for leaves in shapes.values() for leaf in leaves.values() if isinstance(leaf, QuantizedWeight8bit)
    ]
    assert len(quantized) == 7  # query, key, value, linear, moe linear, linear_v, linear_1


@pytest.mark.parametrize(
    "rules, layer_bytes, device_bytes",
    [
        ("tensor_parallel", TP_LAYER_BYTES, TP_DEVICE_BYTES),
        ("expert_parallel", EP_LAYER_BYTES, EP_DEVICE_BYTES),
        ("replicated", FULL_LAYER_BYTES, FULL_MODEL_BYTES),
    ],
    ids=["tensor_parallel", "expert_parallel", "replicated"],
)
def test_parameter_bytes_per_device(rules, layer_bytes, device_bytes):
    shapes = grok1_shapes()
    shardings = sharder(rules).param_shardings(shapes)
    assert layer_param_bytes(shapes, shardings) == layer_bytes
    assert per_device_bytes(shapes, shardings) == device_bytes
    # Whatever the layout, the distinct shards together are exactly one copy of the model.
    assert distinct_shard_bytes(shapes, shardings) == FULL_MODEL_BYTES


def test_replicated_holds_the_whole_model_on_every_device():
    shapes = grok1_shapes()
    shardings = sharder("replicated").param_shardings(shapes)
    per_device = per_device_bytes(shapes, shardings)
    assert per_device == FULL_MODEL_BYTES
    assert per_device * 8 == 2_545_917_558_784  # 8 * 318_239_694_848 over the whole mesh


# ---------------------------------------------------------------------------------------------
# 3. KV-cache bytes for one sequence at the full context.
# ---------------------------------------------------------------------------------------------


def test_full_context_kv_cache_bytes_per_device():
    s = sharder("tensor_parallel")
    full_shape = transformer.cache_shape(GROK1, 1, GROK1.sequence_len)
    layer_shape = full_shape[1:]
    assert layer_shape == (1, 8, 8192, 128)  # [b, kv heads, positions, head size]
    per_layer = s.activation("kv_cache", layer_shape).shard_shape(layer_shape)
    assert per_layer == (1, 1, 8192, 128)
    assert nbytes(per_layer, jnp.bfloat16) == KV_LAYER_BYTES_PER_DEVICE

    # The engine's own cache constructor, compiled but never run: its output layout and size.
    compiled = jax.jit(lambda: s.zeros_cache(full_shape)).lower().compile()
    keys = nbytes(compiled.output_shardings.shard_shape(full_shape), jnp.bfloat16)
    assert 2 * keys == KV_BYTES_PER_DEVICE  # keys, then values of the same layout
    stats = compiled.memory_analysis()
    if stats is not None:
        assert 2 * stats.output_size_in_bytes == KV_BYTES_PER_DEVICE


# ---------------------------------------------------------------------------------------------
# 4. The real decode step compiles ahead of time on the reference mesh.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rules, expected_params",
    [("tensor_parallel", TP_DEVICE_BYTES), ("expert_parallel", EP_DEVICE_BYTES)],
    ids=["tensor_parallel", "expert_parallel"],
)
def test_grok1_decode_step_compiles(rules, expected_params):
    compiled, _, memory = compiled_decode(rules, GROK1.num_layers)

    # The updated cache comes back laid out as it went in, so the next step needs no reshard.
    _, out_memory = compiled.output_shardings
    assert out_memory.k.is_equivalent_to(memory.k.sharding, 5)
    assert out_memory.v.is_equivalent_to(memory.v.sharding, 5)

    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    # Cache per device: [64, 4, 1024, 8, 128] bf16 with kv heads split 8 ways
    # = 64 * 4 * 1024 * 1 * 128 * 2 = 67_108_864 for keys, the same for values.
    cache = 2 * 67_108_864
    # The rest: tokens [4, 1] int32 = 16, mask [4, 1024] bool = 4_096, step [4] int32 = 16.
    small = 16 + 4_096 + 16
    # (Exact on CPU; the margin allows for a backend that pads its buffers.)
    assert abs(stats.argument_size_in_bytes - (expected_params + cache + small)) <= 64 * 1024
    # Donated memory: the new cache is written into the old one's buffers.
    if stats.alias_size_in_bytes:
        assert stats.alias_size_in_bytes >= cache


# ---------------------------------------------------------------------------------------------
# 5. The compiled program does not grow with depth (one loop over the layers).
# ---------------------------------------------------------------------------------------------


def test_decode_program_is_the_same_for_16_and_64_layers():
    shallow, shallow_seconds, _ = compiled_decode("tensor_parallel", 16)
    deep, deep_seconds, _ = compiled_decode("tensor_parallel", GROK1.num_layers)
    print(
        f"\n[grok-1 decode compile] 16 layers {shallow_seconds:.2f} s, 64 layers {deep_seconds:.2f} s, "
        f"ratio {deep_seconds / shallow_seconds:.2f}"
    )
    shallow_counts, deep_counts = op_counts(shallow.as_text()), op_counts(deep.as_text())
    print(f"[grok-1 decode HLO op counts] {deep_counts}")
    assert deep_counts == shallow_counts
    assert deep_counts["while"] >= 1
    # Unrolled layers would need at least one matmul per layer and weight: 64 layers * 7 weights.
    assert 0 < deep_counts["dot"] + deep_counts["convolution"] < 64


# ---------------------------------------------------------------------------------------------
# 6. The decode step never gathers a whole weight.
# ---------------------------------------------------------------------------------------------


def whole_weight_shapes() -> set[tuple[int, ...]]:
    """Unsharded shapes of every weight matrix: stacked, per layer, and per expert."""
    shapes = set()
    for path, leaves in grok1_shapes().items():
        for leaf in leaves.values():
            weight = leaf.weight if isinstance(leaf, QuantizedWeight8bit) else leaf
            shape = tuple(weight.shape)
            stacked = path.startswith("transformer/decoder_layer/")
            per_layer = shape[1:] if stacked else shape
            if len(per_layer) < 2:
                continue  # norm scales: vectors, replicated anyway
            shapes.add(shape)
            shapes.add(per_layer)
            if len(per_layer) == 3:  # one expert's matrix
                shapes.add(per_layer[1:])
    return shapes


def test_whole_weight_shapes_cover_the_big_matrices():
    shapes = whole_weight_shapes()
    for big in [(6144, 6144), (8, 6144, 32768), (8, 32768, 6144), (131072, 6144), (64, 6144, 6144)]:
        assert big in shapes


@pytest.mark.parametrize("rules", ["tensor_parallel", "expert_parallel"])
def test_decode_step_gathers_no_whole_weight(rules):
    compiled, _, _ = compiled_decode(rules, GROK1.num_layers)
    forbidden = whole_weight_shapes()
    gathers = [
        (dtype, shape)
        for opcode, arrays in hlo_instructions(compiled.as_text())
        if opcode in ("all-gather", "all-gather-start")
        for dtype, shape in arrays
    ]
    assert gathers, "expected a few small all-gathers (activations, scales) in the decode step"
    whole = [(dtype, shape) for dtype, shape in gathers if shape in forbidden]
    assert not whole, f"the decode step all-gathers whole weights: {whole}"
    # Nor any large part of one: every gathered array is smaller than the smallest weight matrix.
    biggest = max(gathers, key=hlo_bytes)
    assert hlo_bytes(biggest) < SMALLEST_WEIGHT_BYTES, f"the decode step all-gathers {biggest}"


# ---------------------------------------------------------------------------------------------
# Per-layer communication of tensor parallelism (a performance expectation, not correctness).
# ---------------------------------------------------------------------------------------------


def test_tensor_parallel_layer_communicates_two_activation_all_reduces():
    """Per layer, Megatron-style: one all-reduce of [B, T, D] after attention, one after the MoE.

    Nothing else activation-sized crosses devices inside the layer loop: the residual stream stays
    replicated, so it is never gathered, and the experts' partial sums are reduced after the gate
    weighting ([B, T, D]), not per expert ([E, B, T, D]).
    """
    compiled, _, _ = compiled_decode("tensor_parallel", GROK1.num_layers)
    row = DECODE_BATCH * GROK1.emb_size  # elements of one [B, 1, D] activation
    body = loop_body_instructions(compiled.as_text())
    reduced = [math.prod(shape) for op, arrays in body if op.startswith("all-reduce") for _, shape in arrays]
    gathered = [math.prod(shape) for op, arrays in body if op.startswith("all-gather") for _, shape in arrays]
    assert sorted(n for n in reduced if n >= row) == [row, row], f"all-reduce sizes per layer: {reduced}"
    assert row not in gathered, f"all-gather sizes per layer: {gathered}"
