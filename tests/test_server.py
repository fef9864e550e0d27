"""`mlx-hermes serve`: real OpenAI and Ollama clients against a live server on loopback."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import ollama
import openai
import pytest
import uvicorn
from click.testing import CliRunner

import mlx_hermes
from mlx_hermes.cli import main
from mlx_hermes import HermesError
from mlx_hermes.engine import Busy, Done, Engine, Failed
from mlx_hermes.server import OLLAMA_API_VERSION, RETRY_AFTER_S, create_app

from .test_cli import mlx_hermes_command

NAME = "hermes-test"


class LiveServer:
    """uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        self.app = app
        self.engine = app.state.engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def wait_idle(self, timeout: float = 10.0) -> float:
        """Seconds until the engine has nothing running or waiting."""
        start = time.time()
        while self.engine.running or self.engine.waiting:
            assert time.time() - start < timeout, "the engine is still busy"
            time.sleep(0.01)
        return time.time() - start


@pytest.fixture(scope="module")
def model(loaded):
    return loaded()


@pytest.fixture(scope="module")
def live(model):
    server = LiveServer(create_app(*model, name=NAME, max_context=1024, defaults={"temp": 0.0}))
    yield server
    server.stop()


def alone(model, ids: list[int], max_tokens: int) -> str:
    """What the model writes for `ids` with nothing else going on: the reference."""
    return mlx_hermes.generate(*model, ids, max_tokens=max_tokens, temp=0.0)


def chat_ids(model, messages) -> list[int]:
    return model[1].apply_chat_template(messages)


# ---- the real client libraries ---------------------------------------------------------------

def test_every_route_builds_the_same_prompt(live, model):
    """One conversation gives the same ids through ChatSession, the template,
    /v1/chat/completions, /api/chat and /api/generate continuing from an
    earlier reply's `context` (the reply's own sampled tokens apart)."""
    from .test_tokenizer import CONVERSATION, IDS

    client = ollama.Client(host=live.url)
    options = {"num_predict": 6, "temperature": 0}
    first = client.generate(model=NAME, prompt="Hi there", system="You are Hermes.",
                            options=options)
    second = client.generate(model=NAME, prompt="What is 2+2?", context=first.context,
                             options=options)
    session = mlx_hermes.ChatSession(*model, system="You are Hermes.", max_tokens=6, temp=0)
    assert "".join(c.text for c in session.send("Hi there")) == first.response
    expected = session.prompt_ids("What is 2+2?")
    assert second.context[: len(expected)] == expected
    assert expected[-18:] == IDS[True][-18:]  # the second user turn, literally

    openai_client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    reply = openai_client.chat.completions.create(model=NAME, messages=CONVERSATION,
                                                  max_tokens=2)
    assert reply.usage.prompt_tokens == len(IDS[True])
    chat = client.chat(model=NAME, messages=CONVERSATION, options={"num_predict": 2})
    assert chat.prompt_eval_count == len(IDS[True])  # the whole prompt, cached or not
    assert chat_ids(model, CONVERSATION) == IDS[True]


def test_openai_client_chat_and_completion(live, model):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [NAME]
    messages = [{"role": "system", "content": "You are Hermes."},
                {"role": "user", "content": "Name three colours."}]
    expected = alone(model, chat_ids(model, messages), 12)

    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                           temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(chat_ids(model, messages))
    assert reply.usage.completion_tokens == 12

    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    prompt = "The capital of France is"
    expected = alone(model, model[1].encode(prompt), 9)
    done = client.completions.create(model=NAME, prompt=prompt, max_tokens=9, temperature=0)
    assert done.choices[0].text == expected
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=9,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_ollama_client_chat_and_generate(live, model):
    client = ollama.Client(host=live.url)
    assert [m.model for m in client.list().models] == [f"{NAME}:latest"]
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    expected = alone(model, chat_ids(model, messages), 10)
    options = {"num_predict": 10, "temperature": 0}

    reply = client.chat(model=NAME, messages=messages, options=options)
    assert reply.message.content == expected
    assert reply.done and reply.done_reason == "length" and reply.eval_count == 10
    parts = list(client.chat(model=f"{NAME}:latest", messages=messages, options=options,
                             stream=True))
    assert "".join(p.message.content for p in parts) == expected
    assert parts[-1].done and not any(p.done for p in parts[:-1])

    prompt = "Why is the sky blue?"  # templated as a user turn, so the same ids as the chat
    made = client.generate(model=NAME, prompt=prompt, options=options)
    assert made.response == expected
    streamed = list(client.generate(model=NAME, prompt=prompt, options=options, stream=True))
    assert "".join(p.response for p in streamed) == expected
    assert streamed[-1].context[: len(chat_ids(model, messages))] == chat_ids(model, messages)

    raw = client.generate(model=NAME, prompt="Once upon a time", raw=True, options=options)
    assert raw.response == alone(model, model[1].encode("Once upon a time"), 10)
    assert httpx.get(f"{live.url}/api/version").json()["version"] == OLLAMA_API_VERSION


