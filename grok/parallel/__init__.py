"""Devices and processes: where the numbers live, never what they are.

`sharding` (regex partition rules from `partition_rules/*.toml`, meshes, the `Sharder` that
places parameters, activations and the KV cache), `distributed` (multi-process start-up under
`jax.distributed`), `threads` (XLA:CPU's thread pool and the native kernels' limit), `wire`
(messages between processes: JSON and raw array bytes, never a pickle), `channel` (a pod's leader
and followers over TCP: handshake, heartbeats, a lost peer reported).

May import: `grok.model` and `grok.native`.
"""
