"""Generation: text in, tokens out, many requests at once.

`api` (`Grok`: load, logits, generate), `engine` (continuous batching over KV-cache slots,
streaming, stops, speculation), `programs` (the engine's jitted prefill and decode steps),
`prefix_cache`, `sampling`, `tokenizer`, `chat` (chat templates, in `chat_templates/`).

May import: `grok.checkpoint`, `grok.parallel`, `grok.model` and `grok.native`.
"""
