"""The OpenAI-compatible server on a loopback port: the official `openai` client, streaming,
many concurrent clients, disconnects, bad input, the API key and a full queue."""

import asyncio
import contextlib
import http.client as httplib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from grok import PRESETS, Grok, SamplingParams
from grok.model import weights
from grok.server.app import create_app
from grok.server.lifecycle import uvicorn_server
from grok.serving.engine import Engine, Request
from grok.serving.tokenizer import ByteTokenizer

CONFIG = PRESETS["tiny"].replace(vocab_size=328)  # room for the byte tokenizer's ids
MODEL = "grok-tiny"
KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CACHE_LEN = 64


@pytest.fixture(scope="module")
def engine():
    params = weights.stack_layers(weights.random_params(CONFIG, 5), CONFIG.num_layers)
    # One prefill bucket (the prompts here are short), so warming up compiles two programs, not four;
    # test_server_hardening.py warms several buckets.
    return Engine(Grok(CONFIG, params, ByteTokenizer()), max_batch=4, cache_len=CACHE_LEN, prefill_chunk=16)


@contextlib.contextmanager
def running(app, ready=True, server=None):
    """Serve `app` with uvicorn from a background thread on a free loopback port; yields its base URL
    once `/health` says ready (or, with `ready=False`, once it listens)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = server or uvicorn_server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # warming up compiles the model's programs
    while not server.started or (ready and httpx2.get(f"{url}/health", timeout=10).status_code != 200):
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05 if server.started else 0.01)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, MODEL, api_key=KEY)


@pytest.fixture(scope="module")
def url(app):
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(url):
    with httpx2.Client(base_url=url, headers=AUTH, timeout=60) as http:
        yield http


def expected(engine, prompt, max_tokens, stop=(), logprobs=0, **sampling):
    """The Python API's events for a request, run alone."""
    return list(engine.submit(Request(prompt, max_tokens, SamplingParams(**sampling), tuple(stop), logprobs)))


def text_of(events):
    return "".join(e.text for e in events)


def tokens_of(events):
    return [e.token_id for e in events if e.finish_reason not in ("stop", "cancelled")]


def finish_of(events):
    return {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}[events[-1].finish_reason]


def metrics(http) -> dict:
    """`/metrics` parsed as Prometheus text: {(sample name, sorted labels): value}."""
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


@contextlib.contextmanager
def paused(engine):
    """Hold the running engine between steps; the yielded `steps(n)` lets n more steps run."""
    permits = threading.Semaphore(0)
    free = threading.Event()
    step = engine.step

    def gated_step():
        while not free.is_set() and not permits.acquire(timeout=0.01):
            pass
        return step()

    engine.step = gated_step  # the engine's loop looks `step` up on every turn
    try:
        yield permits.release
    finally:
        free.set()
        del engine.step


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def requests_counted(snapshot, status, endpoint="/v1/completions"):
    return snapshot.get(("grok_requests_total", (("endpoint", endpoint), ("status", str(status)))), 0)


# ------------------------------------------------------------------------------ the openai client


def test_openai_client_matches_the_python_api(engine, app, client):
    sampling = dict(temperature=0.8, top_p=0.9, top_k=50, seed=7)
    events = expected(engine, "Hello", 12, logprobs=2, **sampling)
    completion = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=12, temperature=0.8, top_p=0.9, seed=7, logprobs=2,
        extra_body={"top_k": 50},
    )
    choice = completion.choices[0]
    assert choice.text == text_of(events) and choice.finish_reason == finish_of(events)
    name = app.state.server.token_name
    assert choice.logprobs.tokens == [name(t) for t in tokens_of(events)]
    assert choice.logprobs.token_logprobs == pytest.approx([e.logprob for e in events][: len(tokens_of(events))])
    for top, event in zip(choice.logprobs.top_logprobs, events):
        alternatives = {name(t): lp for t, lp in event.top_logprobs}
        assert top == pytest.approx({name(event.token_id): event.logprob, **alternatives})
    assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset) and choice.logprobs.text_offset[0] == 0
    assert completion.model == MODEL and completion.object == "text_completion"
    assert completion.usage.prompt_tokens == 5
    assert completion.usage.completion_tokens == len(tokens_of(events))
    assert completion.usage.total_tokens == 5 + len(tokens_of(events))


