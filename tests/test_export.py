"""Proof that the accelerator paths lower for accelerators: the engine's decode step and a prefill
chunk of the real Grok-1 configuration, exported with `jax.export` for `cuda` and `tpu` from
abstract inputs (no weight allocated, no accelerator needed), on 8 devices (tensor_parallel,
in this process) and on the 32-device layout (expert_tensor_parallel, in a subprocess with 32
virtual CPU devices: conftest gives this process 16).

What an accelerator engine runs: int8 weights (the checkpoint's format) and a bf16 cache
(`grok.model.transformer.cache_dtype()` off CPU). The exported programs may contain no custom call an
accelerator lacks; in particular none of the native CPU kernels (`grok.native`: `grok_matmul_t`,
`grok_grouped_matmul_t`), which `grok.model.ops` uses only for float32 CPU-format weights or caches on a
CPU backend. A sanity test shows the check does see such a kernel when one is lowered.

Run with `-s` to see the lowering and export times (printed, never asserted).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from grok import native
from grok.model import ops, transformer
from grok.model.config import PRESETS
from grok.parallel.sharding import Sharder, load_rules, mesh_of
from grok.planning import aot, plan

ROOT = Path(__file__).resolve().parents[1]
GROK1 = PRESETS["grok-1"]
PLATFORMS = ("cuda", "tpu")
# The serving shape: 8 sequences over an 8192-token cache, prompts in chunks of 512 tokens.
BATCH, CACHE_LEN, PREFILL_LEN = 8, 8192, 512
SUBPROCESS_TIMEOUT_S = 300
NATIVE_TARGETS = frozenset(native.TARGETS)  # grok_matmul_t, grok_grouped_matmul_t

# Custom calls an accelerator program may hold: the GSPMD partitioner's own annotations (sharding
# constraints and shard_map boundaries, as lowered when Shardy is off), which XLA's SPMD pass
# consumes on every backend before any kernel is chosen. With Shardy (JAX's default) shardings are
# `sdy` ops instead and the Grok-1 programs hold no custom call at all. Deliberately narrower than
# jax.export's own list of stable targets, which also admits CPU-only LAPACK/FFI kernels.
ACCELERATOR_SAFE_TARGETS = frozenset({"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"})

_PRETTY_CALL = re.compile(r"stablehlo\.custom_call\s+@([\w$.\-]+)")
_GENERIC_CALL = re.compile(r'"stablehlo\.custom_call"[^\n]*?call_target_name\s*=\s*"([^"]+)"')


def custom_call_targets(module_text: str) -> collections.Counter:
    """How often each custom_call target occurs in a StableHLO module's text; every custom_call
    in the text is accounted for (else an unrecognized spelling could hide one)."""
    targets = collections.Counter(_PRETTY_CALL.findall(module_text) + _GENERIC_CALL.findall(module_text))
    assert sum(targets.values()) == module_text.count("stablehlo.custom_call"), "unparsed custom_call in the module"
    return targets


def assert_accelerator_safe(targets: collections.Counter) -> None:
    leaked = sorted(set(targets) - ACCELERATOR_SAFE_TARGETS)
    assert not leaked, f"custom calls an accelerator may lack: {leaked} (native CPU kernels: {sorted(NATIVE_TARGETS)})"


def export_engine_steps(devices: int) -> dict:
    """Export the engine's decode step and prefill chunk of Grok-1 on the first `devices` devices
    in `grok.planning.plan.recommend`'s layout for that many, checking each export; returns a summary."""
    rules, shape = plan.recommend(GROK1, devices)
    sharder = Sharder(load_rules(rules), mesh_of(shape, jax.devices()[:devices]))
    mesh = sharder.mesh
    assert mesh.size == devices
    start = time.perf_counter()
    steps = aot.engine_steps(GROK1, sharder, BATCH, CACHE_LEN, PREFILL_LEN, cache_dtype=jnp.bfloat16)
    summary = {"devices": devices, "rules": rules, "mesh": dict(mesh.shape),
               "engine_steps_s": time.perf_counter() - start}
    for name, step in steps.items():
        start = time.perf_counter()
        exp = jax.export.export(step.fn, platforms=PLATFORMS)(*step.args)
        export_s = time.perf_counter() - start
        assert exp.platforms == PLATFORMS
        assert exp.nr_devices == devices

        text = exp.mlir_module()
        targets = custom_call_targets(text)
        assert not NATIVE_TARGETS & set(targets)
        assert not any(target in text for target in NATIVE_TARGETS)
        assert_accelerator_safe(targets)

        # Shardings: every input has one, over this mesh (in_shardings_jax checks the axis sizes);
        # the weights are split over it, not replicated. Outputs: the sampled tokens replicated over
        # the mesh; the donated cache unspecified (None: left to the compiler) or over the mesh.
        ins, outs = exp.in_shardings_jax(mesh), exp.out_shardings_jax(mesh)
        assert all(s is not None and len(s.device_set) == devices for s in ins)
        assert not all(s.is_fully_replicated for s in ins)
        assert outs[0] is not None and outs[0].is_fully_replicated and len(outs[0].device_set) == devices
        assert all(s is None or len(s.device_set) == devices for s in outs)

        # Accelerator formats: a bf16 cache (as passed: what cache_dtype() is off CPU), int8 weights.
        (params, memory, *_), kwargs = jax.tree.unflatten(exp.in_tree, exp.in_avals)
        assert not kwargs
        assert memory.k.dtype == memory.v.dtype == jnp.bfloat16
        assert memory.k.shape == transformer.cache_shape(GROK1, BATCH, CACHE_LEN, sharder.cache_heads(GROK1))
        weight = params["transformer/decoder_layer/moe/linear"]["w"].weight
        assert weight.dtype == jnp.int8 and weight.shape[0] == GROK1.num_layers  # stacked, scanned layers

        summary[name] = {
            "lower_s": step.lower_s,
            "export_s": export_s,
            "module_chars": len(text),
            "custom_calls": dict(targets),
        }
    return summary