def test_ollama_stop_seed_and_num_ctx(live, model):
    client = ollama.Client(host=live.url)
    messages = [{"role": "user", "content": "Count to ten."}]
    full = client.chat(model=NAME, messages=messages, options={"num_predict": 16,
                                                                "temperature": 0})
    text = full.message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat(model=NAME, messages=messages, options={"num_predict": 16,
                                                               "temperature": 0, "stop": [stop]})
    assert cut.message.content == text[: text.find(stop)] and cut.done_reason == "stop"

    sampled = {"num_predict": 8, "temperature": 1.0, "seed": 7}
    a = client.chat(model=NAME, messages=messages, options=sampled).message.content
    b = client.chat(model=NAME, messages=messages, options=sampled).message.content
    assert a == b

    # num_ctx bounds this request: generation stops when the context is full
    n = len(chat_ids(model, messages))
    short = client.chat(model=NAME, messages=messages,
                        options={"num_ctx": n + 3, "num_predict": -1, "temperature": 0})
    assert short.eval_count == 3 and short.done_reason == "length"
    with pytest.raises(ollama.ResponseError, match="does not fit"):
        client.chat(model=NAME, messages=messages, options={"num_ctx": n})


# ---- what clients call besides generation ---------------------------------------------------

def test_ollama_show_and_ps(live, model):
    client = ollama.Client(host=live.url)
    shown = client.show(NAME)
    a = model[0].args
    assert shown.details.family == "mixtral" and shown.capabilities == ["completion", "tools"]
    assert ".Tools" in shown.template  # LiteLLM passes tools natively when the template has them
    assert shown.modelinfo["mixtral.context_length"] == a.max_position_embeddings
    assert shown.modelinfo["mixtral.expert_count"] == a.num_local_experts
    assert shown.modelinfo["mixtral.expert_used_count"] == a.num_experts_per_tok
    assert "<|im_start|>" in shown.template and 'stop "<|im_end|>"' in shown.parameters
    assert "num_ctx 1024" in shown.parameters  # the server's --max-context
    with pytest.raises(ollama.ResponseError, match="not found"):
        client.show("llama3")
    loaded_models = client.ps().models
    assert [m.model for m in loaded_models] == [f"{NAME}:latest"]
    assert loaded_models[0].context_length == 1024 and loaded_models[0].expires_at.year > 2100
    # keep_alive is accepted; the model stays loaded
    reply = client.chat(model=NAME, messages=[{"role": "user", "content": "Hi"}], keep_alive=0,
                        options={"num_predict": 2})
    assert reply.done and client.ps().models


def test_cors_lets_local_pages_and_editors_in(model):
    server = LiveServer(create_app(*model, name=NAME, allow_origins=("https://chat.example",)))
    try:
        def preflight(origin: str) -> httpx.Response:
            return httpx.options(f"{server.url}/api/chat", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,authorization"})

        for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "http://localhost",
                       "vscode-webview://abc123", "app://obsidian.md", "tauri://localhost",
                       "https://chat.example"):
            r = preflight(origin)
            assert r.status_code == 200, origin
            assert r.headers["access-control-allow-origin"] == origin
        assert "access-control-allow-origin" not in preflight("http://evil.example").headers
        r = httpx.get(f"{server.url}/api/tags", headers={"Origin": "http://localhost:3000"})
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    finally:
        server.stop()


