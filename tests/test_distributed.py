"""Many processes: four CLI processes on localhost (4 CPU devices each, joined by --coordinator) under
the 3-axis expert_tensor_parallel layout generate what one device does.

Also two processes that find each other from a simulated SLURM job step (--distributed auto), the
cluster detection and errors of `grok.parallel.distributed.initialize`, and the sharding / multi-process CLI flags.
"""

import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from processes import checkpoint_with_config, free_port, is_cluster_var, worker_env

from grok import cli
from grok.checkpoint.demo import DEMO_CONFIG
from grok.model.config import PRESETS
from grok.parallel import distributed
from grok.serving.api import Grok, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
# With the preset's embedding scale (sqrt(64) = 8) the random weights' embeddings swamp the layers
# and greedy decoding just repeats the last prompt token; a small scale makes the continuation
# depend on every layer.
CONFIG = PRESETS["shard"].replace(embedding_multiplier_scale=0.05)
PROMPT = [5, 6, 7]
NEW_TOKENS = 8
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def shard_checkpoint(tmp_path_factory):
    return checkpoint_with_config(tmp_path_factory.mktemp("distributed"), CONFIG)


@pytest.fixture
def no_grok_env(monkeypatch):
    """No GROK_* variables and no cluster for JAX to detect (not even a TPU VM's metadata server)."""
    for name in [name for name in os.environ if is_cluster_var(name)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    return monkeypatch


def _token_ids(stdout: str) -> list[int]:
    found = re.findall(r"^Token ids: (\[.*\])$", stdout, re.MULTILINE)
    assert len(found) == 1, f"expected one 'Token ids:' line in:\n{stdout}"
    return json.loads(found[0])


def _run_workers(tmp_path: Path, commands: list[list[str]], envs: list[dict[str, str]], meanwhile):
    """Run one process per command; call `meanwhile()` while they start; wait for all (TIMEOUT_S).

    Returns what `meanwhile` returned and each process's (stdout, stderr); every process must exit 0.
    """
    workers = []
    for i, (command, env) in enumerate(zip(commands, envs)):
        out, err = open(tmp_path / f"out{i}", "w"), open(tmp_path / f"err{i}", "w")
        workers.append((subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=err), out, err))
    try:
        result = meanwhile()
        deadline = time.monotonic() + TIMEOUT_S
        for process, _, _ in workers:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process, out, err in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
            out.close()
            err.close()
    outputs = [((tmp_path / f"out{i}").read_text(), (tmp_path / f"err{i}").read_text()) for i in range(len(workers))]
    for i, ((process, _, _), (_, stderr)) in enumerate(zip(workers, outputs)):
        assert process.returncode == 0, f"process {i} exited with {process.returncode}; stderr:\n{stderr}"
    return result, outputs


def _generate_command(
    directory: Path, config: Path, *flags: str, prompt: list[int] = PROMPT, new_tokens: int = NEW_TOKENS
) -> list[str]:
    return [
        sys.executable, str(ROOT / "run.py"), "generate", "--checkpoint", str(directory), "--config", str(config),
        "--temperature", "0", "--max-new-tokens", str(new_tokens), "--prompt-ids", ",".join(map(str, prompt)), *flags,
    ]


# The demo's shapes (emb 256, 8 query / 2 kv heads, 8 experts, 4 layers) with a small embedding scale:
# with the demo's own scale greedy decoding just repeats the last prompt token, whatever the layout.
# Its logits are bf16 (steps of 0.125 at their size), so top-2 ties are common; this prompt's six
# greedy tokens each lead by >= 1.0 on one device and on both meshes below (checked in the test).
DEMO_LIKE = DEMO_CONFIG.replace(embedding_multiplier_scale=0.05)
DEMO_PROMPT = [312, 327, 104]
DEMO_NEW_TOKENS = 6
MIN_MARGIN = 0.5  # top-1 minus top-2 logit: 4 bf16 steps, well above the layouts' rounding differences


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    return checkpoint_with_config(tmp_path_factory.mktemp("demo_like"), DEMO_LIKE)


