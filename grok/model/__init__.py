"""The model: Grok-1 as Haiku modules and the math under them, on no particular device layout.

`config` (dataclasses and presets), `quant` (8-bit weights and their CPU and GPU formats), `ops`
(the math), `transformer` (the Haiku modules, the KV memory, `build`), `weights` (the parameter
tree: shapes, scale blocks, stacked and per-layer layouts), `platform` (which kind of device the
model is traced for).

May import: `grok.native` only.
"""
