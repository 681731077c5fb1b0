"""The built-in demo: a small Grok-shaped model with random int8 weights, in the release format."""

from __future__ import annotations

from pathlib import Path

from grok.checkpoint import pickles
from grok.model import weights
from grok.model.config import PRESETS, GrokConfig

DEMO_CONFIG: GrokConfig = PRESETS["demo"]


def write_demo_checkpoint(directory: str | Path, config: GrokConfig = DEMO_CONFIG, seed: int = 0) -> Path:
    """Write random weights for `config` to `directory` as release-format tensor files."""
    directory = Path(directory)
    pickles.write_checkpoint(weights.random_params(config, seed), directory, progress=False)
    return directory
