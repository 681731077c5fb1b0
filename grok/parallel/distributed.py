"""Running one model over many processes (hosts): start `jax.distributed` before anything else.

Every process runs the same program (`python run.py generate ...` on each host); together their
devices form one mesh (`grok.parallel.sharding.make_mesh` uses `jax.devices()`, all processes' devices).
There are two ways to say which processes take part:

* Explicitly: the same coordinator and process count on every process, and each its own process id.
  Each value comes from the argument, else from the environment:

      GROK_COORDINATOR    HOST:PORT of process 0, where it serves the coordinator (--coordinator)
      GROK_NUM_PROCESSES  how many processes take part (--num-processes)
      GROK_PROCESS_ID     this process's id, 0 .. GROK_NUM_PROCESSES - 1 (--process-id)

* Detected (`mode="auto"`, the default; --distributed, else GROK_DISTRIBUTED): with no coordinator
  given, when the environment shows a cluster of more than one process, `jax.distributed.initialize()`
  is called with no arguments and JAX reads everything from the cluster. The check is JAX's own
  (`jax._src.clusters.ClusterEnv`, the cluster environments `initialize()` itself tries, in its order):

      Open MPI    OMPI_MCA_orte_hnp_uri set (mpirun / mpiexec); processes OMPI_COMM_WORLD_SIZE, id
                  OMPI_COMM_WORLD_RANK; coordinator: the launcher's address from that URI, port from
                  its job id
      SLURM       SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID all
                  set (a job step started by srun); processes SLURM_NTASKS, id SLURM_PROCID;
                  coordinator: the step's first node, port 61440 + SLURM_JOB_ID % 4096
      Cloud TPU   a TPU VM (libtpu installed, TPU chips present) whose metadata server knows its
                  agent-worker-number (GCE), or with TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES set
                  (GKE); processes: the slice's workers (times MEGASCALE_NUM_SLICES), port 8482
      Kubernetes  KUBERNETES_SERVICE_HOST set and the `kubernetes` package installed (jax[k8s]): an
                  indexed Job, processes its parallelism, id JOB_COMPLETION_INDEX, port 55527

  JAX_COORDINATOR_PORT overrides the port everywhere. --num-processes / --process-id, when given,
  are passed on and win over what the cluster says. On SLURM and Open MPI, JAX also restricts each
  process to the one GPU whose index is its local rank (SLURM_LOCALID / OMPI_COMM_WORLD_LOCAL_RANK)
  unless JAX_LOCAL_DEVICE_IDS lists others: one process per GPU. A cluster of one process starts
  nothing. `mode="off"` skips the detection (a single process unless a coordinator is given).

With neither, this is a single process and nothing is started.

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
from dataclasses import dataclass

import jax

log = logging.getLogger("grok")

ENV_COORDINATOR = "GROK_COORDINATOR"
ENV_NUM_PROCESSES = "GROK_NUM_PROCESSES"
ENV_PROCESS_ID = "GROK_PROCESS_ID"
ENV_DISTRIBUTED = "GROK_DISTRIBUTED"
MODES = ("auto", "off")

# JAX's cluster environment classes (jax._src.clusters) -> what the log and errors call them, and
# the variables to look at when reading one fails.
_KINDS = {
    "OmpiCluster": ("Open MPI", "OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK"),
    "SlurmCluster": ("SLURM", "SLURM_NTASKS, SLURM_PROCID"),
    "GceTpuCluster": ("Cloud TPU", "the TPU VM metadata (worker-network-endpoints, agent-worker-number)"),
    "GkeTpuCluster": ("Cloud TPU on GKE", "TPU_WORKER_HOSTNAMES, TPU_WORKER_ID"),
    "K8sCluster": ("Kubernetes", "the Job (an indexed Job: JOB_COMPLETION_INDEX)"),
}
_OFF_HINT = f"pass --distributed off (or {ENV_DISTRIBUTED}=off) to run as a single process"


@dataclass(frozen=True)
class Cluster:
    """A cluster environment found by JAX's detection: what it is and what it says about this process."""

    kind: str
    num_processes: int
    process_id: int


def _cluster_envs() -> list[type]:
    """JAX's cluster environments in the order `jax.distributed.initialize()` tries them."""
    try:
        from jax._src import clusters

        return [env for env in clusters.ClusterEnv._cluster_types if not env.opt_in_only_method]
    except (ImportError, AttributeError):  # not JAX 0.10's layout: detect nothing rather than fail
        log.warning("cannot read JAX %s's cluster detection; use --coordinator for many processes", jax.__version__)
        return []


