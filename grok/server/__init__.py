"""The OpenAI-compatible HTTP layer over the serving engine (Starlette on uvicorn): request schemas,
answer formats, metrics, the app and its routes, and running it (`grok.server.lifecycle.serve`).

It may import `grok.serving` and the packages below it (`grok.model`, `grok.parallel`,
`grok.checkpoint`, `grok.native`), never `grok.cli` or `grok.planning`. Inside, modules import one
way only: schema, formats, metrics, body, streams, handlers, app, lifecycle (each only earlier ones).
"""
