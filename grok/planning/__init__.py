"""Planning a pod: the engine's programs compiled ahead of time, with no weights and no devices.

`aot` (abstract inputs and the lowered prefill and decode steps), `plan` (layouts for a device
count and the per-device memory of each), `targets` (GPUs and TPUs compiled for by their own
compilers, devicelessly), `traffic` (the bytes a compiled program moves, from its optimized HLO),
`roofline` (a decode step's ideal bytes, and how close it comes).

May import: `grok.serving` and everything below it; not `grok.server` or `grok.cli`.
"""
