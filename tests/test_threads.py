"""`--threads N`: XLA:CPU's thread pool (PJRT_NPROC, read when JAX creates the CPU backend) and the
native kernels' limit (`grok.native.set_threads`), from the command line."""

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from grok import cli, native
from grok.parallel import threads

ROOT = Path(__file__).resolve().parents[1]
CPUS = threads.available_cpus()


@pytest.fixture
def commands(monkeypatch):
    """Runs `cli.main` up to the command, which only records its arguments; the thread settings the
    call makes (environment, native limit) are undone afterwards."""
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(native, "_threads", native.threads())
    ran = {}

    def record(name):
        def command(args):
            ran[name] = args
            return 0

        return command

    for name in ("generate", "serve", "bench"):
        monkeypatch.setattr(cli, name, record(name))
    return ran


def test_the_flag_parses_on_the_model_commands():
    parser = cli.build_parser()
    for command in ("generate", "serve"):
        assert parser.parse_args([command, "--threads", "3"]).threads == 3
        assert parser.parse_args([command]).threads is None  # the default is resolved when applied


@pytest.mark.parametrize("command", [["generate"], ["serve"], []])
def test_the_count_reaches_xla_and_the_native_kernels(commands, command):
    assert cli.main([*command, "--threads", "1"]) == 0
    assert os.environ[threads.ENV] == "1"
    assert native.threads() == 1
    assert commands[command[0] if command else "generate"].threads == 1


def test_the_default_is_the_cpus_this_process_may_use(commands):
    assert cli.main(["generate"]) == 0
    assert CPUS == len(os.sched_getaffinity(0))
    assert os.environ[threads.ENV] == str(CPUS)
    assert native.threads() == CPUS


@pytest.mark.parametrize("flags", [["--threads", "2"], ["--threads=2"]])
def test_bench_takes_the_flag_and_passes_on_the_rest(commands, flags):
    assert cli.main(["bench", "--layers", "3", *flags, "--batches", "1", "8"]) == 0
    assert commands["bench"].bench_args == ["--layers", "3", "--batches", "1", "8"]
    assert os.environ[threads.ENV] == "2" and native.threads() == 2


def test_commands_that_run_no_model_leave_threads_alone(commands, monkeypatch):
    monkeypatch.setattr(cli, "download", lambda args: 0)
    assert cli.main(["download"]) == 0
    assert threads.ENV not in os.environ


def test_more_threads_than_cpus_is_allowed_with_a_warning(commands, caplog):
    with caplog.at_level(logging.WARNING, logger="grok"):
        assert cli.main(["generate", "--threads", str(CPUS + 1)]) == 0
    assert os.environ[threads.ENV] == str(CPUS + 1) and native.threads() == CPUS + 1
    assert f"--threads {CPUS + 1} is more than the {CPUS} CPUs" in caplog.text


@pytest.mark.parametrize(
    "args,value",
    [
        (["--threads", "0"], "0"),
        (["serve", "--threads", "-2"], "-2"),
        (["generate", "--threads", "two"], "two"),
        (["--threads", "1.5"], "1.5"),
        (["bench", "--threads", "0"], "0"),
        (["bench", "--threads=x"], "x"),
    ],
)
def test_a_bad_count_is_a_one_line_error_naming_the_flag(commands, capsys, args, value):
    with pytest.raises(SystemExit) as exit:
        cli.main(args)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --threads: must be an integer >= 1, got '{value}'" in err and err.count("\n") == 1, err
    assert not commands and threads.ENV not in os.environ


def test_bench_threads_without_a_value_is_an_error(commands, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench", "--threads"])
    assert exit.value.code == 2 and "argument --threads: expected one argument" in capsys.readouterr().err


def test_help_says_what_it_controls(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--threads N threads for the work on CPUs: XLA:CPU's thread pool and the native kernels" in out
    assert f"{CPUS} here" in out


def test_xla_pool_needs_a_thread_per_device():
    assert threads.xla_pool_size(2) == 2
    assert threads.xla_pool_size(2, 8) == 8
    assert threads.xla_pool_size(1000) == 256


# A fresh process (JAX's CPU backend not yet created): `run.py generate --threads N`'s wiring, up to
# a computation, then the threads of XLA's intra-op pool ("tf_XLAEigen", the pool FFI kernels get).
CHILD = textwrap.dedent(
    """
    import os, sys
    from grok import cli, native

    def generate(args):
        import jax, jax.numpy as jnp

        (jnp.ones((256, 256)) @ jnp.ones((256, 256))).block_until_ready()
        names = []
        for task in os.listdir("/proc/self/task"):
            try:
                names.append(open(f"/proc/self/task/{task}/comm").read().strip())
            except OSError:
                pass
        print("pool", names.count("tf_XLAEigen"), "native", native.threads(), "env", os.environ["PJRT_NPROC"])
        return 0

    cli.generate = generate
    sys.exit(cli.main(sys.argv[1:]))
    """
)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
@pytest.mark.parametrize("count", [1, CPUS + 1])
def test_xla_really_uses_the_count(count, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", threads.ENV, "NPROC")}  # one device
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", CHILD, "generate", "--threads", str(count)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"pool {count} native {count} env {count}" in result.stdout, result.stdout + result.stderr


def test_bench_help_is_the_benchmarks(commands):
    assert cli.main(["bench", "--help"]) == 0
    assert commands["bench"].bench_args == ["--help"]
