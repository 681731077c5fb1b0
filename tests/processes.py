"""Helpers for tests that start CLI processes standing for a pod's hosts."""

import os
import random
import re
import socket
from pathlib import Path

from grok.checkpoint.demo import write_demo_checkpoint
from grok.model.config import GrokConfig

# What JAX's cluster detection (or our flags) read: none of it may leak in from wherever the tests run.
CLUSTER_PREFIXES = ("GROK_", "SLURM_", "OMPI_", "PMI_", "MEGASCALE_", "TPU_WORKER_")
CLUSTER_VARS = ("KUBERNETES_SERVICE_HOST", "TPU_PROCESS_ADDRESSES", "JAX_COORDINATOR_ADDRESS",
                "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS", "JOB_COMPLETION_INDEX")


def is_cluster_var(name: str) -> bool:
    return name.startswith(CLUSTER_PREFIXES) or name in CLUSTER_VARS


def free_port(low: int = 0, high: int = 0) -> int:
    """A port nothing listens on: any, or one in low..high."""
    for _ in range(100):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", random.randint(low, high) if low else 0))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError(f"no free port in {low}..{high}")


def worker_env() -> dict[str, str]:
    """This environment for a CLI process: CPU only, and its device count set by --cpu-devices."""
    env = {k: v for k, v in os.environ.items() if not is_cluster_var(k)}
    env["JAX_PLATFORMS"] = "cpu"
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def checkpoint_with_config(directory: Path, config: GrokConfig) -> tuple[Path, Path]:
    """A random checkpoint of `config` in `directory/ckpt-0`, and its config as a JSON file beside it
    (what `--config` of a CLI process reads)."""
    path = directory / "config.json"
    path.write_text(config.to_json())
    return write_demo_checkpoint(directory / "ckpt-0", config), path
