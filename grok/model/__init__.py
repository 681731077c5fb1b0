"""The model: Grok-1 as Haiku modules and the math under them, on no particular device layout.

`config` (dataclasses and presets), `quant` (8-bit weights and the CPU formats), `ops` (the math),
`transformer` (the Haiku modules, the KV memory, `build`), `weights` (the parameter tree: shapes,
scale blocks, stacked and per-layer layouts).

May import: `grok.native` only.
"""
