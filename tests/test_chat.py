"""`/v1/chat/completions` on a loopback port: the official `openai` client (streamed and not), the
chat template (the prompt it renders is generated exactly as `/v1/completions` generates it),
template files and their errors, and message validation."""

import json
import re
import threading

import httpx2
import openai
import pytest
from test_server import (  # noqa: F401 (client and http are fixtures over this module's `url`)
    AUTH,
    CONFIG,
    KEY,
    MODEL,
    client,
    expected,
    http,
    metrics,
    paused,
    requests_counted,
    running,
    text_of,
    wait_for,
)

from grok import Grok, cli
from grok.model import weights
from grok.server.app import create_app
from grok.serving.chat import DEFAULT_TEMPLATE, ChatTemplate, ChatTemplateError
from grok.serving.engine import Engine
from grok.serving.tokenizer import ByteTokenizer

CACHE_LEN = 128
CHAT_CONFIG = CONFIG.replace(sequence_len=CACHE_LEN)  # room for a few turns
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a {color}?"},  # braces in content are text, not placeholders
]
PROMPT = "System: Be brief.\nUser: Hi\nthere\nAssistant: Hello.\nUser: Name a {color}?\nAssistant:"
STOP = ("\nUser:",)  # the default template's


@pytest.fixture(scope="module")
def engine():
    params = weights.stack_layers(weights.random_params(CHAT_CONFIG, 5), CHAT_CONFIG.num_layers)
    # Prompts are prefilled in chunks of 16 tokens: one prefill program, whatever their length.
    return Engine(Grok(CHAT_CONFIG, params, ByteTokenizer()), max_batch=4, cache_len=CACHE_LEN, prefill_chunk=16)


@pytest.fixture(scope="module")
def url(engine):
    with running(create_app(engine, MODEL, api_key=KEY)) as url:
        yield url


def write_template(tmp_path, name="template.json", **fields):
    path = tmp_path / name
    path.write_text(json.dumps(fields) if fields else "")
    return path


# ------------------------------------------------------------------------------ the template is applied


def test_the_default_template_renders_the_documented_prompt():
    template = ChatTemplate.load()
    assert template.source == str(DEFAULT_TEMPLATE) and template.stop == STOP
    roles = [(m["role"], m["content"] if isinstance(m["content"], str) else "\n".join(p["text"] for p in m["content"]))
             for m in MESSAGES]
    assert template.render(roles) == PROMPT


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=5.0, seed=9)], ids=["greedy", "seeded"])
def test_chat_generates_what_completions_generates_for_the_rendered_prompt(client, sampling):
    """The chat answer (text, tokens, logprobs, usage) is /v1/completions' for the prompt the template
    renders, with the template's stop. (Greedily, the random model repeats the prompt's last byte;
    sampled hot with a seed, its text depends on the whole prompt.)"""
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, logprobs=True, top_logprobs=2, **sampling
    )
    completion = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, logprobs=2, stop=list(STOP), **sampling
    )
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.model == MODEL
    [choice], [want] = chat.choices, completion.choices
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert len(set(want.text)) > (1 if sampling.get("seed") else 0)
    assert choice.finish_reason == want.finish_reason and choice.index == 0
    assert chat.usage.model_dump() == completion.usage.model_dump()
    assert chat.usage.prompt_tokens == len(PROMPT.encode())
    entries = choice.logprobs.content
    assert [e.token for e in entries] == want.logprobs.tokens
    assert [e.logprob for e in entries] == pytest.approx(want.logprobs.token_logprobs)
    for entry, top in zip(entries, want.logprobs.top_logprobs):
        assert len(entry.top_logprobs) == 2
        for alternative in entry.top_logprobs:
            assert top[alternative.token] == pytest.approx(alternative.logprob)
        if entry.token.startswith("<|token:"):  # no text of its own (outside the byte tokenizer's range)
            assert entry.bytes is None
        elif entry.token.startswith("bytes:\\x"):  # a lone byte of a character
            assert entry.bytes == [int(entry.token[len("bytes:\\x"):], 16)]
        else:
            assert bytes(entry.bytes).decode() == entry.token


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(client):
    settings = dict(model=MODEL, temperature=5.0, seed=4, stop=["x"])
    chat = client.chat.completions.create(messages=MESSAGES, **settings)
    completion = client.completions.create(prompt=PROMPT, max_tokens=CACHE_LEN, **{**settings, "stop": ["x", *STOP]})
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage.completion_tokens == completion.usage.completion_tokens > 24


