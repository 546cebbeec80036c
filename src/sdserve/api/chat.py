"""The chat routes: ModelsLab's (`uncensored_chat`, `chat_llm/*`: queued chat jobs whose answer is
text) and OpenAI's (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, with SSE streaming),
answered by one of two backends: the upstream proxy, or chat jobs the worker runs on the
embedded model. The OpenAI routes keep no conversation: the client sends the history."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from sdserve.api.deps import CallerDep, authenticate, read_body
from sdserve.api.envelope import answer, job_meta, message_body
from sdserve.api.openapi import answers, body, openai_answers
from sdserve.api.state import ServerState, get_state
from sdserve.api.submit import queue_spec, wait_until_done
from sdserve.engine.chat import ChatAnswer
from sdserve.engine.chat_upstream import UpstreamChat, UpstreamFailed
from sdserve.errors import (
    EngineError,
    InvalidKey,
    JobNotFound,
    QuotaExceeded,
    RateLimited,
    SdserveError,
    ValidationFailed,
)
from sdserve.jobs.keys import Principal
from sdserve.jobs.views import JobView
from sdserve.schemas import answers as wire
from sdserve.schemas import chat as schema
from sdserve.schemas.common import Context, Dialect

CHAT = Dialect("chat", "/api/v1/chat_llm/fetch/{id}", "The answer is being written")
_QUEUED_RESPONSE = "/api/v1/chat_llm/get_queued_response"
_STREAM_POLL_SECONDS = 0.25  # a worker in another process cannot wake a stream: re-read the job
_OPENAI_PREFIXES = ("/api/uncensored-chat/v1", "/uncensored-chat/v1")

router = APIRouter(tags=["chat"])
# What the OpenAPI document says of the routes (declared only: answers are sent as they are).
_CHAT_ANSWERS = answers(wire.ChatJobAnswer, with_error=False)
_UNCENSORED = {"responses": _CHAT_ANSWERS, "openapi_extra": body(schema.UncensoredChatBody)}


# ---- ModelsLab: queued chat jobs answered with their text -------------------------------------


@router.post("/api/v5/uncensored_chat", summary="uncensored chat (era A)", **_UNCENSORED)
@router.post("/api/v6/llm/uncensored_chat", summary="uncensored chat (era B)", **_UNCENSORED)
@router.post(
    "/api/v1/chat_llm/uncensored_chat", summary="uncensored chat (chat_llm)", **_UNCENSORED
)
async def uncensored_chat(found: CallerDep):
    spec = await run_in_threadpool(schema.uncensored_chat, found.body, _context(found))
    return await _submit_and_answer(found.state, found.principal, spec)


@router.post(
    "/api/v1/chat_llm/chat",
    summary="chat: a prompt, answered or queued",
    responses=_CHAT_ANSWERS,
    openapi_extra=body(schema.ChatLlmBody),
)
async def chat_llm(found: CallerDep):
    history: list[dict[str, str]] = []
    if found.body.get("chat_id") not in (None, ""):
        earlier = await _own_chat(found.state, found.principal, found.body)
        if earlier.status != "success":
            raise ValidationFailed({"chat_id": [f"The chat {earlier.id} has no answer yet."]})
        history = _conversation(earlier)
    spec = await run_in_threadpool(schema.chat_llm, found.body, _context(found), history)
    return await _submit_and_answer(found.state, found.principal, spec)


@router.post(
    "/api/v1/chat_llm/get_queued_response",
    summary="the answer of a queued chat",
    responses=_CHAT_ANSWERS,
    openapi_extra=body(schema.ChatIdBody),
)
async def get_queued_response(found: CallerDep):
    job = await _own_chat(found.state, found.principal, found.body)
    return answer(await run_in_threadpool(_chat_body, found.state, job))


@router.post(
    "/api/v1/chat_llm/get_chat",
    summary="a chat's conversation so far",
    responses=answers(wire.ChatConversation),
    openapi_extra=body(schema.ChatIdBody),
)
async def get_chat(found: CallerDep):
    job = await _own_chat(found.state, found.principal, found.body)
    return answer(
        {
            "status": "success",
            "chat_id": job.id,
            "chat_status": job.status,
            "messages": _conversation(job),
            "track_id": job.track_id,
        }
    )


def _context(found) -> Context:
    return Context(found.state.settings, found.state.registry, found.principal.owner)


async def _submit_and_answer(state: ServerState, principal: Principal, spec) -> JSONResponse:
    job = await queue_spec(state, principal, spec, CHAT)
    wait = 0.0 if spec.instant_response else state.settings.sync_wait_seconds
    job = await wait_until_done(state, job, wait)
    return answer(await run_in_threadpool(_chat_body, state, job))


async def _own_chat(state: ServerState, principal: Principal, body: dict) -> JobView:
    """The chat `chat_id` names, if it is this key's (any other key's is not found)."""
    value = body.get("chat_id")
    try:
        chat_id = int(str(value).strip())
    except ValueError:
        raise ValidationFailed({"chat_id": ["The chat id field is required."]}) from None
    job = await run_in_threadpool(state.store.get, chat_id, principal.owner)
    if job.kind != "chat":
        raise JobNotFound()
    return job


def _answer_of(job: JobView) -> ChatAnswer | None:
    found = ((job.result or {}).get("meta") or {}).get("chat")
    return ChatAnswer(**found) if found else None


def _conversation(job: JobView) -> list[dict[str, str]]:
    messages = list(job.params.get("messages") or [])
    reply = _answer_of(job)
    if reply is not None:
        messages.append({"role": "assistant", "content": reply.text})
    return messages


def _meta(job: JobView) -> dict[str, Any]:
    return {k: v for k, v in job_meta(job).items() if k != "chat"}


def _chat_body(state: ServerState, job: JobView) -> dict[str, Any]:
    """§13.1: `message` is the answer text; queued, it is `processing` with the `chat_id`."""
    common = {"chat_id": job.id, "id": job.id, "meta": _meta(job), "track_id": job.track_id}
    if job.status == "failed":
        return message_body("failed", job.error or "Failed, Try Again", **common)
    reply = _answer_of(job)
    if job.status == "success" and reply is not None:
        return {
            "status": "success",
            "message": reply.text,
            "generationTime": round(job.generation_time or 0.0, 3),
            **common,
            "usage": _usage(reply),
            "finish_reason": reply.finish_reason,
        }
    info = state.store.queue_info(job)
    return message_body(
        "processing",
        CHAT.processing_message,
        eta=info.eta,
        fetch_result=state.settings.base_url + _QUEUED_RESPONSE,
        tip="Fetch the answer with get_queued_response and this chat_id",
        **common,
    )


def _usage(reply: ChatAnswer) -> dict[str, int]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


# ---- OpenAI: one interface, two backends ------------------------------------------------------


class ChatBackend(Protocol):
    """Answers an OpenAI request: whole (a completion object) or as a stream of chunk objects."""

    async def complete(self, request: ChatRequest) -> dict[str, Any]: ...

    def stream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]: ...


class ChatRequest:
    """One OpenAI request as the backends see it: its body, its typed params, and who sent it."""

    def __init__(self, path: str, body: dict, call: schema.OpenAICall, principal: Principal):
        self.path = path  # "/chat/completions" or "/completions"
        self.chat = path == "/chat/completions"
        # the client's body for the upstream: no sdserve key, max_tokens within this server's cap
        dropped = ("key", "max_completion_tokens", "max_new_tokens")
        self.body = {k: v for k, v in body.items() if k not in dropped}
        self.body["max_tokens"] = call.params.max_new_tokens
        self.call = call
        self.principal = principal
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = call.params.model_id


class ProxyBackend:
    """An OpenAI-compatible upstream: bodies pass through (model names mapped), and so does its
    stream. Each request counts against the key's month like a job."""

    def __init__(self, state: ServerState):
        self.state = state
        self.upstream = UpstreamChat(state.settings)

    async def _count(self, request: ChatRequest) -> None:
        p = request.principal
        if p.key_id is not None:
            await run_in_threadpool(self.state.store.count_request, p.key_id, p.monthly_quota)

    async def complete(self, request: ChatRequest) -> dict[str, Any]:
        await self._count(request)
        return await self.upstream.post(request.path, {**request.body, "stream": False})

    async def stream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        await self._count(request)
        async for event in self.upstream.stream(request.path, request.body):
            yield event