def test_openai_client_streams_the_same_tokens(engine, app, client):
    events = expected(engine, [72, 101, 108], 10, logprobs=0, temperature=1.0, top_p=1.0, seed=3)
    chunks = list(client.completions.create(
        model=MODEL, prompt=[72, 101, 108], max_tokens=10, seed=3, logprobs=0, stream=True,
        stream_options={"include_usage": True},
    ))
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == len(tokens_of(events))
    assert usage.usage.prompt_tokens == 3
    chunks = chunks[:-1]
    assert "".join(c.choices[0].text for c in chunks) == text_of(events)
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [finish_of(events)]
    streamed_tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    assert streamed_tokens == [app.state.server.token_name(t) for t in tokens_of(events)]


def test_n_choices_and_prompt_batches_use_seed_plus_i(engine, client):
    prompts = ["ab", "xyz"]
    completion = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2, seed=40, temperature=5.0)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    for choice in completion.choices:
        prompt, i = prompts[choice.index // 2], choice.index % 2
        assert choice.text == text_of(expected(engine, prompt, 6, temperature=5.0, top_p=1.0, seed=40 + i))
    assert completion.usage.prompt_tokens == 5
    texts = [c.text for c in completion.choices]
    assert texts[0] != texts[1] or texts[2] != texts[3], "n choices all sampled with one seed"

    stream = client.completions.create(
        model=MODEL, prompt="ab", max_tokens=6, n=2, seed=40, temperature=5.0, stream=True
    )
    streamed = ["", ""]
    for chunk in stream:
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == texts[:2]


def test_stop_strings_and_greedy(engine, client):
    full = text_of(expected(engine, "stop", 20, temperature=0))
    assert len(full) >= 6
    stop = full[3:5]
    completion = client.completions.create(model=MODEL, prompt="stop", max_tokens=20, temperature=0, stop=[stop, "zz~"])
    assert completion.choices[0].text == full[: full.find(stop)]
    assert completion.choices[0].finish_reason == "stop"


def test_echo_starts_each_choice_with_its_prompt(engine, client):
    """`echo`: the prompt's text (as sent, or its token ids decoded) before each choice's completion;
    streamed, as each choice's first chunk."""
    greedy = dict(temperature=0, top_p=1.0)
    completion = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, echo=True)
    assert completion.choices[0].text == "Hello" + text_of(expected(engine, "Hello", 6, **greedy))
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 6

    prompts = [ByteTokenizer().encode(text) for text in ("Hi", "ok")]  # token ids are echoed decoded
    completion = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, echo=True, n=2)
    want = [text + text_of(expected(engine, text, 4, **greedy)) for text in ("Hi", "ok")]
    assert [c.text for c in completion.choices] == [want[0], want[0], want[1], want[1]]

    chunks = list(client.completions.create(model=MODEL, prompt="ok", max_tokens=4, temperature=0, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text == "ok" and chunks[0].choices[0].finish_reason is None
    assert "".join(c.choices[0].text for c in chunks) == want[1]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_health_and_metrics(url, http, client):
    client.completions.create(model=MODEL, prompt="m", max_tokens=2)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx2.get(f"{url}/health").json()["status"] == "ok"  # open without the key
    snapshot = metrics(http)
    for name in ("grok_queue_depth", "grok_batch_occupancy", "grok_active_slots", "grok_generated_tokens_total"):
        assert (name, ()) in snapshot
    assert snapshot[("grok_batch_slots", ())] == 4
    assert snapshot[("grok_time_to_first_token_seconds_count", ())] > 0
    assert requests_counted(snapshot, 200) > 0
    assert snapshot[("grok_prefill_tokens_total", ())] >= 1 and snapshot[("grok_decode_steps_total", ())] >= 1
    for name in ("grok_prefix_hit_tokens_total", "grok_speculative_tokens_proposed_total"):
        assert (name, ()) in snapshot


# ------------------------------------------------------------------------------ bad input

HUGE_SEED = b'{"model": "grok-tiny", "prompt": "ab", "seed": ' + b"9" * 5001 + b"}"
BAD = [  # (what, body, status, param)
    ("malformed JSON", b'{"model": "grok-tiny", "prompt": ', 400, None),
    ("invalid UTF-8", b'{"model": "grok-tiny", "prompt": "\xff\xfe"}', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("no prompt", b'{"model": "grok-tiny"}', 400, "prompt"),
    ("no model", b'{"prompt": "a"}', 400, "model"),
    ("unknown model", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("max_tokens as text", {"max_tokens": "16"}, 400, "max_tokens"),
    ("max_tokens as float", {"max_tokens": 4.0}, 400, "max_tokens"),
    ("negative max_tokens", {"max_tokens": -1}, 400, "max_tokens"),
    ("zero max_tokens", {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over the context", {"max_tokens": CACHE_LEN + 1}, 400, "max_tokens"),
    ("huge max_tokens", {"max_tokens": 10**30}, 400, "max_tokens"),
    ("prompt as a number", {"prompt": 5}, 400, "prompt"),
    ("prompt of floats", {"prompt": [70, 1.5]}, 400, "prompt"),
    ("prompt of booleans", {"prompt": [True]}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", {"prompt": []}, 400, "prompt"),
    ("text longer than the context", {"prompt": "a" * CACHE_LEN}, 400, "prompt"),
    ("ids longer than the context", {"prompt": [70] * CACHE_LEN}, 400, "prompt"),
    ("token id past the vocabulary", {"prompt": [70, CONFIG.vocab_size]}, 400, "prompt"),
    ("negative token id", {"prompt": [-1]}, 400, "prompt"),
    ("bad id in a batch", {"prompt": [[70], [70, 10**9]]}, 400, "prompt"),
    ("temperature as text", {"temperature": "hot"}, 400, "temperature"),
    ("negative temperature", {"temperature": -0.5}, 400, "temperature"),
    ("top_p zero", {"top_p": 0}, 400, "top_p"),
    ("negative top_k", {"top_k": -1}, 400, "top_k"),
    ("seed as float", {"seed": 1.5}, 400, "seed"),
    ("stream as text", {"stream": "yes"}, 400, "stream"),
    ("n as boolean", {"n": True}, 400, "n"),
    ("zero n", {"n": 0}, 400, "n"),
    ("logprobs too many", {"logprobs": 9}, 400, "logprobs"),
    ("negative logprobs", {"logprobs": -1}, 400, "logprobs"),
    ("logprobs as boolean", {"logprobs": True}, 400, "logprobs"),
    ("stop as a number", {"stop": 3}, 400, "stop"),
    ("stop with a number", {"stop": ["a", 1]}, 400, "stop"),
    ("five stops", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("empty stop", {"stop": [""]}, 400, "stop"),
    ("unknown field", {"frobnicate": 1}, 400, "frobnicate"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("include_usage as text", {"stream": True, "stream_options": {"include_usage": "y"}}, 400,
     "stream_options.include_usage"),
    ("echo with logprobs", {"echo": True, "logprobs": 0}, 400, "echo"),
    ("best_of", {"best_of": 3}, 400, "best_of"),
    ("logit_bias", {"logit_bias": {"70": 5}}, 400, "logit_bias"),
    ("presence_penalty", {"presence_penalty": 1.0}, 400, "presence_penalty"),
    ("too many choices", {"n": 65}, 400, "n"),
    ("lone surrogate in the prompt", rb'{"model": "grok-tiny", "prompt": "a\ud800b"}', 400, "prompt"),
    ("lone surrogate in a prompt list", {"prompt": ["ok", "\udc00"]}, 400, "prompt"),
    ("lone surrogate in stop", {"stop": ["\ud83d"]}, 400, "stop"),
    ("lone surrogate in the model", {"model": "grok\ud800"}, 400, "model"),
    ("lone surrogate in a field name", {"\ud800": 1}, 400, None),
    ("5001-digit seed", HUGE_SEED, 400, "seed"),
    ("5001-digit negative max_tokens", HUGE_SEED.replace(b'"seed": ', b'"max_tokens": -'), 400, "max_tokens"),
    ("NaN", b'{"model": "grok-tiny", "prompt": "ab", "temperature": NaN}', 400, "temperature"),
    ("nested too deeply", b'{"model": "grok-tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
]


def bad_body(body):
    return body if isinstance(body, bytes) else json.dumps({"model": MODEL, "prompt": "ab", **body}).encode()


@pytest.mark.parametrize("what, body, status, param", BAD, ids=[case[0] for case in BAD])
def test_bad_input_names_the_field(engine, http, what, body, status, param):
    response = http.post("/v1/completions", content=bad_body(body), headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and "code" in error
    assert error["message"]
    assert engine.active == 0 and engine.queued == 0  # nothing reached the engine


def test_oversized_body_wrong_method_and_unknown_path(http):
    response = http.post("/v1/completions", content=b'{"prompt": "' + b"a" * (5 << 20) + b'"}')
    assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"
    response = http.get("/v1/completions")
    assert response.status_code == 405 and "error" in response.json()
    response = http.post("/v1/embeddings", json={})
    assert response.status_code == 404 and "error" in response.json()


def test_errors_say_what_is_wrong(http):
    response = http.post("/v1/completions", content=rb'{"model": "grok-tiny", "prompt": "a\ud800b"}')
    assert "lone surrogate" in response.json()["error"]["message"]
    response = http.post("/v1/completions", content=rb'{"model": "grok-tiny", "prompt": "a", "\udfff": 1}')
    assert "lone surrogate" in response.json()["error"]["message"]
    response = http.post("/v1/completions", content=HUGE_SEED)
    assert "5001 digits" in response.json()["error"]["message"]


def test_neutral_values_are_accepted(http):
    neutral = {"logit_bias": {"1": 0, "70": 0.0}, "presence_penalty": 0, "frequency_penalty": 0.0, "echo": False,
               "best_of": 1, "suffix": "", "user": "u", "seed": 9 * 10**40}
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 2, **neutral})
    assert response.status_code == 200, response.text


def test_an_oversized_body_gets_its_413(url, client):
    """Clients that send a whole 10 MB body before they read (http.client, urllib, the openai client)
    get the JSON 413, not a connection reset, whether the size was declared or found while reading."""
    body = json.dumps({"model": MODEL, "prompt": "a" * 10_000_000}).encode()
    headers = {**AUTH, "Content-Type": "application/json", "Connection": "close"}
    for chunked in (False, True):
        conn = httplib.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        if chunked:
            chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
            conn.request("POST", "/v1/completions", body=chunks, headers=headers, encode_chunked=True)
        else:
            conn.request("POST", "/v1/completions", body=body, headers=headers)
        response = conn.getresponse()
        assert response.status == 413 and response.getheader("connection") == "close"
        assert json.loads(response.read())["error"]["type"] == "invalid_request_error"
        conn.close()

    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers=headers)
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 413 and "larger than" in json.loads(raised.value.read())["error"]["message"]

    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(model=MODEL, prompt="a" * 10_000_000)
    assert raised.value.status_code == 413


def test_a_huge_valid_body_is_refused_without_blocking_the_server(url, http):
    """838,840 one-token prompts (4 MiB): refused before the work of parsing them, while `/health`
    keeps answering at once."""
    body = b'{"model":"grok-tiny","prompt":[' + b",".join([b"[70]"] * 838_840) + b'],"max_tokens":1}'
    assert len(body) <= 4 << 20
    answer = {}

    def post():
        start = time.monotonic()
        answer["response"] = httpx2.post(f"{url}/v1/completions", content=body, headers=AUTH, timeout=60)
        answer["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=post)
    thread.start()
    slowest = 0.0
    while thread.is_alive():
        start = time.monotonic()
        assert http.get("/health").status_code == 200
        slowest = max(slowest, time.monotonic() - start)
    thread.join()
    assert slowest < 0.5 and answer["seconds"] < 1.5, (slowest, answer["seconds"])
    response = answer["response"]
    assert response.status_code == 400 and "JSON values" in response.json()["error"]["message"], response.text

    # Commas and brackets inside strings are text, not values: this prompt is refused for its length.
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "[1], \\\"" * 3000})
    assert response.status_code == 400 and "tokens" in response.json()["error"]["message"]


def test_a_body_that_never_arrives_times_out(url, monkeypatch):
    """A declared body that is not sent gets 408 after the body timeout; the connection then closes."""
    monkeypatch.setattr("grok.server.handlers.BODY_TIMEOUT_S", 0.5, raising=False)
    monkeypatch.setattr("grok.server.body.DRAIN_TIMEOUT_S", 0.5, raising=False)
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        start = time.monotonic()
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Length: 100\r\n\r\n{\"model\":".encode())
        received = b""
        while b"\r\n\r\n" not in received:
            received += conn.recv(4096)
        assert received.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5
        while chunk := conn.recv(4096):  # the server closes the connection
            received += chunk
        assert time.monotonic() - start < 5
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_api_key_is_required(url, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models")):
            response = httpx2.request(method, f"{url}{path}", headers=headers, json={"model": MODEL, "prompt": "a"})
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(model=MODEL, prompt="a")
    assert httpx2.get(f"{url}/health").status_code == 200
    assert httpx2.get(f"{url}/metrics").status_code == 200
    assert client.completions.create(model=MODEL, prompt="a", max_tokens=1).choices[0].finish_reason == "length"


def test_a_full_queue_answers_429_at_once(engine):
    """A second app on the running engine, with room for one waiting request; the engine is held still."""
    with running(create_app(engine, MODEL, max_queue=1)) as small:
        results = {}

        def waiting_request():
            body = {"model": MODEL, "prompt": "q", "max_tokens": 2}
            results["first"] = httpx2.post(f"{small}/v1/completions", json=body, timeout=60)

        with paused(engine):
            thread = threading.Thread(target=waiting_request)
            thread.start()
            wait_for(lambda: engine.queued == 1)
            start = time.monotonic()
            response = httpx2.post(f"{small}/v1/completions", json={"model": MODEL, "prompt": "q"}, timeout=10)
            assert time.monotonic() - start < 5
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "queue_full"
        thread.join(timeout=60)
        assert results["first"].status_code == 200
        with httpx2.Client(base_url=small) as http:
            assert requests_counted(metrics(http), 429) == 1


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "not-streaming"])
def test_a_disconnected_client_frees_its_slot_at_once(engine, app, url, http, stream):
    """The client hangs up while the engine is held between two steps: its stream is cancelled before the next."""
    before = metrics(http)
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 60, "stream": stream}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    port = int(url.rsplit(":", 1)[1])
    with paused(engine) as steps:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(head + body)
            wait_for(lambda: engine.queued == 1)
            steps(1)  # prefill and one decode step: two tokens of sixty
            if stream:
                received = b""
                while b"data: " not in received:
                    received += conn.recv(4096)
            wait_for(lambda: engine.active == 1)
        # the connection is closed mid-generation, while the engine is held
        streams = app.state.server.streams
        wait_for(lambda: streams and all(s.cancelled for s in streams))
    wait_for(lambda: engine.active == 0 and engine.queued == 0)
    after = metrics(http)
    cancelled = ("grok_choices_finished_total", (("reason", "cancelled"),))
    assert after[cancelled] - before.get(cancelled, 0) == 1
    assert after[("grok_requests_cancelled_total", ())] - before[("grok_requests_cancelled_total", ())] == 1
    assert after[("grok_generated_tokens_total", ())] - before[("grok_generated_tokens_total", ())] <= 3
    status = 200 if stream else 499  # 499: "client closed request"
    wait_for(lambda: requests_counted(metrics(http), status) - requests_counted(before, status) == 1)


# ------------------------------------------------------------------------------ load


def test_concurrent_streaming_clients_each_get_their_own_text(engine, url, http):
    """32 streaming clients at once (plus one that hangs up and a few bad requests), within a time bound."""
    clients = 32
    prompts = [f"client {i:02d}:" for i in range(clients)]
    settings = [dict(temperature=0.0 if i % 2 else 2.0, top_p=1.0, seed=100 + i) for i in range(clients)]
    max_tokens = [8 + i % 9 for i in range(clients)]
    alone = [expected(engine, p, m, **s) for p, m, s in zip(prompts, max_tokens, settings)]
    want = [text_of(events) for events in alone]
    want_tokens = sum(len(tokens_of(events)) for events in alone)
    before = metrics(http)
    bad = [{"prompt": [70, 5000]}, {"max_tokens": -3}, {"model": "nope"}, b"{oops"]

    async def stream_one(session, i):
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": max_tokens[i], "stream": True, **settings[i]}
        text, finish = "", None
        async with session.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return text, finish
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
        raise AssertionError("the stream ended without [DONE]")

    async def hang_up(session):
        body = {"model": MODEL, "prompt": "bye", "max_tokens": 60, "stream": True}
        async with session.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return  # closes the connection mid-stream

    async def send_bad(session, body):
        await asyncio.sleep(0.05)
        response = await session.post("/v1/completions", content=bad_body(body))
        return response.status_code

    async def main():
        limits = httpx2.Limits(max_connections=64)
        async with httpx2.AsyncClient(base_url=url, headers=AUTH, timeout=60, limits=limits) as session:
            jobs = [stream_one(session, i) for i in range(clients)]
            jobs.insert(5, hang_up(session))
            jobs += [send_bad(session, b) for b in bad]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=60)

    start = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - start
    statuses = results[clients + 1 :]
    del results[5]
    assert [text for text, _ in results[:clients]] == want
    assert all(finish in ("stop", "length") for _, finish in results[:clients])
    assert statuses == [400, 400, 404, 400]
    wait_for(lambda: engine.active == 0 and engine.queued == 0)

    after = metrics(http)
    assert requests_counted(after, 200) - requests_counted(before, 200) == clients + 1
    assert requests_counted(after, 400) - requests_counted(before, 400) == 3
    assert requests_counted(after, 404) - requests_counted(before, 404) == 1
    generated = after[("grok_generated_tokens_total", ())] - before[("grok_generated_tokens_total", ())]
    assert want_tokens < generated < want_tokens + 60
    assert after[("grok_requests_cancelled_total", ())] - before[("grok_requests_cancelled_total", ())] == 1
    assert after[("grok_queue_depth", ())] == 0 and after[("grok_batch_occupancy", ())] == 0
    print(f"\nload: {clients + 1} streams + {len(bad)} bad requests in {elapsed:.2f} s, "
          f"{generated:.0f} tokens ({generated / elapsed:.1f} tokens/s), 0 errors")