@functools.cache
def _one_device_greedy(directory: Path) -> list[int]:
    """The independent baseline: one device, the CLI's default single-device path (CPU weight format)."""
    model = Grok.from_checkpoint(directory, DEMO_LIKE, progress=False)
    tokens = model.generate(DEMO_PROMPT, DEMO_NEW_TOKENS, SamplingParams(temperature=0)).token_ids
    # Every greedy choice must be clear of bf16 noise, else another layout may fairly pick the runner-up.
    logits = model.logits(DEMO_PROMPT + tokens[:-1])[len(DEMO_PROMPT) - 1:]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert logits.argmax(-1).tolist() == tokens, "a full forward pass disagrees with decoding"
    assert (top2[:, 1] - top2[:, 0]).min() >= MIN_MARGIN, f"top-2 logit margins {top2[:, 1] - top2[:, 0]}"
    return tokens


@pytest.mark.parametrize("mesh", ["data=1,expert=2,model=8"])
def test_four_processes_under_expert_tensor_parallel_generate_what_one_device_does(demo_checkpoint, tmp_path, mesh):
    """4 processes x 4 CPU devices: experts split over expert x model, attention over model (the 2 kv
    heads repeated to fill it), batch over data; greedy tokens as on a single device."""
    directory, config = demo_checkpoint
    coordinator = f"127.0.0.1:{free_port()}"
    command = _generate_command(
        directory, config, "--rules", "expert_tensor_parallel", "--mesh", mesh, "--coordinator", coordinator,
        "--num-processes", "4", "--cpu-devices", "4", prompt=DEMO_PROMPT, new_tokens=DEMO_NEW_TOKENS,
    )
    expected, outputs = _run_workers(
        tmp_path, [command + ["--process-id", str(i)] for i in range(4)], [worker_env()] * 4,
        lambda: _one_device_greedy(directory),
    )
    assert len(expected) == DEMO_NEW_TOKENS and len(set(expected)) > 1
    assert _token_ids(outputs[0][0]) == expected
    assert f"mesh {mesh}, 4 process(es), rules " in outputs[0][1]
    assert "4 local of 16 global devices" in outputs[0][1]
    assert all("Token ids" not in out and "Prompt" not in out for out, _ in outputs[1:])  # only process 0 prints


# JAX's SlurmCluster: a job step's coordinator is its first node, port 61440 + SLURM_JOB_ID % 4096.
SLURM_PORTS = (65535 - 2**12 + 1, 65535)


def _slurm_env(job_id: int, num_tasks: int, task: int) -> dict[str, str]:
    """What srun sets for task `task` of a one-node job step (all JAX reads, and their neighbours)."""
    return {
        "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_STEP_ID": "0",
        "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NNODES": "1", "SLURM_STEP_NUM_NODES": "1", "SLURM_NTASKS": str(num_tasks),
        "SLURM_STEP_NUM_TASKS": str(num_tasks), "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
        "SLURM_NODEID": "0",
    }


def test_two_processes_join_a_slurm_job_step_by_themselves(shard_checkpoint, tmp_path):
    """No --coordinator: each process finds the others from its SLURM variables, as under `srun -n 2`."""
    directory, config = shard_checkpoint
    port = free_port(*SLURM_PORTS)
    job_id = 4096 * 321 + port - SLURM_PORTS[0]
    command = _generate_command(directory, config, "--rules", "replicated", "--cpu-devices", "2")
    commands = [command + ["--distributed", "auto"], command]  # auto is also the default
    envs = [{**worker_env(), **_slurm_env(job_id, 2, i)} for i in range(2)]

    def meanwhile():
        greedy = SamplingParams(temperature=0)
        return Grok.from_checkpoint(directory, CONFIG, progress=False).generate(PROMPT, NEW_TOKENS, greedy).token_ids

    expected, outputs = _run_workers(tmp_path, commands, envs, meanwhile)
    assert len(expected) == NEW_TOKENS and len(set(expected)) > 1
    assert _token_ids(outputs[0][0]) == expected
    assert "Token ids" not in outputs[1][0]  # only process 0 prints
    for i, (_, stderr) in enumerate(outputs):
        assert f"INFO SLURM cluster detected: joining as process {i} of 2" in stderr
        assert (
            f"INFO distributed run (SLURM, coordinator localhost:{port}): process {i} of 2, "
            "2 local of 4 global devices"
        ) in stderr