class QueuedBackend:
    """Chat jobs the worker runs on the embedded model, under the key's queue limit and quota.
    A stream follows the job's partial text (the worker writes it as the tokens come)."""

    def __init__(self, state: ServerState):
        self.state = state

    async def _queue(self, request: ChatRequest) -> JobView:
        state = self.state
        context = Context(state.settings, state.registry, request.principal.owner)
        spec = schema.openai_spec(request.call, context)
        return await queue_spec(state, request.principal, spec, CHAT)

    def _reply(self, job: JobView) -> ChatAnswer:
        reply = _answer_of(job)
        if job.status == "failed":
            raise EngineError(job.error or "The chat failed")
        if reply is None:
            seconds = self.state.settings.chat_wait_seconds
            raise UpstreamFailed(f"The answer took longer than {seconds:g} seconds", 504)
        return reply

    async def complete(self, request: ChatRequest) -> dict[str, Any]:
        job = await self._queue(request)
        job = await wait_until_done(self.state, job, self.state.settings.chat_wait_seconds)
        reply = self._reply(job)
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": reply.finish_reason,
            "logprobs": None,
        }
        if request.chat:
            choice["message"] = {"role": "assistant", "content": reply.text}
        else:
            choice["text"] = reply.text
        return {
            "id": request.id,
            "object": "chat.completion" if request.chat else "text_completion",
            "created": request.created,
            "model": request.model,
            "choices": [choice],
            "usage": _usage(reply),
            "system_fingerprint": None,
        }

    async def stream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        state = self.state
        job = await self._queue(request)
        if request.chat:
            yield _chunk(request, {"role": "assistant", "content": ""}, None)
        sent = 0
        deadline = time.monotonic() + state.settings.chat_wait_seconds
        woken = state.bus.subscribe(job.id)  # the in-process worker wakes us; others are polled
        try:
            while True:
                job = await run_in_threadpool(state.store.get, job.id)
                if job.status in ("success", "failed") or time.monotonic() > deadline:
                    break
                partial = (job.result or {}).get("partial") or {}
                for piece in partial.get("pieces", [])[sent:]:
                    sent += 1
                    yield _chunk(request, {"content": piece} if request.chat else piece, None)
                try:
                    await asyncio.wait_for(woken.wait(), timeout=_STREAM_POLL_SECONDS)
                except TimeoutError:
                    pass
                woken.clear()
        finally:
            state.bus.unsubscribe(job.id, woken)
        reply = self._reply(job)
        for piece in reply.pieces[sent:]:
            yield _chunk(request, {"content": piece} if request.chat else piece, None)
        yield _chunk(request, {} if request.chat else "", reply.finish_reason)
        if request.call.include_usage:
            yield {**_chunk(request, {}, None), "choices": [], "usage": _usage(reply)}