def test_logprobs_in_each_api(live, model):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content).startswith(r.choices[0].message.content[:1])
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2 and bytes(c.bytes).decode(
            errors="replace") == c.token
        assert c.top_logprobs[0].token == c.token  # greedy: the most likely one
    streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5,
                                              temperature=0, logprobs=True, stream=True)
    parts = [p for chunk in streamed for ch in chunk.choices if ch.logprobs
             for p in ch.logprobs.content]
    assert [p.token for p in parts] == [c.token for c in content]
    assert all(p.top_logprobs == [] for p in parts)
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None

    legacy = client.completions.create(model=NAME, prompt="Once", max_tokens=4, temperature=0,
                                       logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)

    ollama_reply = ollama.Client(host=live.url).chat(
        model=NAME, messages=messages, logprobs=True, top_logprobs=3,
        options={"num_predict": 4, "temperature": 0})
    assert len(ollama_reply.logprobs) == 4
    assert all(len(x.top_logprobs) == 3 and x.logprob <= 0 for x in ollama_reply.logprobs)
    with httpx.Client(timeout=30) as http:
        bad = http.post(f"{live.url}/v1/chat/completions", json={
            "model": NAME, "messages": messages, "top_logprobs": 2})
    assert bad.status_code == 400 and "logprobs" in bad.json()["error"]["message"]


def test_structured_output_in_both_apis(live, model):
    from pydantic import BaseModel, Field

    from .test_grammar import PERSON, matches_person

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=120)

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Who?"}]
    parsed = client.chat.completions.parse(model=NAME, messages=messages, max_tokens=60,
                                           response_format=Person)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and len(person.name) <= 8 and 0 <= person.age <= 120
    r = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=80, temperature=0.9, seed=3,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert matches_person(json.loads(r.choices[0].message.content))
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=200,
                                       response_format={"type": "json_object"})
    text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict))

    local = ollama.Client(host=live.url)
    reply = local.chat(model=NAME, messages=messages, format=PERSON,
                       options={"num_predict": 80, "temperature": 0.8})
    assert matches_person(json.loads(reply.message.content))
    generated = local.generate(model=NAME, prompt="Who?", format="json",
                               options={"num_predict": 200})
    assert generated.response.startswith("{")

    with httpx.Client(timeout=30) as http:
        bad = http.post(f"{live.url}/v1/chat/completions", json={
            "model": NAME, "messages": messages, "response_format": {
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}})
        assert bad.status_code == 400 and "schema" in bad.json()["error"]["message"]
        bad = http.post(f"{live.url}/api/chat", json={**OLLAMA, "format": "yaml"})
        assert bad.status_code == 400 and "format" in bad.json()["error"]


