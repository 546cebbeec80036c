"""Chat through the server: the ModelsLab routes (uncensored_chat, chat_llm) and the OpenAI ones,
called by the official `openai` client, on the embedded tiny model; then the proxy backend
against a real OpenAI-shaped upstream on loopback (pass-through, streaming, its errors and
silences), and a chat answered while image jobs fill the queue."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from conftest import ADMIN_KEY, ServerProcess, create_key

from sdserve.testing import free_port

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


def client(server, key: str, prefix: str = "/api/uncensored-chat/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + prefix, api_key=key, max_retries=0, timeout=120)


# ---- ModelsLab routes on the embedded model ---------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v5/uncensored_chat", "/api/v6/llm/uncensored_chat"])
def test_uncensored_chat_answers_with_the_text_and_echoes_meta(server, user_key, path):
    answer = server.post(path, {"key": user_key, "messages": MESSAGES, "max_tokens": 8}).json()
    assert answer["status"] == "success", answer
    assert isinstance(answer["message"], str) and answer["message"]
    meta = answer["meta"]
    assert meta["messages"] == MESSAGES and meta["max_tokens"] == 8
    assert (meta["temperature"], meta["top_p"]) == (1.0, 1.0)
    assert (meta["presence_penalty"], meta["frequency_penalty"]) == (0.0, 0.0)
    assert meta["track_id"] is None and meta["webhook"] is None
    usage = answer["usage"]
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_the_same_seed_gives_the_same_answer(server, user_key):
    def ask(seed):
        body = {"key": user_key, "messages": MESSAGES, "max_tokens": 12, "seed": seed}
        body |= {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "presence_penalty": 0.5}
        return server.post("/api/v5/uncensored_chat", body).json()["message"]

    assert ask(7) == ask(7)
    assert ask(7) != ask(8)


def test_chat_llm_queues_then_answers_by_chat_id_to_its_own_key_only(server, user_key):
    body = {"key": user_key, "prompt": "Tell me a story", "system_prompt": "Be kind."}
    body |= {"max_new_tokens": 6, "instant_response": True, "seed": 5, "track_id": "t1"}
    queued = server.post("/api/v1/chat_llm/chat", body).json()
    assert queued["status"] == "processing", queued
    chat_id = queued["chat_id"]
    assert queued["fetch_result"].endswith("/api/v1/chat_llm/get_queued_response")
    deadline = time.monotonic() + 60
    while True:
        got = server.post(
            "/api/v1/chat_llm/get_queued_response", {"key": user_key, "chat_id": chat_id}
        ).json()
        if got["status"] != "processing" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got["status"] == "success", got
    assert isinstance(got["message"], str) and got["usage"]["completion_tokens"] <= 6
    assert got["meta"]["prompt"] == "Tell me a story" and got["track_id"] == "t1"

    conversation = server.post(
        "/api/v1/chat_llm/get_chat", {"key": user_key, "chat_id": str(chat_id)}
    ).json()
    assert [m["role"] for m in conversation["messages"]] == ["system", "user", "assistant"]
    assert conversation["messages"][-1]["content"] == got["message"]

    # continuing: the earlier conversation comes first
    more = server.post(
        "/api/v1/chat_llm/chat",
        {"key": user_key, "chat_id": chat_id, "prompt": "And then?", "max_new_tokens": 4},
    ).json()
    assert more["status"] == "success", more
    again = server.post("/api/v1/chat_llm/get_chat", {"key": user_key, "chat_id": more["chat_id"]})
    roles = [m["role"] for m in again.json()["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]

    other = create_key(server.data_dir)
    for verb in ("get_chat", "get_queued_response"):
        hidden = server.post(f"/api/v1/chat_llm/{verb}", {"key": other, "chat_id": chat_id}).json()
        assert hidden["status"] == "error", hidden
    sync = server.post(
        "/api/v1/chat_llm/uncensored_chat", {"key": user_key, "messages": MESSAGES, "max_tokens": 3}
    ).json()
    assert sync["status"] == "success" and sync["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize(
    "body,field",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": {"x": 1}}]}, "messages"),
        ({"messages": MESSAGES, "max_tokens": 10_000_000}, "max_tokens"),
        ({"messages": MESSAGES, "model_id": "gpt-9"}, "model_id"),
        ({"messages": MESSAGES, "temperature": 5}, "temperature"),
    ],
)
def test_modelslab_bad_input_is_a_clear_error(server, user_key, body, field):
    answer = server.post("/api/v5/uncensored_chat", {"key": user_key, **body}).json()
    assert answer["status"] == "error", answer
    assert field in answer["messege"], answer


def test_modelslab_routes_need_a_key(server):
    answer = server.post("/api/v5/uncensored_chat", {"key": "nope", "messages": MESSAGES}).json()
    assert answer["status"] == "error" and answer["message"] == "Invalid Api Key"


# ---- OpenAI routes on the embedded model, through the official client -----------------------


@pytest.mark.parametrize("prefix", ["/api/uncensored-chat/v1", "/uncensored-chat/v1"])
def test_openai_client_creates_and_streams_the_same_answer(server, user_key, prefix):
    llm = client(server, user_key, prefix)
    made = llm.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=10, seed=11, temperature=0.8
    )
    assert made.object == "chat.completion" and made.model == "tiny-chat"
    text = made.choices[0].message.content
    assert made.choices[0].message.role == "assistant" and text
    assert made.choices[0].finish_reason in ("stop", "length")
    assert 1 <= made.usage.completion_tokens <= 10
    assert made.usage.total_tokens == made.usage.prompt_tokens + made.usage.completion_tokens

    chunks = list(
        llm.chat.completions.create(
            model="tiny-chat",
            messages=MESSAGES,
            max_tokens=10,
            seed=11,
            temperature=0.8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in content if p]) > 1  # token by token, not one block
    assert "".join(content) == text  # same seed, same answer, streamed or not
    assert chunks[-1].usage.completion_tokens == made.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == made.choices[
        0
    ].finish_reason


def test_openai_completions_and_models(server, user_key):
    llm = client(server, user_key)
    made = llm.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=5)
    assert made.object == "text_completion" and isinstance(made.choices[0].text, str)
    assert made.usage.completion_tokens <= 5
    streamed = list(
        llm.completions.create(model="tiny-chat", prompt="Once", max_tokens=4, seed=2, stream=True)
    )
    assert streamed and all(c.object == "text_completion" for c in streamed)
    empty = llm.completions.create(model="tiny-chat", prompt="", max_tokens=2)  # from BOS
    assert empty.usage.prompt_tokens == 1 and isinstance(empty.choices[0].text, str)
    assert [m.id for m in llm.models.list()] == ["tiny-chat"]


def test_raw_sse_ends_with_done(server, user_key):
    body = {"messages": MESSAGES, "max_tokens": 4, "stream": True}
    headers = {"Authorization": f"Bearer {user_key}"}
    with httpx.stream(
        "POST",
        server.url + "/uncensored-chat/v1/chat/completions",
        json=body,
        headers=headers,
        timeout=120,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_embedded_stream_sends_tokens_while_the_answer_is_written(server, user_key):
    llm = client(server, user_key)
    arrivals = []
    started = time.monotonic()
    stream = llm.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=600, stream=True, temperature=0
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) > 100
    # the first tokens came long before the last: the stream follows the worker
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])


def test_openai_errors_are_openai_shaped(server, user_key):
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(server, "wrong-key").chat.completions.create(model="tiny-chat", messages=MESSAGES)
    assert wrong.value.status_code == 401 and wrong.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong-key").models.list()
    llm = client(server, user_key)
    with pytest.raises(openai.NotFoundError) as model:
        llm.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert model.value.body["code"] == "model_not_found"
    bad = [
        {"messages": []},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": MESSAGES, "max_tokens": 10_000_000},
        {"messages": MESSAGES, "n": 3},
    ]
    for extra in bad:
        with pytest.raises(openai.BadRequestError) as refused:
            llm.chat.completions.create(model="tiny-chat", **extra)
        assert refused.value.body["type"] == "invalid_request_error", extra
    # a streamed request refused before it starts still gets its status code
    with pytest.raises(openai.BadRequestError):
        llm.chat.completions.create(model="tiny-chat", messages=[], stream=True)


def test_v7_chat_completions_answers_both_ways(server, user_key):
    response = server.post(
        "/api/v7/llm/chat/completions", {"key": user_key, "messages": MESSAGES, "max_tokens": 4}
    )
    answer = response.json()
    assert response.status_code == 200 and answer["status"] == "success", answer
    assert answer["choices"][0]["message"]["content"] == answer["message"]
    refused = server.post("/api/v7/llm/chat/completions", {"key": "nope", "messages": MESSAGES})
    assert refused.status_code == 401 and refused.json()["status"] == "error"


# ---- the proxy backend against an OpenAI-shaped upstream on loopback --------------------------


class FakeUpstream:
    """A small OpenAI-compatible server: it echoes the last message, streams it in two pieces,
    and on request fails (`please fail`) or hangs (`please hang`)."""

    def __init__(self):
        self.seen: list[tuple[str, dict, dict]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                upstream.seen.append((self.path, body, dict(self.headers)))
                if self.path.endswith("/chat/completions"):
                    last = body["messages"][-1]["content"]
                else:
                    last = body["prompt"]
                if "please hang" in last:
                    time.sleep(6)
                    return
                if "please fail" in last:
                    return self._json(500, {"error": {"message": "GPU on fire", "type": "x"}})
                text = f"echo: {last}"
                chat = self.path.endswith("/chat/completions")
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.end_headers()
                    for piece in (text[:4], text[4:]):
                        delta = {"delta": {"content": piece}} if chat else {"text": piece}
                        event = {"object": "chat.completion.chunk", "model": body["model"]}
                        event["choices"] = [{"index": 0, "finish_reason": None, **delta}]
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.close_connection = True
                    return
                choice = {"index": 0, "finish_reason": "stop"}
                choice |= (
                    {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                )
                usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
                self._json(
                    200,
                    {
                        "id": "up-1",
                        "object": "chat.completion",
                        "created": 1,
                        "model": body["model"],
                        "choices": [choice],
                        "usage": usage,
                    },
                )

            def _json(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def upstream():
    fake = FakeUpstream()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def proxy_server(tmp_path_factory, upstream):
    """A server whose chat is the upstream, and whose image jobs take 3 s each (no-op engine)."""
    srv = ServerProcess(
        tmp_path_factory.mktemp("chat-proxy"),
        SDSERVE_CHAT_UPSTREAM_URL=f"http://127.0.0.1:{upstream.port}/v1",
        SDSERVE_CHAT_UPSTREAM_KEY="upstream-secret",
        SDSERVE_CHAT_MODEL_MAP="uncensored=fake-llama-8b,small=fake-llama-1b",
        SDSERVE_CHAT_UPSTREAM_TIMEOUT="2",
        SDSERVE_ENGINE="noop",
        SDSERVE_NOOP_SECONDS="3",
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def proxy_key(proxy_server):
    return create_key(proxy_server.data_dir)


def test_proxy_passes_requests_and_streams_through(proxy_server, proxy_key, upstream):
    llm = client(proxy_server, proxy_key)
    made = llm.chat.completions.create(model="small", messages=MESSAGES, max_tokens=9)
    assert made.choices[0].message.content == "echo: What is the capital of France?"
    assert made.model == "small" and made.usage.completion_tokens == 3
    path, sent, headers = upstream.seen[-1]
    assert path == "/v1/chat/completions" and sent["model"] == "fake-llama-1b"
    assert sent["max_tokens"] == 9 and "key" not in sent
    assert headers["Authorization"] == "Bearer upstream-secret"

    chunks = list(llm.chat.completions.create(model="uncensored", messages=MESSAGES, stream=True))
    assert [c.choices[0].delta.content for c in chunks] == [
        "echo",
        ": What is the capital of France?",
    ]
    assert all(c.model == "uncensored" for c in chunks)
    assert upstream.seen[-1][1]["model"] == "fake-llama-8b"

    text = llm.completions.create(model="small", prompt="abc").choices[0].text
    assert text == "echo: abc"
    assert sorted(m.id for m in llm.models.list()) == ["small", "uncensored"]
    with pytest.raises(openai.NotFoundError):
        llm.chat.completions.create(model="tiny-chat", messages=MESSAGES)


def test_proxy_upstream_errors_and_silence_are_clear_and_quick(proxy_server, proxy_key):
    llm = client(proxy_server, proxy_key)
    failing = [{"role": "user", "content": "please fail"}]
    with pytest.raises(openai.APIStatusError) as failed:
        llm.chat.completions.create(model="small", messages=failing)
    assert failed.value.status_code == 502 and "GPU on fire" in failed.value.message
    hanging = [{"role": "user", "content": "please hang"}]
    for stream in (False, True):
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as silent:
            result = llm.chat.completions.create(model="small", messages=hanging, stream=stream)
            list(result)
        assert silent.value.status_code == 504 and "2 seconds" in silent.value.message
        assert time.monotonic() - started < 5
    # the ModelsLab route runs as a job through the same upstream, and fails as clearly
    refused = proxy_server.post(
        "/api/v5/uncensored_chat", {"key": proxy_key, "messages": hanging}
    ).json()
    assert refused["status"] == "failed" and "did not answer within 2" in refused["message"]


def test_proxied_chats_count_against_the_keys_month(proxy_server):
    plan = {"key": ADMIN_KEY, "plan_name": "chat_two", "requests_per_month": 2}
    assert proxy_server.post("/api/v1/enterprise/plans", plan).json()["status"] == "success"
    llm = client(proxy_server, create_key(proxy_server.data_dir, "--plan", "chat_two"))
    for _ in range(2):
        llm.chat.completions.create(model="small", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as refused:
        llm.chat.completions.create(model="small", messages=MESSAGES, stream=True)
    assert refused.value.body["code"] == "insufficient_quota"


def test_a_chat_is_answered_while_image_jobs_fill_the_queue(proxy_server, proxy_key):
    body = {"key": proxy_key, "prompt": "a cat", "width": 64, "height": 64}
    queued = [
        proxy_server.post("/api/v3/text2img", {**body, "instant_response": True}).json()
        for _ in range(3)
    ]
    assert all(q["status"] == "processing" for q in queued), queued
    started = time.monotonic()
    answer = proxy_server.post(
        "/api/v6/llm/uncensored_chat", {"key": proxy_key, "messages": MESSAGES, "model_id": "small"}
    ).json()
    assert answer["status"] == "success", answer
    assert answer["message"] == "echo: What is the capital of France?"
    assert time.monotonic() - started < 4  # the image jobs take 9 s between them
    still = proxy_server.post(f"/api/v3/fetch/{queued[-1]['id']}", {"key": proxy_key}).json()
    assert still["status"] == "processing"
