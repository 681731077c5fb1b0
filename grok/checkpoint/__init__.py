"""Checkpoints on disk and their way onto devices.

`files` (the directory, its format, the checks every weight passes), `pickles` (the release's
pickles: safe unpickler and writer), `safetensors_format` (the converted format, read by byte
range), `read` (either format, checked against the config), `loader` (straight into shards, or
per layer onto one CPU device), `convert`, `hub` (download and verify), `demo` (the built-in
random checkpoint).

May import: `grok.parallel`, `grok.model` and `grok.native`.
"""
