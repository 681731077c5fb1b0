"""The engine's decode step as GPU and TPU compilers build it, with no device present
(`grok.planning.targets`): it reads each weight once. Skipped, with the reason, where the compilers
are not installed (`pip install -e '.[targets]'`; CI installs them).

The model has Grok-1's widths and experts but four layers (the layers run as a scan, so one layer's
program is every layer's; fewer, and a TPU could hold a whole weight stack in its on-chip memory)
and a small vocabulary, so it compiles in seconds; its expert shards are
Grok-1's, large enough that any copy of one stands out.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from grok import PRESETS
from grok.model.platform import tracing_for
from grok.parallel.sharding import Sharder, load_rules
from grok.planning import aot
from grok.planning.plan import make_plan
from grok.planning.roofline import DecodeRoofline, ideal_decode_bytes
from grok.planning.targets import TARGETS
from grok.planning.traffic import count_traffic

CONFIG = dataclasses.replace(PRESETS["grok-1"], num_layers=4, vocab_size=8192, sequence_len=1024)
CACHE_LEN = 1024
MAX_RATIO = 1.25
# name -> (target, rules, mesh)
LAYOUTS = {
    "h100-tp8": ("h100", "tensor_parallel", {"data": 1, "model": 8}),
    "h100-etp16": ("h100", "expert_tensor_parallel", {"data": 1, "expert": 2, "model": 8}),
    "tpu-v5e-etp32": ("tpu-v5e", "expert_tensor_parallel", {"data": 1, "expert": 4, "model": 8}),
}


def _needs(target_name: str):
    target = TARGETS[target_name]
    if not target.available():
        pytest.skip(f"{target.compiler} is not installed (pip install -e '.[targets]')")
    return target


def _sharder(layout: str) -> tuple:
    target_name, rules, shape = LAYOUTS[layout]
    target = _needs(target_name)
    loaded = load_rules(rules)
    return target, Sharder(loaded, target.mesh(shape, loaded.axes))


def _decode(layout: str, batch: int, platform: str | None = None) -> tuple:
    """(traffic, ideal bytes, the smallest expert weight shard in bytes) of the compiled decode step,
    traced for the target's platform (or `platform`, to trace it as another would)."""
    target, sharder = _sharder(layout)
    with tracing_for(platform or target.platform):
        step = aot.engine_steps(CONFIG, sharder, batch, CACHE_LEN, 16)["decode"]
    compiled = step.lowered.compile(compiler_options=target.compiler_options())
    params, memory = step.args[:2]
    ideal = ideal_decode_bytes(CONFIG, params, (memory.k, memory.v), batch)
    expert = jax.tree.leaves(params["transformer/decoder_layer/moe/linear"]["w"])[0]  # the int8 array
    shard = expert.sharding.shard_shape(expert.shape)  # [layers, experts, in, out] (GPUs: out, in) on one device
    return count_traffic(compiled.as_text()), ideal, math.prod(shard[2:])


@pytest.fixture(scope="module")
def decodes():
    """Each compiled once for the module: (layout, batch) -> `_decode`."""
    cache = {}

    def get(layout: str, batch: int):
        if (layout, batch) not in cache:
            cache[layout, batch] = _decode(layout, batch)
        return cache[layout, batch]

    return get


CASES = [("h100-tp8", 1), ("h100-tp8", 8), ("h100-etp16", 1), ("h100-etp16", 8), ("tpu-v5e-etp32", 1), ("tpu-v5e-etp32", 8)]


@pytest.mark.parametrize("layout,batch", CASES)
def test_decode_writes_no_weight_sized_intermediate(decodes, layout, batch):
    traffic, _, expert_shard = decodes(layout, batch)
    large = traffic.largest_writes(expert_shard)
    assert not large, "\n".join(f"{w.instruction} {w.type} {w.bytes >> 20} MiB x {w.runs}: {w.op_name}" for w in large)


@pytest.mark.parametrize("layout,batch", CASES)
def test_decode_moves_little_more_than_its_ideal_bytes(decodes, layout, batch):
    traffic, ideal, _ = decodes(layout, batch)
    ratio = traffic.bytes / sum(ideal.values())
    print(f"{layout} batch {batch}: {traffic.bytes / 2**30:.2f} GiB moved, {ratio:.3f}x the ideal")
    assert 0.99 < ratio <= MAX_RATIO


def test_the_checks_catch_the_old_decode_step():
    """Traced as for the CPU (8-bit weights dequantized to float32 copies before each product, the
    table converted each step) but compiled for the H100: both checks fail."""
    traffic, ideal, expert_shard = _decode("h100-tp8", 8, platform="cpu")
    assert traffic.largest_writes(expert_shard)
    assert traffic.bytes / sum(ideal.values()) > 2 * MAX_RATIO


def test_ideal_bytes_by_hand():
    """Batch 1 on 8 devices, tensor parallel: every weight's shard, but 2 of the 8 experts."""
    sharder = Sharder(load_rules("tensor_parallel"), jax.sharding.Mesh(
        np.array(jax.devices()[:8]).reshape(1, 8), ("data", "model")))
    with tracing_for("gpu"):  # the accelerator's parameters: the table held in bf16
        params, _, memory = aot.decode_inputs(CONFIG, sharder, 1, CACHE_LEN)
    ideal = ideal_decode_bytes(CONFIG, params, (memory.k, memory.v), 1)
    c, layers = CONFIG, CONFIG.num_layers
    attention = c.emb_size * (c.num_q_heads + 2 * c.num_kv_heads + c.num_q_heads) * c.key_size // 8
    experts = 2 * 3 * c.emb_size * c.ffn_size // 8
    norms = 4 * c.emb_size * 4 + c.emb_size * c.num_experts * 4  # four RMSNorms and the router (f32)
    assert ideal["weights"] == layers * (attention + experts + norms) + c.emb_size * 4  # and the final norm
    assert ideal["table"] == c.vocab_size * c.emb_size * 2 // 8
    assert ideal["kv"] == 2 * layers * c.num_kv_heads * CACHE_LEN * c.key_size * 2 // 8
    assert ideal["scales"] > 0


def test_plan_for_a_target_reports_its_compiler_and_the_decode_traffic():
    target, sharder = _sharder("h100-tp8")
    plan = make_plan(CONFIG, sharder, batch=1, cache_len=CACHE_LEN, prefill_len=16, target=target)
    fields = json.loads(plan.to_json())
    assert fields["target"] == "h100" and fields["device_memory_gib"] == 80
    assert set(fields["memory_analysis"]) == {"decode", "prefill"}
    assert set(fields["memory_analysis"]["decode"]) == {"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes"}
    decode = fields["decode"]
    for key in ("moved_bytes", "read_bytes", "write_bytes", "ideal", "ideal_bytes", "ratio", "tokens_per_s",
                "roofline_tokens_per_s", "bandwidth", "largest_writes", "unknown_loops"):
        assert key in decode, key
    assert decode["ratio"] == pytest.approx(decode["moved_bytes"] / decode["ideal_bytes"])
    assert decode["tokens_per_s"] == pytest.approx(target.bandwidth / decode["moved_bytes"])
    assert "Decode step, batch 1" in plan.describe()
    assert isinstance(plan.decode, DecodeRoofline)
