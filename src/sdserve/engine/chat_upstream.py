"""The proxy chat backend: any OpenAI-compatible engine (vLLM, llama.cpp's server, Ollama's /v1)
at a configured base URL, with its own key and a map from the model names clients send to the
names it serves. Its errors and silences become named errors, never a hang."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx

from sdserve.errors import SdserveError
from sdserve.settings import Settings

if TYPE_CHECKING:
    from sdserve.engine.chat import ChatAnswer, ChatParams


class UpstreamFailed(SdserveError):
    """The upstream chat engine answered with an error, or not at all."""

    http_status = 502

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.http_status = status


class UpstreamChat:
    def __init__(self, settings: Settings):
        self.base_url = (settings.chat_upstream_url or "").rstrip("/")
        self.timeout_seconds = settings.chat_upstream_timeout
        self.timeout = httpx.Timeout(settings.chat_upstream_timeout, connect=10.0)
        self.headers = {"Authorization": f"Bearer {settings.chat_upstream_key}"}
        if not settings.chat_upstream_key:
            self.headers = {}
        self.models = model_map(settings.chat_model_map)
        self.default_model = settings.chat_model

    def public_models(self) -> list[str]:
        return list(self.models) or [self.default_model]

    def upstream_model(self, public: str) -> str:
        return self.models.get(public, public)

    # ---- the OpenAI routes: the body passes through, `model` rewritten both ways ----------

    def prepare(self, path: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        public = body.get("model") or self.default_model
        return self.base_url + path, {**body, "model": self.upstream_model(public)}

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url, sent = self.prepare(path, body)
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.post(url, json=sent, headers=self.headers)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise _refused(response.status_code, response.content)
        try:
            answer = response.json()
        except ValueError:
            raise UpstreamFailed("The chat engine answered something other than JSON") from None
        return {**answer, "model": body.get("model") or self.default_model}

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The upstream's SSE events as objects; errors before the first one are raised (the
        client still gets a status code), later ones end the stream with an error event."""
        url, sent = self.prepare(path, body)
        public = body.get("model") or self.default_model
        client = httpx.AsyncClient(timeout=self.timeout)
        try:
            async with client.stream("POST", url, json=sent, headers=self.headers) as response:
                if response.status_code >= 400:
                    raise _refused(response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        continue
                    yield {**event, "model": public} if "model" in event else event
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        finally:
            await client.aclose()

    # ---- queued chat jobs (the ModelsLab routes) -----------------------------------------

    def complete(self, p: ChatParams) -> ChatAnswer:
        from sdserve.engine.chat import ChatAnswer

        body: dict[str, Any] = {
            "model": p.model_id,
            "max_tokens": p.max_new_tokens,
            "temperature": p.temperature if p.do_sample else 0.0,
            "top_p": p.top_p,
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
            "seed": p.seed,
        }
        if p.top_k:
            body["top_k"] = p.top_k  # vLLM, llama.cpp and Ollama take it; OpenAI does not
        if p.stop:
            body["stop"] = p.stop
        chat = p.messages is not None
        path = "/chat/completions" if chat else "/completions"
        body.update({"messages": p.messages} if chat else {"prompt": p.prompt or ""})
        url, sent = self.prepare(path, body)
        try:
            response = httpx.post(url, json=sent, headers=self.headers, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise _refused(response.status_code, response.content)
        try:
            answer = response.json()
            choice = answer["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            usage = answer.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            raise UpstreamFailed("The chat engine's answer is not an OpenAI completion") from None
        return ChatAnswer(
            text=text or "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=choice.get("finish_reason") or "stop",
        )

    def _unreachable(self, exc: httpx.HTTPError) -> UpstreamFailed:
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamFailed(
                f"The chat engine did not answer within {self.timeout_seconds:g} seconds", 504
            )
        return UpstreamFailed(f"The chat engine at {self.base_url} cannot be reached: {exc}")


def model_map(text: str) -> dict[str, str]:
    """`"public=upstream,other=name"`: the model names clients send, and what the upstream calls them."""
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {public.strip(): name.strip() for public, name in pairs if public.strip()}


def _refused(status: int, content: bytes) -> UpstreamFailed:
    """The upstream's own error message, kept; client errors keep their status, the rest is 502."""
    message = content.decode("utf-8", "replace")[:500]
    try:
        data = json.loads(content)
        found = data.get("error", data) if isinstance(data, dict) else data
        message = found.get("message", message) if isinstance(found, dict) else str(found)
    except ValueError:
        pass
    code = status if 400 <= status < 500 and status not in (401, 403) else 502
    return UpstreamFailed(f"The chat engine answered {status}: {message}", code)
