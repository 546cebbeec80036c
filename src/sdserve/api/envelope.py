"""The one place that turns errors into ModelsLab error bodies, and reads bodies and keys the way clients send them."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from sdserve.errors import InvalidKey, InvalidRequest, RateLimited, SdserveError, ValidationFailed
from sdserve.jobs.keys import KeyRing, Principal
from sdserve.jsonbody import parse_json_object
from sdserve.settings import Settings

log = logging.getLogger(__name__)


def error_body(exc: SdserveError) -> dict[str, Any]:
    if isinstance(exc, ValidationFailed):
        # Go clients decode `messege` as a field -> list map; JS/Python SDKs read `message` text.
        body: dict[str, Any] = {"status": "error", "messege": exc.fields, "message": exc.message}
    else:
        body = {"status": "error", "message": exc.message, "messege": exc.message}
    if exc.tip:
        body["tip"] = exc.tip
    if isinstance(exc, RateLimited):
        body["tips"] = "you are sending too many requests at once, please wait and try again"
        body["retry_after"] = exc.retry_after
    return body


def error_response(exc: SdserveError, settings: Settings) -> JSONResponse:
    if settings.error_status == "http":
        status = exc.http_status
    else:  # legacy: the hosted API answered application errors with 200, queue limits with 429
        status = 429 if isinstance(exc, RateLimited) else 200
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


async def read_json_body(request: Request, settings: Settings) -> dict[str, Any]:
    """The JSON object body, capped at max_body_bytes; an empty body reads as {}."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise _too_large(settings)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_body_bytes:
            raise _too_large(settings)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    return parse_json_object(raw)


def _too_large(settings: Settings) -> InvalidRequest:
    exc = InvalidRequest(
        f"Request body is larger than {settings.max_body_bytes // (1024 * 1024)} MB"
    )
    exc.http_status = 413
    return exc


def request_key(request: Request, body: dict[str, Any]) -> str | None:
    """Body `key` first, then `Authorization: Bearer`, then a `key` header or query parameter."""
    key = body.get("key")
    if isinstance(key, str) and key.strip():
        return key.strip()
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer ") and auth[7:].strip():
        return auth[7:].strip()
    return request.headers.get("key") or request.query_params.get("key") or None


def authenticate(request: Request, body: dict[str, Any], keys: KeyRing) -> Principal:
    principal = keys.authenticate(request_key(request, body))
    if principal is None:
        raise InvalidKey()
    return principal