def test_tools_in_both_apis(live, model):
    from .test_tools import TIME, WEATHER

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "developer", "content": "Use tools."},
                {"role": "user", "content": "Weather in Paris?"}]
    forced = client.chat.completions.create(model=NAME, messages=messages, max_tokens=80,
                                            tools=[WEATHER, TIME], tool_choice="required")
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)

    named = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=80, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = named.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and len(args["city"]) <= 12

    # the result goes back in a tool turn, and the conversation goes on
    follow = messages + [named.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "{\"temp\": 21}"}]
    reply = client.chat.completions.create(model=NAME, messages=follow, max_tokens=5,
                                           tools=[WEATHER], tool_choice="none")
    assert reply.choices[0].message.tool_calls is None
    prompt = model[1].decode(reply_prompt := model[1].apply_chat_template(
        mlx_hermes.tools.messages_with_tools(
            [{"role": "system", "content": "Use tools."}, *follow[1:2],
             {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
             {"role": "tool", "content": "{\"temp\": 21}"}], [])))
    assert "<tool_response>\n{\"temp\": 21}\n</tool_response>" in prompt and reply_prompt
    assert reply.usage.prompt_tokens == len(reply_prompt)

    # auto: free text or a well-formed call
    auto = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20,
                                          tools=[WEATHER])
    message = auto.choices[0].message
    assert (message.tool_calls is None and isinstance(message.content, str)) or (
        message.tool_calls[0].function.name == "get_weather")

    # streamed: the call arrives whole, with its index
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=80,
                                            tools=[WEATHER], tool_choice="required", stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [t for d in deltas for t in (d.delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert deltas[-1].finish_reason == "tool_calls"

    local = ollama.Client(host=live.url)
    answer = local.chat(model=NAME, messages=[{"role": "user", "content": "Weather?"}],
                        tools=[WEATHER], options={"num_predict": 20})
    assert answer.done and (answer.message.tool_calls is None or
                            answer.message.tool_calls[0].function.name == "get_weather")
    with httpx.Client(timeout=30) as http:
        bad = http.post(f"{live.url}/v1/chat/completions", json={
            "model": NAME, "messages": messages, "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "launch"}}})
    assert bad.status_code == 400 and "not among the tools" in bad.json()["error"]["message"]


def test_null_means_the_default(live):
    with httpx.Client(timeout=30) as http:
        r = http.post(f"{live.url}/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "n": None, "stream": None, "temperature": None, "stop": None})
        assert r.status_code == 200 and len(r.json()["choices"]) == 1
        r = http.post(f"{live.url}/api/chat", json={
            "model": NAME, "stream": None, "options": {"num_predict": 2},
            "messages": [{"role": "assistant", "content": None},
                         {"role": "user", "content": "Hi"}]})
        # stream null: Ollama's default, streaming
        assert r.status_code == 200 and json.loads(r.text.splitlines()[-1])["done"]


def test_a_non_streaming_client_that_leaves_is_noticed_within_a_second(live):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 900, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=0.3)
    t = time.time()
    live.wait_idle(timeout=5)
    assert time.time() - t < 1.5  # 900 tokens would take several seconds


def test_shutdown_gives_503_with_retry_after_never_a_cut_reply(model):
    server = LiveServer(create_app(*model, name=NAME, max_batch=1, defaults={"temp": 0.0}))
    try:
        with ThreadPoolExecutor(3) as pool:
            chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 5000}
            running = pool.submit(httpx.post, f"{server.url}/v1/chat/completions", json=chat,
                                  timeout=60)
            # the long request first (its reply runs ~2,500 tokens), so the other two queue
            # behind it: the short Ollama one, taken first, would be done before they met
            deadline = time.time() + 10
            while server.engine.running < 1:
                assert time.time() < deadline, "the first request did not start"
                time.sleep(0.01)

            def stream() -> list[str]:
                with httpx.stream("POST", f"{server.url}/v1/chat/completions",
                                  json={**chat, "stream": True}, timeout=60) as r:
                    return [line for line in r.iter_lines() if line]

            streamed = pool.submit(stream)
            queued = pool.submit(httpx.post, f"{server.url}/api/chat", timeout=60,
                                 json={**OLLAMA, "stream": False})
            deadline = time.time() + 10
            while server.engine.waiting < 2:
                assert time.time() < deadline, "the requests were not queued"
                time.sleep(0.02)
            server.engine.cancel_all()  # what Ctrl-C does first
            r = running.result()
            assert r.status_code == 503 and r.headers["retry-after"] == str(RETRY_AFTER_S)
            assert "shutting down" in r.json()["error"]["message"]
            q = queued.result()
            assert q.status_code == 503 and q.headers["retry-after"] == str(RETRY_AFTER_S)
            lines = streamed.result()
            events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
            assert "error" in events[-1] and "shutting down" in events[-1]["error"]["message"]
            finishes = [c.get("finish_reason") for e in events for c in e.get("choices", [])]
            assert not any(finishes)  # no "stop", no "cancelled": the reply is not complete
    finally:
        server.stop()


# ---- concurrency, disconnects, the queue ---------------------------------------------------

def test_sixteen_concurrent_clients_each_get_what_they_get_alone(live, model):
    # openai and ollama clients at once, decoded together in one batch
    prompts = [f"Tell me fact number {i} about the sea." for i in range(16)]
    expected = [alone(model, chat_ids(model, [{"role": "user", "content": p}]), 8)
                for p in prompts]
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    local = ollama.Client(host=live.url)

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": prompts[i]}]
        if i % 2:
            return local.chat(model=NAME, messages=messages,
                              options={"num_predict": 8, "temperature": 0}).message.content
        r = client.chat.completions.create(model=NAME, max_tokens=8, temperature=0,
                                           messages=messages)
        return r.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == expected


def test_a_short_request_finishes_while_a_long_one_decodes(live, model):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    long = client.chat.completions.create(
        model=NAME, max_tokens=600, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Write a long story."}])
    parts = iter(long)
    next(parts), next(parts)  # it runs
    short = client.chat.completions.create(model=NAME, max_tokens=3, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert short.usage.completion_tokens == 3
    health = httpx.get(f"{live.url}/health").json()
    assert health["running"] == 1 and health["waiting"] == 0  # the long one still decodes
    assert health["max_batch"] == live.engine.max_batch
    rest = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert rest and live.wait_idle() < 10


def test_completions_with_several_prompts_and_n(live, model):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    prompts = ["Once upon a time", "The sea", "Hello"]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    for i, p in enumerate(prompts):  # choices p * n + j, each the prompt's greedy text
        want = alone(model, model[1].encode(p), 6)
        assert r.choices[2 * i].text == want and r.choices[2 * i + 1].text == want
    assert r.usage.prompt_tokens == sum(len(model[1].encode(p)) for p in prompts)
    assert 0 < r.usage.completion_tokens <= 6 * 6

    # n sampled choices with a seed differ from each other, and repeat
    body = dict(model=NAME, max_tokens=8, temperature=1.0, seed=5, n=3,
                messages=[{"role": "user", "content": "Hi"}])
    first = client.chat.completions.create(**body)
    again = client.chat.completions.create(**body)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices] and len(set(texts)) > 1
    assert first.usage.prompt_tokens == len(chat_ids(model, body["messages"]))

    # streamed: each choice's deltas add up to its text
    stream = client.chat.completions.create(**body, stream=True)
    got = {}
    for chunk in stream:
        for c in chunk.choices:
            got[c.index] = got.get(c.index, "") + (c.delta.content or "")
    assert [got[i] for i in range(3)] == texts


def test_a_client_that_disconnects_mid_stream_frees_the_model(live, model):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{live.url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            got = [next(lines) for _ in range(8)]
            assert all(not line or line.startswith("data: ") for line in got)
            assert live.engine.running == 1
        # 1000 tokens take seconds here; a cancelled job ends within a token or two
        assert live.wait_idle(timeout=5.0) < 5.0
    with httpx.Client(timeout=30) as http:
        r = http.post(f"{live.url}/api/chat", json={
            "model": NAME, "stream": False, "messages": [{"role": "user", "content": "Hi"}],
            "options": {"num_predict": 3}})
    assert r.status_code == 200 and r.json()["eval_count"] == 3


def test_a_full_queue_is_refused_at_once(model):
    server = LiveServer(create_app(*model, name=NAME, max_queue=1))
    # Hold the engine's thread inside a job of our own: the model is busy for as long as we like.
    busy, release = threading.Event(), threading.Event()

    def hold(event):
        busy.set()
        release.wait(30)

    blocker = server.engine.submit(model[1].encode("Hi"), {"max_tokens": 2}, hold)
    try:
        assert busy.wait(10)
        chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(httpx.post, f"{server.url}/v1/chat/completions", json=chat,
                                 timeout=30)
            deadline = time.time() + 10
            while server.engine.waiting < 1:
                assert time.time() < deadline, "the second request was not queued"
                time.sleep(0.01)
            t = time.time()
            refused = httpx.post(f"{server.url}/api/chat", json={**OLLAMA}, timeout=30)
            assert time.time() - t < 2
            assert refused.status_code == 503 and "busy" in refused.json()["error"]
            refused = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=30)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_busy"
            assert refused.headers["retry-after"] == str(RETRY_AFTER_S)
            release.set()
            assert queued.result().status_code == 200  # the queued one is served after all
    finally:
        release.set()
        blocker.cancel()
        server.stop()


# ---- bad input, auth ---------------------------------------------------------------------

CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
OLLAMA = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "stream": False,
          "options": {"num_predict": 4}}


@pytest.mark.parametrize("path,body,status,says", [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "valid dictionary"),
    ("/v1/chat/completions", {**CHAT, "messages": "Hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -5}, 400, "at least 1"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10**12}, 400, "exceeds the context"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 1000}, 400, "1000 sequences"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Hi " * 2000}]},
     400, "does not fit"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "empty"),
    ("/v1/completions", {"model": NAME, "prompt": ["a", ""]}, 400, "empty"),
    ("/api/chat", b"{", 400, "not valid JSON"),
    ("/api/chat", {**OLLAMA, "model": "llama3"}, 404, "not found"),
    ("/api/chat", {**OLLAMA, "options": {"num_predict": -7}}, 400, "num_predict"),
    ("/api/chat", {**OLLAMA, "options": {"temperature": "x"}}, 400, "temperature"),
    ("/api/generate", {"model": NAME, "prompt": 5}, 400, "prompt"),
    ("/api/generate", {"prompt": "Hi"}, 400, "model"),
    ("/api/nothing", {}, 404, "Not Found"),
])
def test_bad_requests_get_errors_in_the_api_s_own_format(live, path, body, status, says):
    with httpx.Client(timeout=30) as http:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = http.post(f"{live.url}{path}", content=content)
        assert r.status_code == status
        error = r.json()["error"]
        message = error if path.startswith("/api/") else error["message"]
        assert isinstance(message, str) and says in message
        assert http.get(f"{live.url}/health").json()["status"] == "ok"