# --- grok.parallel.distributed.initialize, without starting anything --------------------------------------


@pytest.fixture
def calls(no_grok_env):
    """Record what `initialize` asks of JAX instead of doing it."""
    recorded = []
    no_grok_env.setattr(jax.distributed, "initialize", lambda **kwargs: recorded.append(("initialize", kwargs)))
    no_grok_env.setattr(jax.config, "update", lambda name, value: recorded.append((name, value)))
    return recorded


def test_a_single_process_starts_nothing(calls):
    distributed.initialize(None, None, None)
    distributed.initialize(None, 1, 0)
    assert calls == []


def test_initialize_passes_flags_and_cpu_devices(calls):
    distributed.initialize("10.0.0.1:1234", 4, 3, local_device_count=2)
    assert calls == [
        ("jax_num_cpu_devices", 2),
        ("jax_platforms", "cpu"),
        ("initialize", dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)),
    ]


def test_initialize_falls_back_to_the_environment(calls, monkeypatch):
    monkeypatch.setenv("GROK_COORDINATOR", "host:99")
    monkeypatch.setenv("GROK_NUM_PROCESSES", "2")
    monkeypatch.setenv("GROK_PROCESS_ID", "1")
    distributed.initialize(None, None, None)
    distributed.initialize(None, None, 0)  # a flag wins over its variable
    assert calls == [
        ("initialize", dict(coordinator_address="host:99", num_processes=2, process_id=1)),
        ("initialize", dict(coordinator_address="host:99", num_processes=2, process_id=0)),
    ]


@pytest.mark.parametrize(
    "args,env,message",
    [
        (("h:1", None, 0), {}, "--coordinator needs --num-processes N (or GROK_NUM_PROCESSES)"),
        (("h:1", 2, None), {}, "--coordinator needs --process-id I (or GROK_PROCESS_ID)"),
        (("h:1", 2, 2), {}, "--process-id 2 is out of range: with --num-processes 2 it must be 0..1"),
        (("h:1", 2, -1), {}, "--process-id -1 is out of range"),
        (("h:1", 0, 0), {}, "--num-processes must be >= 1"),
        (("h", 2, 0), {}, "--coordinator 'h': expected HOST:PORT"),
        ((None, 2, 0), {}, "--num-processes 2 needs --coordinator HOST:PORT (or GROK_COORDINATOR)"),
        ((None, None, 1), {}, "--process-id 1 needs --coordinator"),
        ((None, None, None), {"GROK_NUM_PROCESSES": "two"}, "GROK_NUM_PROCESSES='two' is not an integer"),
        ((None, None, None), {"GROK_COORDINATOR": "h:1", "GROK_NUM_PROCESSES": "2"}, "--process-id I"),
    ],
)
def test_initialize_errors_name_the_flag(calls, monkeypatch, args, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.initialize(*args)
    assert calls == []


def test_cpu_devices_after_jax_started_is_an_error(no_grok_env):
    jax.devices()  # the backend is up (8 devices from conftest)
    with pytest.raises(RuntimeError, match="--cpu-devices must take effect before JAX starts"):
        distributed.initialize(None, None, None, local_device_count=3)
    with pytest.raises(ValueError, match="--cpu-devices must be >= 1"):
        distributed.initialize(None, None, None, local_device_count=0)


# --- cluster detection (--distributed auto), without starting anything -------------------------


def _set(monkeypatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


OMPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}


def test_detect_cluster_uses_jax_s_own_detection(no_grok_env):
    from jax._src import clusters

    assert distributed.detect_cluster() is None
    _set(no_grok_env, _slurm_env(77, 2, 1))
    assert distributed.detect_cluster() == distributed.Cluster("SLURM", 2, 1)
    assert clusters.SlurmCluster.get_coordinator_address(None, None) == f"localhost:{61440 + 77}"
    no_grok_env.delenv("SLURM_STEP_NODELIST")  # only some SLURM variables (no job step): no cluster
    assert distributed.detect_cluster() is None
    _set(no_grok_env, OMPI)
    assert distributed.detect_cluster() == distributed.Cluster("Open MPI", 4, 3)


def test_auto_calls_initialize_with_no_arguments(calls, monkeypatch):
    _set(monkeypatch, _slurm_env(77, 2, 1))
    distributed.initialize(None, None, None, local_device_count=2)
    distributed.initialize(None, None, None, mode="auto")
    assert calls == [("jax_num_cpu_devices", 2), ("jax_platforms", "cpu"), ("initialize", {}), ("initialize", {})]


def test_flags_win_over_the_cluster(calls, monkeypatch):
    _set(monkeypatch, _slurm_env(77, 2, 1))
    distributed.initialize("10.0.0.1:1234", 4, 3)  # an explicit coordinator: no detection at all
    distributed.initialize(None, None, 0)  # the rest from SLURM
    distributed.initialize(None, 3, 2)
    distributed.initialize(None, 1, None)  # one process: nothing to start
    monkeypatch.setenv("GROK_COORDINATOR", "host:99")
    monkeypatch.setenv("GROK_NUM_PROCESSES", "2")
    distributed.initialize(None, None, 0)
    assert calls == [
        ("initialize", dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)),
        ("initialize", dict(process_id=0)),
        ("initialize", dict(num_processes=3, process_id=2)),
        ("initialize", dict(coordinator_address="host:99", num_processes=2, process_id=0)),
    ]


