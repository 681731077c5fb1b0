"""Many processes: two CLI processes on localhost (4 CPU devices each) generate what one process does.

Also the errors of `grok.distributed.initialize` and of the sharding / multi-process CLI flags.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from grok import cli, distributed
from grok.api import Grok, SamplingParams
from grok.config import PRESETS
from grok.demo import write_demo_checkpoint
from grok.sharding import Sharder, load_rules, make_mesh

ROOT = Path(__file__).resolve().parents[1]
# Every head count and width divides by 8, so tensor_parallel fits model=8. With the preset's
# embedding scale (sqrt(64) = 8) the random weights' embeddings swamp the layers and greedy decoding
# just repeats the last prompt token; a small scale makes the continuation depend on every layer.
CONFIG = PRESETS["shard"].replace(embedding_multiplier_scale=0.05)
PROMPT = [5, 6, 7]
NEW_TOKENS = 8
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def shard_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    config = tmp / "shard.json"
    config.write_text(CONFIG.to_json())
    return write_demo_checkpoint(tmp / "ckpt-0", CONFIG), config


@pytest.fixture
def no_grok_env(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_env() -> dict[str, str]:
    """This environment for a CLI process: CPU only, and its device count set by --cpu-devices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GROK_")}
    env["JAX_PLATFORMS"] = "cpu"
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def _token_ids(stdout: str) -> list[int]:
    found = re.findall(r"^Token ids: (\[.*\])$", stdout, re.MULTILINE)
    assert len(found) == 1, f"expected one 'Token ids:' line in:\n{stdout}"
    return json.loads(found[0])


def test_two_processes_generate_what_one_process_does(shard_checkpoint, tmp_path):
    directory, config = shard_checkpoint
    coordinator = f"127.0.0.1:{_free_port()}"
    command = [
        sys.executable, str(ROOT / "run.py"), "generate", "--checkpoint", str(directory), "--config", str(config),
        "--mesh", "data=1,model=8", "--rules", "tensor_parallel", "--coordinator", coordinator,
        "--num-processes", "2", "--cpu-devices", "4", "--temperature", "0",
        "--max-new-tokens", str(NEW_TOKENS), "--prompt-ids", ",".join(map(str, PROMPT)),
    ]
    workers = []
    for i in range(2):
        out, err = open(tmp_path / f"out{i}", "w"), open(tmp_path / f"err{i}", "w")
        process = subprocess.Popen(
            command + ["--process-id", str(i)], cwd=tmp_path, env=_worker_env(), stdout=out, stderr=err
        )
        workers.append((process, out, err))
    try:
        # While they start and compile: the same model in this process (8 devices), sharded and not.
        greedy = SamplingParams(temperature=0)
        sharder = Sharder(load_rules("tensor_parallel"), make_mesh(1, 8))
        sharded = Grok.from_checkpoint(directory, CONFIG, sharder=sharder, progress=False)
        expected = sharded.generate(PROMPT, NEW_TOKENS, greedy).token_ids
        single = Grok.from_checkpoint(directory, CONFIG, progress=False).generate(PROMPT, NEW_TOKENS, greedy).token_ids
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
    stdout = [(tmp_path / f"out{i}").read_text() for i in range(2)]
    for i, (process, _, _) in enumerate(workers):
        stderr = (tmp_path / f"err{i}").read_text()
        assert process.returncode == 0, f"process {i} exited with {process.returncode}; stderr:\n{stderr}"
    assert len(jax.devices()) == 8
    assert single == expected and len(expected) == NEW_TOKENS and len(set(expected)) > 1
    assert _token_ids(stdout[0]) == expected
    assert "Token ids" not in stdout[1] and "Prompt" not in stdout[1]  # only process 0 prints


# --- grok.distributed.initialize, without starting anything --------------------------------------


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


# --- the CLI flags ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--coordinator", "127.0.0.1:1234"], "--coordinator needs --num-processes N"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"], "--coordinator needs --process-id I"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "5"], "--process-id 5 is out"),
        (["--num-processes", "4"], "--num-processes 4 needs --coordinator"),
        (["--cpu-devices", "0"], "--cpu-devices must be >= 1"),
        (["--mesh", "data=2"], "--mesh 'data=2': give both axes"),
        (["--mesh", "data=x,model=8"], "expected data=N,model=M"),
        (["--mesh", "data=2,model=2"], "mesh data=2,model=2 needs 4 devices, there are 8"),
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


def test_sharding_errors_are_one_line(no_grok_env, tmp_path, capsys):
    """A ShardingError found while loading: the demo's 2 key/value heads cannot be split 8 ways."""
    no_grok_env.chdir(tmp_path)
    assert cli.main(["--rules", "tensor_parallel", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "reading" not in line]  # not the progress bar
    assert "Traceback" not in err and len(lines) == 1
    assert lines[0].startswith("error: ") and "cannot be split 8 ways" in lines[0]


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
                 "--prompt-ids", "GROK_COORDINATOR", "GROK_NUM_PROCESSES", "GROK_PROCESS_ID"):
        assert flag in out