def test_api_key(model):
    server = LiveServer(create_app(*model, name=NAME, api_key="s3cret"))
    try:
        with httpx.Client(timeout=30) as http:
            assert http.get(f"{server.url}/health").status_code == 200
            assert http.get(f"{server.url}/v1/models").status_code == 401
            assert http.get(f"{server.url}/api/tags").json() == {
                "error": "a valid API key is needed: Authorization: Bearer <key>"}
            wrong = {"Authorization": "Bearer nope"}
            assert http.post(f"{server.url}/api/chat", json=OLLAMA, headers=wrong).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope").models.list()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret")
        assert client.chat.completions.create(**CHAT).choices[0].message.content
        o = ollama.Client(host=server.url, headers={"Authorization": "Bearer s3cret"})
        assert o.chat(model=NAME, messages=OLLAMA["messages"], options={"num_predict": 2}).done
    finally:
        server.stop()


# ---- the prefix cache ----------------------------------------------------------------------

def test_a_follow_up_turn_prefills_only_its_new_tokens(live, model):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Pick a number between one and ten."}]
    first = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6,
                                           temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Now double it."}]
    second = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6,
                                            temperature=0)
    # the whole first prompt is reused; what is prefilled is the reply and the new turn
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    new = second.usage.prompt_tokens - second.usage.prompt_tokens_details.cached_tokens
    assert new <= second.usage.prompt_tokens - first.usage.prompt_tokens
    # ... and the reply is what a from-scratch run gives
    assert second.choices[0].message.content == alone(model, chat_ids(model, messages), 6)

    # Ollama counts the whole prompt, and the cached part apart (as current Ollama does)
    with httpx.Client(timeout=30) as http:
        again = http.post(f"{live.url}/api/chat", json={
            "model": NAME, "messages": messages, "stream": False,
            "options": {"num_predict": 6, "temperature": 0}}).json()
    assert again["prompt_eval_count"] == len(chat_ids(model, messages))
    # all cached but the last token, recomputed for its logits
    assert again["prompt_eval_cached_count"] == again["prompt_eval_count"] - 1


