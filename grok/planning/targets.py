"""Accelerators `plan --target` compiles for, with no device present (JAX's deviceless AOT).

A GPU target is compiled by the CUDA plugin's XLA (the `jax-cuda12-plugin` and `-pjrt` wheels,
`ptxas` from `nvidia-cuda-nvcc-cu12`) against a description of the device, written here from the
vendor's published figures; a TPU target by `libtpu` for a slice topology (`v5e:4x8`). Both need the
process to run JAX on the CPU (`use_cpu_backend`): the CUDA plugin otherwise insists on a driver.
`bandwidth` is the published peak memory bandwidth of one device, used for the projected speed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import jax
import numpy as np

GB = 10**9


@dataclasses.dataclass(frozen=True)
class GpuFacts:
    """What XLA:GPU's compiler needs to know of an NVIDIA device (a `GpuTargetConfigProto`)."""

    description: str
    compute_capability: tuple[int, int]
    accelerated: bool  # the "a" features (sm_90a, sm_100a)
    cores: int  # streaming multiprocessors
    fpus_per_core: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int
    l2_cache: int
    clock_ghz: float
    memory: int

    def target_config(self, bandwidth: float) -> str:
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_core} threads_per_core_limit: 2048 core_count: {self.cores}
  fpus_per_core: {self.fpus_per_core} block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {int(bandwidth)} l2_cache_size: {self.l2_cache}
  clock_rate_ghz: {self.clock_ghz} device_memory_size: {self.memory}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor}
    feature_extension: {"ACCELERATED_FEATURES" if self.accelerated else "NONE"} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  name: "{self.description}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{self.description}"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "cpu", "gpu" or "tpu": what the model is traced for (`grok.model.platform`)
    description: str
    memory_gib: float  # per device
    bandwidth: float  # bytes/s per device, published peak
    devices_per_host: int
    gpu: GpuFacts | None = None
    tpu_version: str | None = None  # libtpu's name of the chip, as in "v5e:4x8"
    tpu_3d: bool = False  # a 3-D torus (v4, v5p): topologies like 2x2x4
    tpu_options: tuple[tuple[str, str], ...] = ()

    @property
    def compiler(self) -> str:
        return {"gpu": "jax_cuda12_plugin", "tpu": "libtpu"}.get(self.platform, "jaxlib")

    def available(self) -> bool:
        """Whether this machine has the target's compiler installed."""
        return importlib.util.find_spec(self.compiler) is not None

    def compiler_options(self) -> dict[str, object]:
        # CUB's radix sort asks a live device for its scratch size; XLA's own sort needs none.
        return {"xla_gpu_enable_cub_radix_sort": False} if self.platform == "gpu" else {}

    def devices(self, count: int) -> list[jax.Device]:
        """`count` devices of this kind, as a deviceless topology (CPU: the process's own devices)."""
        if self.platform == "cpu":
            return jax.devices()[:count]
        if not self.available():
            raise TargetError(
                f"--target {self.name} needs {self.compiler}, which is not installed: "
                "pip install -r requirements.txt -e '.[targets]'"
            )
        from jax.experimental import topologies

        if self.platform == "gpu":
            per_host = min(count, self.devices_per_host)
            if count % per_host:
                raise TargetError(f"--target {self.name}: {count} devices are not whole hosts of {per_host}")
            shape = f"1x{count // per_host}x{per_host}"
            config = self.gpu.target_config(self.bandwidth)
            return list(topologies.get_topology_desc(platform="cuda", target_config=config, topology=shape).devices)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM here: quiets libtpu's probing
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{self.tpu_version}-{count}")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chips to lock: other processes may compile too
        shape = _torus(count, 3 if self.tpu_3d else 2)
        try:
            topology = topologies.get_topology_desc(
                f"{self.tpu_version}:{shape}", platform="tpu", **dict(self.tpu_options)
            )
        except Exception as err:  # libtpu's own words: an unsupported slice shape
            raise TargetError(f"--target {self.name}: no {count}-chip slice ({shape}): {err}") from None
        return list(topology.devices)

    def mesh(self, shape: dict[str, int], axes: tuple[str, ...]) -> jax.sharding.Mesh:
        devices = np.array(self.devices(math.prod(shape.values())))
        return jax.sharding.Mesh(devices.reshape(tuple(shape[a] for a in axes)), axes)


class TargetError(ValueError):
    """A target that cannot be compiled for here: compiler missing, or no such pod."""


def _torus(count: int, dims: int) -> str:
    """The most square slice shape of `count` chips (powers of two), e.g. 32 -> 4x8 or 2x4x4."""
    if count < 1 or count & (count - 1):
        raise TargetError(f"{count} chips: a TPU slice here has a power-of-two number of chips")
    sides = [1] * dims
    for i in range(count.bit_length() - 1):
        sides[-1 - i % dims] *= 2
    return "x".join(map(str, sorted(sides)))


_HOPPER = dict(
    compute_capability=(9, 0), accelerated=True, cores=132, fpus_per_core=128, shared_memory_per_core=233472,
    shared_memory_per_block_optin=232448, l2_cache=50 << 20, clock_ghz=1.98,
)
TARGETS: dict[str, Target] = {
    "cpu": Target("cpu", "cpu", "virtual CPU devices (XLA:CPU)", 0, 0, 8),
    "h100": Target("h100", "gpu", "NVIDIA H100 SXM 80 GB", 80, 3.35e12, 8,
                   GpuFacts("NVIDIA H100 80GB HBM3", memory=80 << 30, **_HOPPER)),
    "h200": Target("h200", "gpu", "NVIDIA H200 SXM 141 GB", 141, 4.8e12, 8,
                   GpuFacts("NVIDIA H200 141GB HBM3e", memory=141 << 30, **_HOPPER)),
    "a100-80g": Target("a100-80g", "gpu", "NVIDIA A100 SXM 80 GB", 80, 2.039e12, 8, GpuFacts(
        "NVIDIA A100-SXM4-80GB", compute_capability=(8, 0), accelerated=False, cores=108, fpus_per_core=64,
        shared_memory_per_core=167936, shared_memory_per_block_optin=166912, l2_cache=40 << 20, clock_ghz=1.41,
        memory=80 << 30)),
    "b200": Target("b200", "gpu", "NVIDIA B200 180 GB", 180, 8.0e12, 8, GpuFacts(
        "NVIDIA B200", compute_capability=(10, 0), accelerated=True, cores=148, fpus_per_core=128,
        shared_memory_per_core=233472, shared_memory_per_block_optin=232448, l2_cache=126 << 20,
        clock_ghz=1.965, memory=180 << 30)),
    "tpu-v4": Target("tpu-v4", "tpu", "TPU v4 (32 GiB HBM per chip)", 32, 1.2e12, 4, tpu_version="v4",
                     tpu_3d=True, tpu_options=(("chip_config_name", "megacore"),)),
    "tpu-v5e": Target("tpu-v5e", "tpu", "TPU v5e (16 GiB HBM per chip)", 16, 819 * GB, 4, tpu_version="v5e"),
    "tpu-v5p": Target("tpu-v5p", "tpu", "TPU v5p (95 GiB HBM per chip)", 95, 2.765e12, 4, tpu_version="v5p",
                      tpu_3d=True),
    "tpu-v6e": Target("tpu-v6e", "tpu", "TPU v6e (32 GiB HBM per chip)", 32, 1.64e12, 4, tpu_version="v6e"),
}


def use_cpu_backend() -> None:
    """Run JAX on the CPU only, as deviceless compiles need; call before any backend starts."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