def test_off_and_one_process_clusters_start_nothing(calls, monkeypatch):
    _set(monkeypatch, _slurm_env(77, 2, 1))
    distributed.initialize(None, None, None, mode="off")
    monkeypatch.setenv("GROK_DISTRIBUTED", "off")
    distributed.initialize(None, None, None)
    distributed.initialize(None, None, None, mode="off")
    monkeypatch.delenv("GROK_DISTRIBUTED")
    _set(monkeypatch, _slurm_env(77, 1, 0))  # `srun -n 1`: every GPU of the node, no coordinator
    distributed.initialize(None, None, None)
    assert calls == []


def test_auto_logs_what_it_found(calls, monkeypatch, caplog):
    _set(monkeypatch, OMPI)
    with caplog.at_level("INFO", logger="grok"):
        distributed.initialize(None, None, None)
    assert calls == [("initialize", {})]
    assert "Open MPI cluster detected: joining as process 3 of 4" in caplog.text
    # (initialize is not really called here: this process is still alone with conftest's devices)
    assert "distributed run (Open MPI, coordinator " in caplog.text
    assert f"process 0 of 1, {jax.device_count()} local of {jax.device_count()} global devices" in caplog.text


@pytest.mark.parametrize(
    "args,env,message",
    [
        ((None, None, 2), _slurm_env(7, 2, 0), "--process-id 2 is out of range: with 2 SLURM processes it must be"),
        ((None, 3, 5), _slurm_env(7, 2, 0), "--process-id 5 is out of range: with --num-processes 3 it must be 0..2"),
        ((None, None, None), _slurm_env(7, 2, 2), "the SLURM process id 2 is out of range: with 2 SLURM processes"),
        ((None, None, None), {**_slurm_env(7, 2, 0), "SLURM_NTASKS": "two"},
         "--distributed auto: found a SLURM cluster but could not read its process count and id from SLURM_NTASKS, "
         "SLURM_PROCID (ValueError: invalid literal for int() with base 10: 'two'); pass --distributed off (or "
         "GROK_DISTRIBUTED=off) to run as a single process"),
        ((None, 2, 0), {},
         "--num-processes 2 needs --coordinator HOST:PORT (or GROK_COORDINATOR); no cluster was detected"),
        ((None, None, 1), _slurm_env(7, 2, 0) | {"GROK_DISTRIBUTED": "off"}, "needs --coordinator HOST:PORT (or "
         "GROK_COORDINATOR) (--distributed is off)"),
        ((None, None, None), {"GROK_DISTRIBUTED": "on"}, "GROK_DISTRIBUTED='on': expected one of auto, off"),
    ],
)
def test_detection_errors_name_the_flag_or_variable(calls, monkeypatch, args, env, message):
    _set(monkeypatch, env)
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.initialize(*args)
    with pytest.raises(ValueError, match=re.escape("--distributed 'on': expected one of auto, off")):
        distributed.initialize(None, None, None, mode="on")
    assert calls == []


