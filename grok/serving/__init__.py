"""Generation: text in, tokens out, many requests at once.

`api` (`Grok`: load, logits, generate), `engine` (continuous batching over KV-cache slots,
streaming, stops, speculation: host state only), `executor` (the device side: the caches and the one
place the engine's programs run), `pod` (several processes: the leader sends every call to its
followers, which replay it), `programs` (the jitted prefill and decode steps),
`prefix_cache`, `sampling`, `tokenizer`, `chat` (chat templates, in `chat_templates/`).

May import: `grok.checkpoint`, `grok.parallel`, `grok.model` and `grok.native`.
"""