def test_the_prefix_cache_keeps_to_its_byte_budget(model):
    # room for about 3 of these prompts' caches (a finished sequence's cache holds its tokens)
    tokens = len(model[1].encode("prompt number 0 " * 20)) + 4
    layer = 2 * model[0].args.num_key_value_heads * tokens * model[0].args.dims_per_head * 4
    BUDGET = int(3.5 * layer * len(model[0].layers))
    engine = Engine(*model, cache_bytes=BUDGET)
    try:
        tokenizer = model[1]
        for i in range(6):
            done = queue_and_wait(engine, tokenizer.encode(f"prompt number {i} " * 20), 4)
            assert isinstance(done, Done)
            assert engine.prompt_cache.nbytes <= BUDGET
        assert 1 < len(engine.prompt_cache) < 6  # the oldest went first

        # a resumed prompt that was evicted is prefilled in full, a recent one is not
        recent = queue_and_wait(engine, tokenizer.encode("prompt number 5 " * 20), 4)
        old = queue_and_wait(engine, tokenizer.encode("prompt number 0 " * 20), 4)
        assert recent.cached_tokens == recent.prompt_tokens - 1
        assert old.cached_tokens < 10  # only the shared "prompt number" start
    finally:
        engine.close()


def queue_and_wait(engine: Engine, ids: list[int], max_tokens: int):
    events = []
    finished = threading.Event()

    def sink(event):
        events.append(event)
        if not hasattr(event, "token"):
            finished.set()

    engine.submit(ids, {"max_tokens": max_tokens, "temp": 0.0}, sink)
    assert finished.wait(30)
    return events[-1]