def _print_summary(summary: dict) -> None:
    print(f"\n{summary['devices']} devices, {summary['rules']} {summary['mesh']}: "
          f"engine_steps (lowering both for CPU) {summary['engine_steps_s']:.2f} s")
    for name in ("decode", "prefill"):
        s = summary[name]
        print(f"  {name}: lower {s['lower_s']:.2f} s, export {s['export_s']:.2f} s, "
              f"{s['module_chars']} chars of StableHLO, custom calls {s['custom_calls'] or 'none'}")


def _subprocess_env(devices: int) -> dict[str, str]:
    """This environment with CPU only and `devices` virtual CPU devices (conftest's count replaced)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the virtual CPU devices set up by tests/conftest.py")
def test_grok1_exports_for_accelerators_on_8_devices():
    summary = export_engine_steps(8)
    assert summary["rules"] == "tensor_parallel" and summary["mesh"] == {"data": 1, "model": 8}
    _print_summary(summary)


def test_grok1_exports_for_accelerators_on_32_devices():
    """In a fresh process with 32 virtual CPU devices (the device count is fixed when JAX starts)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "32"], cwd=ROOT, env=_subprocess_env(32),
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )
    wall = time.perf_counter() - start
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["devices"] == 32
    assert summary["rules"] == "expert_tensor_parallel"
    assert summary["mesh"] == {"data": 1, "expert": 4, "model": 8}
    _print_summary(summary)
    print(f"  subprocess wall time {wall:.2f} s")


@pytest.mark.skipif(not native.available(), reason="the native CPU kernels are not buildable here")
def test_the_check_sees_a_native_kernel():
    """The test can fail: a product that does use the native kernel (4 float32 rows on CPU) lowered
    for the accelerators is refused by jax.export itself, and, with that check disabled, its module
    holds `grok_matmul_t`, which the checks above find and reject."""
    assert jax.default_backend() == "cpu"
    x = jax.ShapeDtypeStruct((4, 64), jnp.float32)
    w_t = jax.ShapeDtypeStruct((32, 64), jnp.float32)
    matmul_t = jax.jit(ops.matmul_t)
    with pytest.raises(ValueError, match="grok_matmul_t"):
        jax.export.export(matmul_t, platforms=PLATFORMS)(x, w_t)

    allow = [jax.export.DisabledSafetyCheck.custom_call("grok_matmul_t")]
    exp = jax.export.export(matmul_t, platforms=PLATFORMS, disabled_checks=allow)(x, w_t)
    targets = custom_call_targets(exp.mlir_module())
    assert targets == {"grok_matmul_t": 1}
    with pytest.raises(AssertionError, match="grok_matmul_t"):
        assert_accelerator_safe(targets)


@pytest.mark.skipif(not native.available(), reason="the native CPU kernels are not buildable here")
def test_engine_steps_in_the_cpu_format_do_hold_native_kernels():
    """The same engine programs (a tiny config on one device) in the CPU format, float32 weights
    (`grok.model.transformer.f32_params`) and a float32 cache, hold both native kernels when lowered in this
    CPU process, whatever platforms they are exported for: the gate is the process's backend and
    the format. In the accelerator format (int8 weights, bf16 cache) they hold none."""
    sharder = Sharder(load_rules("tensor_parallel"), mesh_of({"data": 1, "model": 1}, jax.devices()[:1]))
    allow = [jax.export.DisabledSafetyCheck.custom_call(target) for target in NATIVE_TARGETS]
    for cache_dtype, cpu_format in ((jnp.float32, True), (jnp.bfloat16, False)):
        steps = aot.engine_steps(PRESETS["tiny"], sharder, 4, 64, 16, cache_dtype=cache_dtype)
        for name, step in steps.items():
            params, *rest = step.args
            if cpu_format:
                params = jax.eval_shape(transformer.f32_params, params)
            exp = jax.export.export(step.fn, platforms=PLATFORMS, disabled_checks=allow)(params, *rest)
            targets = custom_call_targets(exp.mlir_module())
            if cpu_format:
                assert set(targets) == NATIVE_TARGETS, (name, targets)
                with pytest.raises(AssertionError, match="grok_"):
                    assert_accelerator_safe(targets)
            else:
                assert not targets, (name, targets)


if __name__ == "__main__":  # the subprocess of test_grok1_exports_for_accelerators_on_32_devices
    print(json.dumps(export_engine_steps(int(sys.argv[1]))))