# --- the CLI flags ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--coordinator", "127.0.0.1:1234"], "--coordinator needs --num-processes N"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"], "--coordinator needs --process-id I"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "5"], "--process-id 5 is out"),
        (["--num-processes", "4"], "--num-processes 4 needs --coordinator"),
        (["--cpu-devices", "0"], "--cpu-devices must be >= 1"),
        (["--process-id", "1"], "--process-id 1 needs --coordinator HOST:PORT (or GROK_COORDINATOR); no cluster"),
        (["--mesh", "data=2"], "--mesh 'data=2': no shipped rules have the axes data; give --rules"),
            (["--mesh", "data=1,model=16", "--rules", "expert_tensor_parallel"], "--mesh 'data=1,model=16' does not match"),
        (["--mesh", "data=x,model=8"], "expected AXIS=N pairs with positive sizes"),
        (["--mesh", "data=2,model=2"], "mesh data=2,model=2 needs 4 devices, there are 16"),
        (["--rules", "no_such_rules"], "unknown partition rules 'no_such_rules'"),
        (["--rules", "/nonexistent/rules.toml"], "partition rules file /nonexistent/rules.toml does not exist"),
        (["--prompt-ids", "5,x"], "--prompt-ids '5,x': expected comma-separated token ids"),
    ],
)
def test_flag_errors_are_one_line(args, message, no_grok_env, tmp_path, capsys):
    no_grok_env.chdir(tmp_path)  # no checkpoints/ here: the demo
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--distributed", "off", "--process-id", "1"], _slurm_env(7, 2, 1), "(--distributed is off)"),
        ([], {**_slurm_env(7, 2, 1), "SLURM_PROCID": "x"}, "could not read its process count and id from SLURM_NTASKS"),
        ([], {**_slurm_env(7, 2, 0), "GROK_DISTRIBUTED": "yes"}, "GROK_DISTRIBUTED='yes': expected one of auto, off"),
    ],
)
def test_cluster_errors_are_one_line(args, env, message, no_grok_env, tmp_path, capsys):
    no_grok_env.chdir(tmp_path)
    _set(no_grok_env, env)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_distributed_takes_auto_or_off(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--distributed", "on"])
    assert exit.value.code == 2
    assert "invalid choice: 'on'" in capsys.readouterr().err


def test_sharding_errors_are_one_line(no_grok_env, tmp_path, capsys):
    """A ShardingError found while loading: the demo's weights cannot be split over every device."""
    no_grok_env.chdir(tmp_path)
    assert cli.main(["--rules", "tensor_parallel", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "reading" not in line]  # not the progress bar
    assert "Traceback" not in err and len(lines) == 1
    assert lines[0].startswith("error: ") and re.search(r"cannot be split \d+ ways", lines[0])


def test_prompt_and_prompt_ids_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--prompt", "hi", "--prompt-ids", "5"])
    assert exit.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--mesh", "--rules", "--coordinator", "--num-processes", "--process-id", "--cpu-devices",
                 "--prompt-ids", "GROK_COORDINATOR", "GROK_NUM_PROCESSES", "GROK_PROCESS_ID", "--distributed",
                 "GROK_DISTRIBUTED", "SLURM"):
        assert flag in out
