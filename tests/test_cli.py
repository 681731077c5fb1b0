"""`python run.py`: the demo end to end, and one-line errors instead of tracebacks."""

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from grok import cli
from grok.checkpoint.demo import write_demo_checkpoint
from grok.model.config import PRESETS
from grok.serving.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "grok-1" / "tokenizer.model"


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny model (with the real vocabulary size) in release format, and its JSON config.

    A checkpoint is sharded by default (tensor_parallel over all 8 test devices), so every head
    count and width divides by 8: the "shard" preset.
    """
    from grok.model.config import PRESETS

    if not TOKENIZER.is_file():
        pytest.skip("needs ../shared/grok-1/tokenizer.model")
    config = PRESETS["shard"].replace(vocab_size=131072)
    path = tmp_path / "tiny.json"
    path.write_text(config.to_json())
    return write_demo_checkpoint(tmp_path / "ckpt-0", config), path


def test_demo_runs_end_to_end(tmp_path):
    """No arguments, no checkpoint: writes random int8 weights, loads them back, samples."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--max-new-tokens", "8"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stdout
    assert "Output:" in result.stdout and "8 tokens" in result.stdout and "Token ids: [" in result.stdout


def test_cli_generates_from_a_checkpoint_with_a_json_config(tiny_checkpoint, capsys):
    directory, config = tiny_checkpoint
    args = ["--checkpoint", str(directory.parent), "--config", str(config), "--tokenizer", str(TOKENIZER)]
    assert cli.main(args + ["--prompt", "hello world", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "Prompt: hello world" in out and "3 tokens" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint", "/nonexistent/ckpt"], "checkpoint directory /nonexistent/ckpt does not exist"),
        (["--checkpoint", ".", "--tokenizer", "/nonexistent/t.model"], "tokenizer file /nonexistent/t.model"),
        (["--checkpoint", ".", "--config", "grok-9"], "unknown config 'grok-9'"),
        (["--top-p", "2"], "argument --top-p: must be a number in (0, 1], got '2'"),
        (["--weight-format", "cpu", "--mesh", "data=1,model=16"], "--weight-format cpu needs a single device"),
    ],
)
def test_errors_are_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert exit_status(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_tensor_file_is_named(tiny_checkpoint, capsys):
    directory, config = tiny_checkpoint
    (directory / "tensor00007_000").unlink()
    assert cli.main(["--checkpoint", str(directory), "--config", str(config), "--tokenizer", str(TOKENIZER)]) == 2
    err = capsys.readouterr().err
    assert "tensor00007_000" in err and "multi_head_attention/query" in err


def exit_status(args: list[str]) -> int:
    """What `run.py ARGS` exits with: `cli.main`'s return value, or the status argparse exits with."""
    try:
        return cli.main(args)
    except SystemExit as exit:
        return exit.code


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """Fails the test if a command gets past its flag checks (to loading a model or starting JAX)."""
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here: the demo's config

    def refuse(*args, **kwargs):
        pytest.fail("the flags were accepted")

    monkeypatch.setattr(cli, "_load_model", refuse)
    monkeypatch.setattr(cli.distributed, "initialize", refuse)


@pytest.mark.parametrize(
    "args,message",
    [
        (["serve", "--max-batch", "0"], "argument --max-batch: must be an integer >= 1, got '0'"),
        (["serve", "--max-batch", "-1"], "argument --max-batch: must be an integer >= 1, got '-1'"),
        (["serve", "--max-batch", "two"], "argument --max-batch: must be an integer >= 1, got 'two'"),
        (["serve", "--port", "99999"], "argument --port: must be an integer in 1..65535, got '99999'"),
        (["serve", "--cache-len", "0"], "argument --cache-len: must be an integer >= 1, got '0'"),
        (["serve", "--cache-len", "257"], "--cache-len must be in 1..256 (the config's sequence_len), got 257"),
        (["serve", "--max-queue", "0"], "argument --max-queue: must be an integer >= 1, got '0'"),
        (["serve", "--prefill-budget", "0"], "argument --prefill-budget: must be an integer >= 1, got '0'"),
        (["serve", "--prefill-budget", "many"], "argument --prefill-budget: must be an integer >= 1, got 'many'"),
        (["serve", "--prefix-cache-mb", "-1"], "argument --prefix-cache-mb: must be a number >= 0, got '-1'"),
        (["serve", "--speculate", "-2"], "argument --speculate: must be an integer >= 0, got '-2'"),
        (["serve", "--speculate-max-batch", "0"], "argument --speculate-max-batch: must be an integer >= 1, got '0'"),
        (["generate", "--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got '0'"),
        (["--top-k", "-1"], "argument --top-k: must be an integer in 0..2147483647, got '-1'"),
        (["--top-p", "0"], "argument --top-p: must be a number in (0, 1], got '0'"),
        (["--temperature", "nan"], "argument --temperature: must be a number >= 0, got 'nan'"),
        (["--temperature", "-0.5"], "argument --temperature: must be a number >= 0, got '-0.5'"),
        (["--temperature", "1e999"], "argument --temperature: must be a number >= 0, got '1e999'"),
        (["--top-k", "9" * 30], f"argument --top-k: must be an integer in 0..2147483647, got '{'9' * 30}'"),
        (["--seed", "-1"], "argument --seed: must be an integer in 0..4294967295, got '-1'"),
        (["plan", "--batch", "0"], "argument --batch: must be an integer >= 1, got '0'"),
        (["plan", "--cache-len", "0"], "argument --cache-len: must be an integer >= 1, got '0'"),
        (["plan", "--cpu-devices", "-8"], "argument --cpu-devices/--devices: must be an integer >= 1, got '-8'"),
        (["serve", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_out_of_range_flags_are_one_line_errors(no_model, args, message, capsys):
    """Checked as the flags are parsed (argparse `type`s), or, for limits that depend on the config,
    before anything slow; the many-process flags are checked by `distributed.initialize`."""
    assert exit_status(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flag,env", [(["--api-key", ""], {}), ([], {"GROK_API_KEY": ""}), (["--api-key", " "], {})])
def test_empty_api_key_is_an_error(no_model, monkeypatch, capsys, flag, env):
    """An empty key would turn authentication off; a missing one is the way to say so."""
    monkeypatch.delenv("GROK_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve", *flag]) == 2
    err = capsys.readouterr().err
    source = "--api-key" if flag else "$GROK_API_KEY"
    assert f"error: {source} is empty" in err and err.count("\n") == 1, err


def test_bad_config_file_is_a_one_line_error_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.distributed, "initialize", lambda *args, **kwargs: pytest.fail("got past the config"))
    (tmp_path / "bad.json").write_text(json.dumps({**dataclasses.asdict(PRESETS["tiny"]), "num_layers": 0}))
    assert cli.main(["--checkpoint", str(tmp_path), "--config", "bad.json"]) == 2
    err = capsys.readouterr().err
    assert "bad.json: invalid config: num_layers must be > 0, got 0" in err and err.count("\n") == 1, err


def test_engine_rejects_an_empty_batch_and_cache():
    """For API users as for the CLI: 0 slots would never serve, cache_len 0 is not "the whole context"."""
    stub = types.SimpleNamespace(config=PRESETS["tiny"])  # checked before the model is touched
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        Engine(stub, max_batch=0)
    with pytest.raises(ValueError, match="cache_len must be in 1..64, got 0"):
        Engine(stub, max_batch=1, cache_len=0)


def test_byte_tokenizer_takes_text_prompts_for_a_demo_checkpoint(tmp_path, capsys):
    """`--tokenizer bytes`: the demo's byte-level tokenizer, for a checkpoint written with its vocabulary."""
    config = PRESETS["shard"].replace(vocab_size=PRESETS["demo"].vocab_size)  # shards over the test devices
    (tmp_path / "demo.json").write_text(config.to_json())
    write_demo_checkpoint(tmp_path / "ckpt-0", config)
    args = ["--checkpoint", str(tmp_path), "--config", str(tmp_path / "demo.json"), "--tokenizer", "bytes"]
    assert cli.main(args + ["--prompt", "hé", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "Prompt: hé" in out and "Output: " in out and "2 tokens" in out
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert "--tokenizer FILE|bytes" in capsys.readouterr().out  # documented


@pytest.mark.parametrize("command", ["generate", "serve", "plan", "download", "convert"])
def test_every_commands_help_prints(command, capsys):
    """A literal % in a help text breaks argparse's formatting (it must be %%)."""
    assert exit_status([command, "--help"]) == 0
    assert "usage: run.py" in capsys.readouterr().out
