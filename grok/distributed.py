"""Running one model over many processes (hosts): start `jax.distributed` before anything else.

Every process runs the same program (`python run.py generate ...` on each host) with the same
coordinator and process count and its own process id; together their devices form one mesh
(`grok.sharding.make_mesh` uses `jax.devices()`, all processes' devices). Each value comes from
the argument, else from the environment:

    GROK_COORDINATOR    HOST:PORT of process 0, where it serves the coordinator (--coordinator)
    GROK_NUM_PROCESSES  how many processes take part (--num-processes)
    GROK_PROCESS_ID     this process's id, 0 .. GROK_NUM_PROCESSES - 1 (--process-id)

With no coordinator this is a single process and nothing is started.

For development without accelerators, `local_device_count` gives each process that many virtual
CPU devices (and selects the CPU platform), so a pod can be imitated on one machine. Collectives
between CPU processes need a cross-process implementation; JAX 0.10 uses gloo by default
(`jax_cpu_collectives_implementation`), so none is chosen here.

`initialize` must run before any JAX call that touches devices (`jax.devices()`, any computation):
after that JAX's backends are fixed and the settings above cannot take effect.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("grok")

ENV_COORDINATOR = "GROK_COORDINATOR"
ENV_NUM_PROCESSES = "GROK_NUM_PROCESSES"
ENV_PROCESS_ID = "GROK_PROCESS_ID"


def _from_env(value: int | None, env: str, flag: str) -> int | None:
    """`value`, else the integer in environment variable `env` (None when it is unset or empty)."""
    if value is not None:
        return value
    text = os.environ.get(env, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{env}={text!r} is not an integer (it stands for {flag})") from None


def _check_address(coordinator: str) -> None:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")


def initialize(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    local_device_count: int | None = None,
) -> None:
    """Join this process to a multi-process JAX run, or do nothing for a single process.

    Raises ValueError (naming the flag) for missing, malformed or inconsistent values, and
    RuntimeError when JAX's devices were already in use.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR, "").strip() or None
    num_processes = _from_env(num_processes, ENV_NUM_PROCESSES, "--num-processes")
    process_id = _from_env(process_id, ENV_PROCESS_ID, "--process-id")
    if local_device_count is not None and local_device_count < 1:
        raise ValueError(f"--cpu-devices must be >= 1, got {local_device_count}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if coordinator is None:
        if num_processes is not None and num_processes > 1:
            raise ValueError(
                f"--num-processes {num_processes} needs --coordinator HOST:PORT (or {ENV_COORDINATOR})"
            )
        if process_id:
            raise ValueError(f"--process-id {process_id} needs --coordinator HOST:PORT (or {ENV_COORDINATOR})")
    else:
        _check_address(coordinator)
        if num_processes is None:
            raise ValueError(f"--coordinator needs --num-processes N (or {ENV_NUM_PROCESSES})")
        if process_id is None:
            raise ValueError(f"--coordinator needs --process-id I (or {ENV_PROCESS_ID})")
    if process_id is not None and not 0 <= process_id < (num_processes or 1):
        raise ValueError(
            f"--process-id {process_id} is out of range: with --num-processes {num_processes or 1} "
            f"it must be 0..{(num_processes or 1) - 1}"
        )

    if local_device_count is not None:
        try:
            jax.config.update("jax_num_cpu_devices", local_device_count)
            jax.config.update("jax_platforms", "cpu")
        except RuntimeError:
            raise RuntimeError(
                "--cpu-devices must take effect before JAX starts its backends, but JAX devices are already in use"
            ) from None
    if coordinator is None:
        return
    log.debug("joining %s as process %d of %d", coordinator, process_id, num_processes)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
