"""Grok-1 inference engine on JAX and Haiku."""

from grok.api import Generation, Grok, SamplingParams  # noqa: F401  (re-exported)
from grok.config import PRESETS, GrokConfig, load_config

__all__ = ["Generation", "Grok", "GrokConfig", "PRESETS", "SamplingParams", "load_config"]