def test_closing_the_engine_finishes_its_worker(model):
    engine = Engine(*model, max_batch=1)
    events = []
    engine.submit(model[1].encode("Hello"), {"max_tokens": 5000}, events.append)
    engine.submit(model[1].encode("Hi"), {"max_tokens": 5}, events.append)  # queued
    deadline = time.time() + 10
    while not events:
        assert time.time() < deadline
        time.sleep(0.01)
    assert engine.close(timeout=10) and engine.finished.is_set()
    failed = [e for e in events if isinstance(e, Failed)]
    assert len(failed) == 2 and all(f.retry and "shutting down" in f.message for f in failed)
    assert not any(isinstance(e, Done) for e in events)


def test_kv_bits_serves_one_request_at_a_time(loaded):
    model = loaded("mqa")  # head dim 32: quantizable KV
    with pytest.raises(HermesError, match="one request at a time"):
        Engine(*model, kv_bits=8)  # the default max_batch is for batching
    engine = Engine(*model, max_batch=1, kv_bits=8)
    try:
        done = queue_and_wait(engine, model[1].encode("Hello"), 4)
        assert isinstance(done, Done) and done.generated_tokens == 4
    finally:
        engine.close()


def test_engine_refuses_when_the_queue_is_full(model):
    engine = Engine(*model, max_batch=1, max_queue=1)
    try:
        ids = model[1].encode("Hello")
        started = threading.Event()
        first = engine.submit(ids, {"max_tokens": 2000}, lambda e: started.set())
        assert started.wait(10)
        engine.submit(ids, {"max_tokens": 2}, lambda e: None)
        with pytest.raises(Busy):
            engine.submit(ids, {"max_tokens": 2}, lambda e: None)
        first.cancel()
    finally:
        engine.close()


class Unstartable:
    """Sampling options whose sampler cannot be made: a request that fails in the worker."""

    def sampler(self):
        raise RuntimeError("no sampler today")


def test_the_worker_survives_a_failing_sink_and_logs_it(model, caplog):
    engine = Engine(*model)
    try:
        ids = model[1].encode("Hello")
        calls = {"n": 0}

        def broken(event):
            calls["n"] += 1
            raise OSError("the client's socket broke")

        def failing_in_except(event):  # a job that fails, then a sink that fails on Failed
            raise ValueError("and the sink fails too")

        engine.submit(ids, {"max_tokens": 50}, broken)
        engine.submit(ids, {"max_tokens": 3, "sampling": Unstartable()}, failing_in_except)
        done = queue_and_wait(engine, ids, 3)  # later requests still run
        assert isinstance(done, Done) and done.generated_tokens == 3
        assert calls["n"] < 50  # the broken job stopped at its first event
    finally:
        engine.close()
    logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("sink failed" in r.getMessage() and r.exc_info for r in logged)
    assert any("request failed" in r.getMessage() and r.exc_info for r in logged)
    assert sum("sink failed" in r.getMessage() for r in logged) == 2  # once per broken job


# ---- the command ---------------------------------------------------------------------------

