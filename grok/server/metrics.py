"""Prometheus metrics of an app (`Metrics`, served at `/metrics`): requests by endpoint and status
(counted by the `_CountRequests` middleware), tokens, finished choices, time to first token, and
the engine's batch, queue, prefix cache and counts read live."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from grok.serving.engine import Engine
from grok.serving.pod import Pod

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Prometheus metrics of one app, in their own registry."""

    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "grok_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter("grok_prompt_tokens", "Prompt tokens of accepted requests", registry=registry)
        self.generated_tokens = Counter("grok_generated_tokens", "Completion tokens generated", registry=registry)
        self.finished = Counter(
            "grok_choices_finished", "Choices (streams) ended, by engine finish reason", ["reason"], registry=registry
        )
        self.cancelled = Counter(
            "grok_requests_cancelled", "Requests ended early: client disconnected or server shutting down",
            registry=registry,
        )
        self.ttft = Histogram(
            "grok_time_to_first_token_seconds", "From acceptance to the first generated token, per choice",
            buckets=TTFT_BUCKETS, registry=registry,
        )
        Gauge("grok_queue_depth", "Streams waiting for a batch slot", registry=registry).set_function(
            lambda: engine.queued
        )
        Gauge("grok_active_slots", "Batch slots generating", registry=registry).set_function(lambda: engine.active)
        Gauge("grok_batch_slots", "Batch slots in the engine (max_batch)", registry=registry).set(engine.max_batch)
        Gauge("grok_batch_occupancy", "Active slots / max_batch", registry=registry).set_function(
            lambda: engine.active / max(engine.max_batch, 1)
        )
        registry.register(_EngineCounts(engine))
        pod = engine.grok.pod
        if pod is not None:
            registry.register(_PodCounts(pod))
        if engine.prefix_cache is not None:
            cache = engine.prefix_cache
            Gauge("grok_prefix_cache_blocks", "Blocks the prefix cache holds", registry=registry).set_function(
                lambda: cache.used
            )
            Gauge("grok_prefix_cache_capacity_blocks", "Blocks the prefix cache can hold", registry=registry).set(
                cache.capacity
            )


class _EngineCounts(Collector):
    """The engine's own counts (`Engine.stats`) as Prometheus counters."""

    HELP = {
        "prefill_tokens": "Prompt tokens prefilled (computed)",
        "prefix_hit_tokens": "Prompt tokens restored from the prefix cache instead of computed",
        "decode_steps": "Decode steps run",
        "speculative_steps": "Decode steps that verified proposed tokens",
        "proposed": "Tokens proposed by prompt lookup",
        "accepted": "Proposed tokens accepted",
    }

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        for key, text in self.HELP.items():
            name = "grok_speculative_tokens_" + key if key in ("proposed", "accepted") else "grok_" + key
            yield CounterMetricFamily(name, text, value=self.engine.stats[key])


class _PodCounts(Collector):
    """On a pod's leader: what it sent its followers (`grok.serving.pod.Pod`)."""

    def __init__(self, pod: Pod):
        self.pod = pod

    def collect(self):
        yield CounterMetricFamily("grok_pod_messages", "Messages sent to the followers (device calls and their "
                                  "executors' opening and closing)", value=self.pod.messages)
        yield CounterMetricFamily("grok_pod_sent_bytes", "Bytes sent to each follower", value=self.pod.sent_bytes)


class _CountRequests:
    """ASGI middleware: counts every HTTP response by endpoint and status (500 if none was sent)."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
