"""`run.py plan`: per-device bytes of the real Grok-1 on a pod, checked against a hand derivation,
the layout chosen for a device count, and the fit targets of a 32-device pod.

No weight of Grok-1 is allocated: shapes are ShapeDtypeStructs and both engine programs are
compiled ahead of time (grok.planning.plan). Run with -s to see the plans printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from grok.model.config import PRESETS
from grok.parallel.sharding import Sharder, ShardingError, load_rules, mesh_of
from grok.planning.plan import GIB, Plan, choose_layout, make_plan, recommend

GROK1 = PRESETS["grok-1"]
REPO = Path(__file__).resolve().parent.parent

# Per device under expert_tensor_parallel on (data=1, expert=2, model=8), GROK1.md's parameter table
# (int8 = 1 byte, bf16 = 2, fp32 = 4). Per decoder layer:
#   attention, split over `model` (8) exactly as tensor_parallel on 8 devices:
#     query  int8 [6144, 768] = 4_718_592, scales [1, 768] = 1_536
#     key    int8 [6144, 128] =   786_432, scales [1, 128] =   256; value the same
#     linear int8 [768, 6144] = 4_718_592, scales: 8 blocks split with the rows -> [1, 6144] = 12_288
#     together 11_010_048 + 14_336                                                 =  11_024_384
#   experts, expert axis over `expert` (2), ffn width over `model` (8):
#     linear   int8 [8, 6144, 32768] -> [4, 6144, 4096] = 100_663_296; scales [4, 1, 4096] = 32_768
#     linear_v the same                                   100_663_296            32_768
#     linear_1 int8 [8, 32768, 6144] -> [4, 4096, 6144] = 100_663_296;
#              scales [8, 8, 6144] -> [4, 1, 6144] (blocks split with the rows) = 49_152
#     together 301_989_888 + 114_688                                               = 302_104_576
#   4 norms fp32 [6144] + router fp32 [6144, 8], replicated: 98_304 + 196_608      =     294_912
#   layer: 11_024_384 + 302_104_576 + 294_912                                      = 313_423_872
# 64 layers: 20_059_127_808. Embeddings fp32 [131072, 6144], width over expert x model (16) ->
# [131072, 384] = 201_326_592; final norm 24_576. Total 20_059_127_808 + 201_351_168:
ETP16_PARAMS = 20_260_478_976
# KV cache, batch 8 x 1024 positions: keys [64, 8, 8, 1024, 128] bf16, kv heads over `model` ->
# [64, 8, 1, 1024, 128] * 2 bytes = 134_217_728; values the same.
ETP16_KV_B8_S1024 = 268_435_456
# Prefix cache, serve's default: a quarter of the whole KV cache (2 * 64 * 8 * 8 * 1024 * 128 * 2 =
# 2_147_483_648 bytes) = 536_870_912, in blocks of 16 tokens of 2 * 64 * 8 * 16 * 128 * 2 + 16
# (the mask) = 4_194_320 bytes: 127 blocks, stored [64, 127, 8, 16, 128] with kv heads over
# `model` -> [64, 127, 1, 16, 128] * 2 bytes = 33_292_288; values the same.
ETP16_PREFIX_B8_S1024 = 66_584_576


@pytest.mark.skipif(jax.device_count() < 16, reason="needs the 16 virtual CPU devices of tests/conftest.py")
def test_plan_bytes_match_the_hand_derivation():
    sharder = Sharder(load_rules("expert_tensor_parallel"), mesh_of({"data": 1, "expert": 2, "model": 8}))
    plan = make_plan(GROK1, sharder, batch=8, cache_len=1024)
    print("\n" + plan.describe())
    assert plan.params_bytes_per_device == ETP16_PARAMS
    assert plan.params_bytes_per_device <= 1.15 * 318_239_694_848 / 16  # the bound
    assert plan.kv_bytes_per_device == ETP16_KV_B8_S1024
    # Temporaries: what XLA assigns beyond arguments; a bf16 copy of a layer's local experts
    # (3 * 4 * 6144 * 4096 * 2 = 604 MB) is the largest thing either program may hold.
    assert set(plan.temp_bytes) == {"decode", "prefill"}
    assert 0 < plan.temp_bytes_per_device == max(plan.temp_bytes.values()) < 2 * GIB
    assert plan.prefix_cache_bytes_per_device == ETP16_PREFIX_B8_S1024
    assert plan.total_bytes_per_device == (ETP16_PARAMS + ETP16_KV_B8_S1024 + ETP16_PREFIX_B8_S1024
                                           + plan.temp_bytes_per_device)
    assert make_plan(GROK1, sharder, batch=8, cache_len=1024, prefix_cache_bytes=0).prefix_cache_bytes_per_device == 0
    assert plan.mesh == {"data": 1, "expert": 2, "model": 8} and plan.rules == "expert_tensor_parallel"
    fields = json.loads(plan.to_json())
    assert fields["total_bytes_per_device"] == plan.total_bytes_per_device and fields["mesh"] == "data=1,expert=2,model=8"


@pytest.mark.parametrize(
    "devices,rules,mesh",
    [
        (1, "tensor_parallel", {"data": 1, "model": 1}),
        (8, "tensor_parallel", {"data": 1, "model": 8}),
        (12, "tensor_parallel", {"data": 3, "model": 4}),
        (16, "expert_tensor_parallel", {"data": 1, "expert": 2, "model": 8}),
        (32, "expert_tensor_parallel", {"data": 1, "expert": 4, "model": 8}),
        (64, "expert_tensor_parallel", {"data": 1, "expert": 8, "model": 8}),
        (128, "expert_tensor_parallel", {"data": 2, "expert": 8, "model": 8}),
    ],
)
def test_recommended_layouts(devices, rules, mesh):
    assert recommend(GROK1, devices) == (rules, mesh)


def test_choose_layout_from_flags():
    rules, shape = choose_layout(GROK1, 16)
    assert rules.axes == ("data", "expert", "model") and shape == {"data": 1, "expert": 2, "model": 8}
    rules, shape = choose_layout(GROK1, 16, rules="tensor_parallel")
    assert shape == {"data": 1, "model": 16}
    rules, shape = choose_layout(GROK1, 16, mesh="data=2,model=8")
    assert rules.source.endswith("tensor_parallel.toml") and shape == {"data": 2, "model": 8}
    rules, shape = choose_layout(GROK1, 32, mesh="model=8,expert=4,data=1")
    assert rules.source.endswith("expert_tensor_parallel.toml") and shape == {"data": 1, "expert": 4, "model": 8}
    with pytest.raises(ShardingError, match="--rules expert_tensor_parallel: give --mesh with its axes"):
        choose_layout(GROK1, 12, rules="expert_tensor_parallel")  # 12 devices: the recommendation has 2 axes
    with pytest.raises(ShardingError, match="no shipped rules have the axes data, pipeline; give --rules"):
        choose_layout(GROK1, 16, mesh="data=2,pipeline=8")


def run_plan(*flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the plan sets its own devices
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), "plan", *flags],
        capture_output=True, text=True, timeout=400, env=env, cwd=REPO,
    )


def test_plan_command_on_a_32_device_pod_fits_16_gb_chips():
    """The default layout for 32 devices, batch 8 with full 8,192-token caches: at most 15 GB per
    device (a TPU v5e-32 slice), parameters within 1.15x of an even split."""
    result = run_plan("--cpu-devices", "32", "--json")
    assert result.returncode == 0, result.stderr
    print("\n" + result.stdout)
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert plan["devices"] == 32 and plan["mesh"] == "data=1,expert=4,model=8"
    assert plan["rules"] == "expert_tensor_parallel" and (plan["batch"], plan["cache_len"]) == (8, 8192)
    assert plan["params_bytes_per_device"] <= 1.15 * 318_239_694_848 / 32
    assert plan["kv_bytes_per_device"] == 2 * 64 * 8 * 1 * 8192 * 128 * 2  # k and v, 1 kv head per device
    assert plan["total_bytes_per_device"] <= 15e9
    assert plan["total_bytes_per_device"] == sum(plan[f"{k}_bytes_per_device"] for k in ("params", "kv", "prefix_cache", "temp"))
    assert 0.99 <= plan["prefix_cache_bytes_per_device"] / (plan["kv_bytes_per_device"] / 4) <= 1  # serve's default, in whole blocks
    assert 16 in plan["fits_gb"]
    assert "Fits devices of 16 GB" in result.stdout and "parameters" in result.stdout


def test_plan_command_errors_are_one_line():
    result = run_plan("--mesh", "data=1,model=16", "--rules", "expert_tensor_parallel")
    assert result.returncode == 2 and "does not match" in result.stderr and "Traceback" not in result.stderr


def test_describe_names_the_fitting_sizes_and_warns_when_none_fits():
    def plan(params_gib: float) -> Plan:
        return Plan(
            devices=8, mesh={"data": 1, "model": 8}, rules="tensor_parallel", batch=8, cache_len=8192,
            prefill_len=512, params_bytes_per_device=int(params_gib * GIB), kv_bytes_per_device=GIB,
            prefix_cache_bytes_per_device=GIB // 4, temp_bytes_per_device=GIB, temp_bytes={"decode": GIB, "prefill": GIB // 2},
            compile_s={"decode": 1.0, "prefill": 2.0},
        )

    assert plan(20).fits() == [24, 32, 40, 48, 80, 96, 141]
    assert "Fits devices of 24 GB, 32 GB" in plan(20).describe() and "WARNING" not in plan(20).describe()
    assert plan(200).fits() == []
    assert "WARNING: fits none of 16 GB" in plan(200).describe()