def _chunk(request: ChatRequest, delta: Any, finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if request.chat:
        choice["delta"] = delta
    else:
        choice["text"] = delta
    return {
        "id": request.id,
        "object": "chat.completion.chunk" if request.chat else "text_completion",
        "created": request.created,
        "model": request.model,
        "choices": [choice],
    }


def backend(state: ServerState) -> ChatBackend:
    return ProxyBackend(state) if state.settings.chat_upstream_url else QueuedBackend(state)


async def _openai(request: Request, path: str, *, modelslab: bool = False):
    """An OpenAI route: errors are OpenAI error objects with real status codes (OpenAI clients
    raise on the status); `modelslab` (v7) adds `status` and `message` for its clients."""
    try:
        state = get_state(request)
        body = await read_body(request, state.settings)
        principal = authenticate(request, body, state.keys)
        call = schema.openai_call(body, state.settings, chat=path == "/chat/completions")
        chat = ChatRequest(path, body, call, principal)
        answering = backend(state)
        if not call.stream:
            result = await answering.complete(chat)
            if modelslab:
                choice = (result.get("choices") or [{}])[0]
                text = (choice.get("message") or {}).get("content", choice.get("text"))
                result = {"status": "success", "message": text, **result}
            return answer(result)
        events = answering.stream(chat)
        first = await anext(events, None)  # errors before any event still get their status
    except SdserveError as exc:
        return _openai_error(exc, modelslab)
    return StreamingResponse(
        _sse(first, events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(first: dict | None, events: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield b"data: " + orjson.dumps(first) + b"\n\n"
        async for event in events:
            yield b"data: " + orjson.dumps(event) + b"\n\n"
    except SdserveError as exc:  # mid-stream: the status is sent already; say it in the stream
        yield b"data: " + orjson.dumps(_openai_error_body(exc)) + b"\n\n"
    yield b"data: [DONE]\n\n"


def _openai_error_body(exc: SdserveError) -> dict[str, Any]:
    kind, code, param = "invalid_request_error", None, None
    if isinstance(exc, InvalidKey):
        code = "invalid_api_key"
    elif isinstance(exc, ValidationFailed):
        param = next(iter(exc.fields), None)
        code = "model_not_found" if param in ("model", "model_id") else "invalid_value"
    elif isinstance(exc, QuotaExceeded):
        kind = code = "insufficient_quota"
    elif isinstance(exc, RateLimited):
        kind, code = "rate_limit_exceeded", "rate_limit_exceeded"
    elif exc.http_status >= 500:
        kind = "server_error"
        code = "timeout" if exc.http_status == 504 else None
    return {"error": {"message": exc.message, "type": kind, "param": param, "code": code}}


def _openai_error(exc: SdserveError, modelslab: bool) -> JSONResponse:
    body = _openai_error_body(exc)
    status = exc.http_status
    if isinstance(exc, ValidationFailed):
        status = 404 if body["error"]["code"] == "model_not_found" else 400
    elif isinstance(exc, QuotaExceeded | RateLimited):
        status = 429
    if modelslab:
        body = {"status": "error", "message": exc.message, **body}
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _models(request: Request):
    try:
        state = get_state(request)
        authenticate(request, {}, state.keys)
    except SdserveError as exc:
        return _openai_error(exc, False)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "sdserve"}
        for name in schema.served_models(state.settings)
    ]
    return answer({"object": "list", "data": data})


def _add_openai_routes() -> None:
    async def chat_completions(request: Request):
        return await _openai(request, "/chat/completions")

    async def completions(request: Request):
        return await _openai(request, "/completions")

    async def v7_chat_completions(request: Request):
        return await _openai(request, "/chat/completions", modelslab=True)

    for prefix in _OPENAI_PREFIXES:
        hidden = not prefix.startswith("/api")  # one operation id per verb in the schema
        for verb, endpoint, request, ok in (
            ("chat/completions", chat_completions, schema.ChatCompletionBody, wire.ChatCompletion),
            ("completions", completions, schema.CompletionBody, wire.TextCompletion),
        ):
            router.add_api_route(
                f"{prefix}/{verb}",
                endpoint,
                methods=["POST"],
                summary=f"OpenAI-compatible {verb}",
                include_in_schema=not hidden,
                responses=openai_answers(ok, wire.OpenAIError, stream=True),
                openapi_extra=body(request),
            )
        router.add_api_route(
            f"{prefix}/models",
            _models,
            methods=["GET"],
            summary="OpenAI-compatible model list",
            include_in_schema=not hidden,
            responses=openai_answers(wire.ModelCards, wire.OpenAIError),
        )
    router.add_api_route(
        "/api/v7/llm/chat/completions",
        v7_chat_completions,
        methods=["POST"],
        summary="chat completions (v7)",
        responses=openai_answers(wire.V7ChatCompletion, wire.V7Error, stream=True),
        openapi_extra=body(schema.ChatCompletionBody),
    )


_add_openai_routes()