def test_a_template_file_sets_the_prompt_and_the_stop(engine, tmp_path):
    """Another template on the same engine: its formats, prefix and generation prompt make the
    prompt, and its stop string (taken here from the continuation) ends the answer."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "More"}]
    prompt = "<s>[user]Hi{}\n[bot]Yo\n[user]More{}\n[bot]"
    sampling = dict(temperature=5.0, top_p=1.0, seed=3)  # varied text from the random model
    full = text_of(expected(engine, prompt, 20, **sampling))
    stop = next(full[i : i + 2] for i in range(1, len(full) - 1)
                if full.find(full[i : i + 2]) == i and "\ufffd" not in full[i : i + 2])
    path = write_template(
        tmp_path, description="test", prefix="<s>", system="[sys]{content}\n", user="[user]{content}{{}}\n",
        assistant="[bot]{content}\n", generation_prompt="[bot]", stop=stop,
    )
    with running(create_app(engine, MODEL, chat_template=path)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20, **sampling)
    assert chat.choices[0].message.content == full[: full.find(stop)]
    assert chat.choices[0].finish_reason == "stop"
    assert chat.usage.prompt_tokens == len(prompt.encode())


# ------------------------------------------------------------------------------ the openai client


def test_streamed_chat_sends_the_role_then_content_then_the_finish(client):
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id and c.model == MODEL for c in chunks)
    usage, finish, chunks = chunks[-1], chunks[-2], chunks[:-2]
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == "" and first.finish_reason is None
    assert all(c.choices[0].delta.role is None and c.choices[0].finish_reason is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content for c in chunks) == answer.choices[0].message.content
    assert finish.choices[0].finish_reason == answer.choices[0].finish_reason
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.role is None
    assert usage.choices == [] and usage.usage.model_dump() == answer.usage.model_dump()


def test_n_choices_sample_with_seed_plus_i_streamed_or_not(engine, client):
    settings = dict(model=MODEL, messages=MESSAGES, max_tokens=8, n=2, seed=11, temperature=4.0)
    answer = client.chat.completions.create(**settings)
    want = [text_of(expected(engine, PROMPT, 8, stop=STOP, temperature=4.0, top_p=1.0, seed=11 + i)) for i in (0, 1)]
    assert [c.message.content for c in answer.choices] == want and [c.index for c in answer.choices] == [0, 1]
    assert want[0] != want[1], "n choices all sampled with one seed"

    streamed, roles, finishes = ["", ""], [], [None, None]
    for chunk in client.chat.completions.create(**settings, stream=True):
        choice = chunk.choices[0]
        if choice.delta.role is not None:
            roles.append(choice.index)
            assert streamed[choice.index] == ""  # the role comes before any content
        streamed[choice.index] += choice.delta.content or ""
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert streamed == want and sorted(roles) == [0, 1]
    assert finishes == [c.finish_reason for c in answer.choices]


def test_streamed_logprobs_match_the_answers(client):
    settings = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=5.0, seed=2, logprobs=True,
                    top_logprobs=3)
    answer = client.chat.completions.create(**settings)
    streamed = [e for c in client.chat.completions.create(**settings, stream=True)
                if c.choices[0].logprobs is not None for e in c.choices[0].logprobs.content]
    whole = answer.choices[0].logprobs.content
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole])
    assert [len(e.top_logprobs) for e in streamed] == [3] * len(whole)
    assert len(streamed) == answer.usage.completion_tokens


def test_api_key_queue_and_loading_apply_to_chat(engine, url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 2}
    response = httpx2.post(f"{url}/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions.create(**body)

    app = create_app(engine, MODEL, max_queue=1)
    with running(app) as small:
        results = {}
        with paused(engine):
            thread = threading.Thread(
                target=lambda: results.update(first=httpx2.post(f"{small}/v1/chat/completions", json=body, timeout=60))
            )
            thread.start()
            wait_for(lambda: engine.queued == 1)
            response = httpx2.post(f"{small}/v1/chat/completions", json=body, timeout=10)
            assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"
        thread.join(timeout=60)
        assert results["first"].status_code == 200
        assert results["first"].json()["choices"][0]["message"]["role"] == "assistant"
        app.state.server.ready = False  # as while the engine's programs compile
        response = httpx2.post(f"{small}/v1/chat/completions", json=body, timeout=10)
        assert response.status_code == 503 and response.json()["error"]["code"] == "loading"
        app.state.server.ready = True
        with httpx2.Client(base_url=small) as http:
            counted = metrics(http)
        assert [requests_counted(counted, status, "/v1/chat/completions") for status in (200, 429, 503)] == [1, 1, 1]


# ------------------------------------------------------------------------------ bad requests

BAD = [  # (what, body fields over a good request, status, param)
    ("no messages", {"messages": None}, 400, "messages"),
    ("messages missing", {"messages": ...}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("messages as text", {"messages": "hi"}, 400, "messages"),
    ("a message as text", {"messages": ["hi"]}, 400, "messages[0]"),
    ("unknown role", {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}, 400,
     "messages[1].role"),
    ("no role", {"messages": [{"content": "a"}]}, 400, "messages[0].role"),
    ("no content", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("null content", {"messages": [{"role": "assistant", "content": None}]}, 400, "messages[0].content"),
    ("content as a number", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("an image part", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[1].type"),
    ("a part without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "messages[0].content[0].text"),
    ("a part with an unknown field", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a", "cache_control": {}}]}]}, 400, "messages[0].content[0].cache_control"),
    ("a part as text", {"messages": [{"role": "user", "content": ["a"]}]}, 400, "messages[0].content[0]"),
    ("an unknown message field", {"messages": [{"role": "user", "content": "a", "tool_calls": []}]}, 400,
     "messages[0].tool_calls"),
    ("a lone surrogate", {"messages": [{"role": "user", "content": "a\udc00"}]}, 400, "messages[0].content"),
    ("messages longer than the context", {"messages": [{"role": "user", "content": "a" * CACHE_LEN}]}, 400,
     "messages"),
    ("a completions field", {"prompt": "a"}, 400, "prompt"),
    ("unknown model", {"model": "gpt-4o"}, 404, "model"),
    ("max_tokens over the context", {"max_tokens": CACHE_LEN + 1}, 400, "max_tokens"),
    ("max_completion_tokens over the context", {"max_completion_tokens": CACHE_LEN + 1}, 400,
     "max_completion_tokens"),
    ("zero max_completion_tokens", {"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("two different limits", {"max_tokens": 4, "max_completion_tokens": 5}, 400, "max_completion_tokens"),
    ("logprobs as a number", {"logprobs": 2}, 400, "logprobs"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("too many top_logprobs", {"logprobs": True, "top_logprobs": 9}, 400, "top_logprobs"),
    ("five stops", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("temperature as text", {"temperature": "0"}, 400, "temperature"),
    ("too many choices", {"n": 65}, 400, "n"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("tool_choice", {"tool_choice": "auto"}, 400, "tool_choice"),
    ("json mode", {"response_format": {"type": "json_object"}}, 400, "response_format"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
]


def chat_body(fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    return {key: value for key, value in body.items() if value is not ...}


@pytest.mark.parametrize("what, fields, status, param", BAD, ids=[case[0] for case in BAD])
def test_bad_chat_requests_name_the_field(engine, http, what, fields, status, param):
    content = json.dumps(chat_body(fields)).encode()  # ASCII: a lone surrogate is sent as its escape
    response = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], error
    assert engine.active == 0 and engine.queued == 0  # nothing reached the engine


def test_chat_errors_say_what_is_wrong(http):
    def message(fields):
        return http.post("/v1/chat/completions", json=chat_body(fields)).json()["error"]["message"]

    assert "'system', 'user' or 'assistant'" in message({"messages": [{"role": "developer", "content": "a"}]})
    assert "only text parts" in message({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert "chat prompt" in message({"messages": [{"role": "user", "content": "a" * CACHE_LEN}]})
    assert "Missing required parameter: 'messages[0].role'" in message({"messages": [{"content": "a"}]})


def test_neutral_chat_values_are_accepted(http):
    neutral = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "presence_penalty": 0,
               "frequency_penalty": 0, "logit_bias": {"5": 0}, "user": "u", "max_tokens": 2, "max_completion_tokens": 2,
               "logprobs": False, "messages": [{"role": "user", "content": "hi", "name": "ann"}]}
    response = http.post("/v1/chat/completions", json=chat_body(neutral))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["logprobs"] is None


# ------------------------------------------------------------------------------ template files

GOOD = dict(system="S: {content}\n", user="U: {content}\n", assistant="A: {content}\n", generation_prompt="A:")
BAD_TEMPLATES = [  # (what, file text or fields, message)
    ("empty file", "", "not valid JSON"),
    ("invalid JSON", "{'user': 1}", "not valid JSON"),
    ("not an object", "[]", "a chat template is a JSON object"),
    ("unknown key", {**GOOD, "tool": "T: {content}"}, "unknown key 'tool'"),
    ("missing role", {k: v for k, v in GOOD.items() if k != "user"}, "missing key 'user'"),
    ("missing generation prompt", {k: v for k, v in GOOD.items() if k != "generation_prompt"},
     "missing key 'generation_prompt'"),
    ("not a string", {**GOOD, "assistant": ["A: {content}"]}, "'assistant' must be a string, got list"),
    ("another placeholder", {**GOOD, "user": "{name}: {content}"}, "placeholder {name}"),
    ("a positional placeholder", {**GOOD, "user": "U{}: {content}"}, "placeholder {}"),
    ("a format spec", {**GOOD, "user": "{content:>10}"}, "placeholder {content:>10}"),
    ("an unbalanced brace", {**GOOD, "system": "S: {content"}, "'system' is not a valid format string"),
    ("a lone closing brace", {**GOOD, "system": "S} {content}"}, "'system' is not a valid format string"),
    ("no content", {**GOOD, "user": "User:\n"}, "'user' has no {content} placeholder"),
    ("an empty stop", {**GOOD, "stop": [""]}, "'stop' must be a non-empty string"),
    ("a numeric stop", {**GOOD, "stop": 3}, "'stop' must be a non-empty string"),
    ("five stops", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
]


@pytest.mark.parametrize("what, content, message", BAD_TEMPLATES, ids=[case[0] for case in BAD_TEMPLATES])
def test_template_file_errors_are_one_line_naming_the_file(tmp_path, what, content, message):
    path = tmp_path / "chat.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ChatTemplateError) as raised:
        ChatTemplate.load(path)
    text = str(raised.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_unreadable_template_files(engine, tmp_path):
    for path in (tmp_path / "missing.json", tmp_path):
        with pytest.raises(ChatTemplateError, match=f"^{re.escape(str(path))}: cannot read the chat template"):
            ChatTemplate.load(path)
    (tmp_path / "latin1.json").write_bytes(b'{"user": "\xe9"}')
    with pytest.raises(ChatTemplateError, match="not UTF-8"):
        ChatTemplate.load(tmp_path / "latin1.json")
    with pytest.raises(ChatTemplateError, match="missing.json"):  # create_app checks it too
        create_app(engine, MODEL, chat_template=tmp_path / "missing.json")


def test_serve_checks_the_template_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GROK_API_KEY", raising=False)
    monkeypatch.setattr(cli, "_load_model", lambda *args, **kwargs: pytest.fail("got past the template"))
    path = write_template(tmp_path, **{**GOOD, "user": "{who}: {content}"})
    assert cli.main(["serve", "--chat-template", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: 'user' has the placeholder {{who}}") and err.count("\n") == 1, err
    assert cli.main(["serve", "--chat-template", str(tmp_path / "none.json")]) == 2
    assert "none.json: cannot read the chat template" in capsys.readouterr().err
