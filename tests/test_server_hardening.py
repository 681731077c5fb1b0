"""The server's life cycle: warming up before it reports ready, and shutting down (in-process, and a
real `python run.py serve` stopped by SIGTERM)."""

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx2
import jax.monitoring
import pytest
from jax._src.dispatch import BACKEND_COMPILE_EVENT
from prometheus_client import generate_latest
from test_server import CONFIG, MODEL, paused, running, wait_for

from grok import Grok
from grok.model import weights
from grok.server.app import create_app
from grok.server.lifecycle import uvicorn_server
from grok.server.metrics import Metrics
from grok.serving.engine import Engine
from grok.serving.tokenizer import ByteTokenizer

CACHE_LEN = 24  # prefill buckets of 16 and 24 tokens
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine():
    params = weights.stack_layers(weights.random_params(CONFIG, 5), CONFIG.num_layers)
    return Engine(Grok(CONFIG, params, ByteTokenizer()), max_batch=2, cache_len=CACHE_LEN)


@pytest.fixture
def compiles():
    """The XLA compilations that happen while the test runs."""
    seen = []

    def listen(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            seen.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listen)


def test_health_says_loading_until_every_program_is_compiled(engine, compiles):
    """`/health` answers 503 "loading" (and completions 503) while the programs compile; once it says
    "ok", no request of any prompt length compiles anything."""
    release = threading.Event()
    warm_up = engine.warm_up

    def held_warm_up():
        assert release.wait(timeout=60)
        warm_up()

    engine.warm_up = held_warm_up
    try:
        with running(create_app(engine, MODEL), ready=False) as url:
            try:
                health = httpx2.get(f"{url}/health", timeout=10)
                assert health.status_code == 503 and health.json()["status"] == "loading"
                refused = httpx2.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "a"}, timeout=10)
                assert refused.status_code == 503 and refused.headers["retry-after"]
                assert refused.json()["error"]["code"] == "loading"
            finally:
                release.set()
            wait_for(lambda: httpx2.get(f"{url}/health", timeout=10).status_code == 200, timeout=120)
            assert compiles, "warming up compiled nothing"
            compiles.clear()
            for length in (1, 15, 16, 17, CACHE_LEN - 2):  # both buckets, and the decode step
                body = {"model": MODEL, "prompt": [70] * length, "max_tokens": 2, "temperature": 0}
                assert httpx2.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
            assert compiles == [], f"requests compiled {compiles} after warming up"
    finally:
        del engine.warm_up


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except ConnectionRefusedError:
        return False


def test_shutdown_ends_open_streams_with_a_final_event(engine):
    """Told to stop, the server admits no new request, gives open streams `graceful_shutdown_s`, then
    ends each with a final "shutting down" event, and stops."""
    app = create_app(engine, MODEL)
    server = uvicorn_server(app, graceful_shutdown_s=0.5, log_level="warning")
    with paused(engine) as steps, httpx2.Client(timeout=30) as client:
        with running(app, server=server) as url:
            port = int(url.rsplit(":", 1)[1])
            body = {"model": MODEL, "prompt": "x", "max_tokens": CACHE_LEN - 2, "stream": True}
            with client.stream("POST", f"{url}/v1/completions", json=body) as stream:
                steps(2)
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                # A request whose body is still on its way when the shutdown begins is not admitted.
                late = socket.create_connection(("127.0.0.1", port), timeout=10)
                late_body = json.dumps({"model": MODEL, "prompt": "y", "max_tokens": 2}).encode()
                late.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {len(late_body)}\r\n"
                             "Content-Type: application/json\r\n\r\n".encode() + late_body[:5])
                time.sleep(0.2)
                began = time.monotonic()
                server.should_exit = True
                wait_for(lambda: not listening(port))  # the shutdown has begun
                late.sendall(late_body[5:])
                assert late.recv(4096).startswith(b"HTTP/1.1 503")
                late.close()
                streams = app.state.server.streams
                wait_for(lambda: streams and all(s.cancelled for s in streams))  # after the grace period
                assert time.monotonic() - began >= 0.45
                steps(5)  # the engine drops the cancelled stream at its next step
                rest = [line[6:] for line in lines if line.startswith("data: ")]
            assert "shutting down" in json.loads(rest[-1])["error"]["message"]
            # `running` checks that the server then stops


def test_metrics_never_divide_by_zero_batch_slots():
    """The occupancy gauge of an engine with no slots reads 0 rather than failing `/metrics` (500)."""
    engine = types.SimpleNamespace(queued=0, active=0, max_batch=0, prefix_cache=None, stats=collections.Counter(),
                                   grok=types.SimpleNamespace(pod=None))
    registry = Metrics(engine).registry
    assert b"grok_batch_occupancy 0.0" in generate_latest(registry)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_ends_the_open_stream_and_exits_0(tmp_path):
    """`python run.py serve` (the demo model), stopped by SIGTERM while a stream is open: the stream
    ends with a final event, the process exits with status 0, within a bounded time."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device, as a plain start
    command = [sys.executable, "run.py", "serve", "--port", str(port), "--cache-len", "16", "--max-batch", "2"]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not get ready"
            try:
                if httpx2.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            time.sleep(0.2)
        body = {"model": "grok-1", "prompt": "Hi", "max_tokens": 14, "n": 2, "stream": True}
        with httpx2.Client(timeout=30) as client, client.stream("POST", f"{url}/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" or "shutting down" in json.loads(rest[-1])["error"]["message"], rest[-1]
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - start < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
