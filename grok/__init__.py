"""Grok-1 inference engine on JAX and Haiku.

Subpackages, each importing only from those listed before it (`tests/test_layout.py` checks):
`native`, `model`, `parallel`, `checkpoint`, `serving`, then `planning` and `server` side by side,
then `cli`. This module re-exports the Python API: `from grok import Grok`.
"""

from grok.model.config import PRESETS, GrokConfig, load_config
from grok.serving.api import Generation, Grok, SamplingParams

__all__ = ["Generation", "Grok", "GrokConfig", "PRESETS", "SamplingParams", "load_config"]