def detect_cluster() -> Cluster | None:
    """The cluster `jax.distributed.initialize()` would bootstrap from, or None when there is none.

    Raises ValueError when a cluster is present but its description cannot be read.
    """
    for env in _cluster_envs():
        kind, variables = _KINDS.get(env.__name__, (env.__name__, "its environment"))
        try:
            present = env.is_env_present()
        except Exception as err:  # e.g. the TPU metadata server not answering
            raise ValueError(f"--distributed auto: looking for a {kind} cluster failed ({err}); {_OFF_HINT}") from None
        if not present:
            continue
        try:
            return Cluster(kind, int(env.get_process_count()), int(env.get_process_id()))
        except Exception as err:
            raise ValueError(
                f"--distributed auto: found a {kind} cluster but could not read its process count and id from "
                f"{variables} ({type(err).__name__}: {err}); {_OFF_HINT}"
            ) from None
    return None


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


def _mode(mode: str | None) -> str:
    if mode is None:
        text = os.environ.get(ENV_DISTRIBUTED, "").strip().lower()
        if text and text not in MODES:
            raise ValueError(
                f"{ENV_DISTRIBUTED}={text!r}: expected one of {', '.join(MODES)} (it stands for --distributed)"
            )
        return text or "auto"
    if mode not in MODES:
        raise ValueError(f"--distributed {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def _check_process_id(process_id: int | None, num_processes: int, what: str, name: str = "--process-id") -> None:
    if process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"{name} {process_id} is out of range: with {what} it must be 0..{num_processes - 1}")


def initialize(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    local_device_count: int | None = None,
    mode: str | None = None,
) -> None:
    """Join this process to a multi-process JAX run, or do nothing for a single process.

    `mode` is "auto" (detect a cluster when no coordinator is given; the default, also from
    GROK_DISTRIBUTED) or "off". Raises ValueError (naming the flag) for missing, malformed or
    inconsistent values, and RuntimeError when JAX's devices were already in use.
    """
    mode = _mode(mode)
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR, "").strip() or None
    num_processes = _from_env(num_processes, ENV_NUM_PROCESSES, "--num-processes")
    process_id = _from_env(process_id, ENV_PROCESS_ID, "--process-id")
    if local_device_count is not None and local_device_count < 1:
        raise ValueError(f"--cpu-devices must be >= 1, got {local_device_count}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")

    cluster = None
    if coordinator is None and mode == "auto" and num_processes != 1:
        cluster = detect_cluster()
        if cluster is not None and (num_processes or cluster.num_processes) == 1:
            log.debug("%s cluster of one process: nothing to start", cluster.kind)
            cluster = None
    if cluster is not None:
        total = num_processes or cluster.num_processes
        what = f"--num-processes {total}" if num_processes is not None else f"{total} {cluster.kind} processes"
        if process_id is not None:
            _check_process_id(process_id, total, what)
        else:
            _check_process_id(cluster.process_id, total, what, f"the {cluster.kind} process id")
    elif coordinator is None:
        undetected = "; no cluster was detected" if mode == "auto" else " (--distributed is off)"
        if num_processes is not None and num_processes > 1:
            raise ValueError(
                f"--num-processes {num_processes} needs --coordinator HOST:PORT (or {ENV_COORDINATOR}){undetected}"
            )
        if process_id:
            raise ValueError(
                f"--process-id {process_id} needs --coordinator HOST:PORT (or {ENV_COORDINATOR}){undetected}"
            )
        _check_process_id(process_id, 1, "--num-processes 1")
    else:
        _check_address(coordinator)
        if num_processes is None:
            raise ValueError(f"--coordinator needs --num-processes N (or {ENV_NUM_PROCESSES})")
        if process_id is None:
            raise ValueError(f"--coordinator needs --process-id I (or {ENV_PROCESS_ID})")
        _check_process_id(process_id, num_processes, f"--num-processes {num_processes}")

    if local_device_count is not None:
        try:
            jax.config.update("jax_num_cpu_devices", local_device_count)
            jax.config.update("jax_platforms", "cpu")
        except RuntimeError:
            raise RuntimeError(
                "--cpu-devices must take effect before JAX starts its backends, but JAX devices are already in use"
            ) from None
    if cluster is not None:
        # Flags given win over the cluster's values; JAX fills in the rest (and the coordinator).
        explicit = {"num_processes": num_processes, "process_id": process_id}
        explicit = {name: value for name, value in explicit.items() if value is not None}
        log.info("%s cluster detected: joining as process %d of %d", cluster.kind,
                 cluster.process_id if process_id is None else process_id, num_processes or cluster.num_processes)
        jax.distributed.initialize(**explicit)
        _log_joined(cluster.kind)
    elif coordinator is not None:
        log.debug("joining %s as process %d of %d", coordinator, process_id, num_processes)
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        _log_joined("explicit --coordinator")


def _log_joined(kind: str) -> None:
    """After `jax.distributed.initialize`: what this process is part of (starts the backend)."""
    try:
        from jax._src.distributed import global_state

        address = global_state.coordinator_address
    except (ImportError, AttributeError):
        address = None
    log.info(
        "distributed run (%s, coordinator %s): process %d of %d, %d local of %d global devices",
        kind, address or "?", jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