def test_serve_bad_input_is_one_line(tiny_model):
    runner = CliRunner()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = runner.invoke(main, ["serve", "-m", str(tiny_model), "--port", str(port)])
    assert r.exit_code != 0 and f"cannot listen on 127.0.0.1:{port}" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(main, ["serve", "-m", str(tiny_model), "--max-queue", "0"])
    assert r.exit_code != 0 and "--max-queue" in r.output
    r = runner.invoke(main, ["serve", "-m", str(tiny_model), "--temp", "-1"])
    assert r.exit_code != 0 and "temp" in r.output
    r = runner.invoke(main, ["serve", "-m", str(tiny_model), "--kv-bits", "4", "--max-batch", "4"])
    assert r.exit_code == 1 and "--kv-bits runs one request at a time" in r.output
    r = runner.invoke(main, ["serve", "-m", str(tiny_model), "--max-batch", "0"])
    assert r.exit_code != 0 and "--max-batch" in r.output
    r = runner.invoke(main, ["serve", "-m", str(tiny_model)], env={"MLX_RANK": "0"})
    assert r.exit_code != 0 and "serve runs on one machine" in r.output


def test_serve_process_smoke(tiny_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        mlx_hermes_command() + ["--log-level", "info", "serve", "-m", str(tiny_model),
                                "--port", str(port), "--model-name", "hermes", "--api-key", "k",
                                "--max-tokens", "5", "--max-batch", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.time() < deadline, process.stdout.read()
            time.sleep(0.2)
        client = ollama.Client(host=url, headers={"Authorization": "Bearer k"})
        reply = client.chat(model="hermes", messages=[{"role": "user", "content": "Hi"}])
        assert reply.done and reply.eval_count <= 5
        # Ctrl-C in the middle of a long streamed reply, another queued: a prompt, clean exit
        long = client.chat(model="hermes", messages=[{"role": "user", "content": "Hi"}],
                           stream=True, options={"num_predict": 100_000})
        next(long)
        queued = threading.Thread(target=lambda: httpx.post(
            f"{url}/api/chat", headers={"Authorization": "Bearer k"}, timeout=60,
            json={"model": "hermes", "messages": [{"role": "user", "content": "Hi"}]}))
        queued.start()
        deadline = time.time() + 10
        while httpx.get(f"{url}/health").json()["waiting"] < 1:
            assert time.time() < deadline, "the second request was not queued"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGINT)
        t = time.time()
        out, _ = process.communicate(timeout=30)
    assert time.time() - t < 15
    assert process.returncode == 0, f"exit {process.returncode}: {out}"
    assert "serving hermes on http://127.0.0.1" in out and "Traceback" not in out
    assert "engine stopped" in out  # the worker finished its work before the process ended


# ---- LangChain, as agent frameworks use it ---------------------------------------------------

def test_langchain_structured_output_and_tools(live):
    from langchain_ollama import ChatOllama
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Person(BaseModel):
        """A person. (Only bounded fields: LangChain's strict schemas drop maxLength and
        number ranges, and a random model's free string may not end within max_tokens.)"""

        mood: Literal["happy", "sad"]
        adult: bool

    def get_weather(city: Literal["Paris", "Oslo"]) -> str:
        """The weather in a city."""
        return "sunny"

    chat = ChatOpenAI(base_url=f"{live.url}/v1", api_key="unused", model=NAME, max_tokens=60,
                      max_retries=0)
    person = chat.with_structured_output(Person, method="json_schema").invoke("Who?")
    assert isinstance(person, Person) and person.mood in ("happy", "sad")
    try:  # json_mode: any object, Person's fields not enforced; it may not end in 60 tokens
        loose = chat.with_structured_output(Person, method="json_mode", include_raw=True).invoke(
            "Who? Answer in JSON.")
        assert loose["raw"].content.startswith("{")
    except openai.LengthFinishReasonError:  # the cut is reported as such, never as complete
        pass
    called = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather?")
    assert called.tool_calls and called.tool_calls[0]["name"] == "get_weather"
    assert called.tool_calls[0]["args"]["city"] in ("Paris", "Oslo")

    local = ChatOllama(base_url=live.url, model=NAME, num_predict=60)
    person = local.with_structured_output(Person, method="json_schema").invoke("Who?")
    assert isinstance(person, Person) and isinstance(person.adult, bool)
    reply = local.bind_tools([get_weather]).invoke("Weather?")
    assert isinstance(reply.content, str) and all(
        c["name"] == "get_weather" for c in reply.tool_calls)
