"""`python run.py`: the demo end to end, and one-line errors instead of tracebacks."""

import subprocess
import sys
from pathlib import Path

import pytest

from grok import cli
from grok.demo import write_demo_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "grok-1" / "tokenizer.model"


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny model (with the real vocabulary size) in release format, and its JSON config.

    A checkpoint is sharded by default (tensor_parallel over all 8 test devices), so every head
    count and width divides by 8: the "shard" preset.
    """
    from grok.config import PRESETS

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
        (["--top-p", "2"], "top_p must be in (0, 1]"),
        (["--weight-format", "cpu", "--mesh", "data=1,model=16"], "--weight-format cpu needs a single device"),
    ],
)
def test_errors_are_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_tensor_file_is_named(tiny_checkpoint, capsys):
    directory, config = tiny_checkpoint
    (directory / "tensor00007_000").unlink()
    assert cli.main(["--checkpoint", str(directory), "--config", str(config), "--tokenizer", str(TOKENIZER)]) == 2
    err = capsys.readouterr().err
    assert "tensor00007_000" in err and "multi_head_attention/query" in err
