"""The caller of a route: the server state, the request's fields (query string, form or JSON body,
merged), the authenticated key and whether it is the admin key. No route reads a body by hand."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import Depends, Request

from sdserve.api.state import ServerState, get_state
from sdserve.errors import InvalidKey, InvalidRequest
from sdserve.jobs.keys import KeyRing, Principal
from sdserve.settings import Settings


@dataclass
class Caller:
    state: ServerState
    body: dict[str, Any]
    principal: Principal

    @property
    def is_admin(self) -> bool:
        return self.principal.is_admin


async def caller(request: Request) -> Caller:
    state = get_state(request)
    body = await read_body(request, state.settings)
    return Caller(state, body, authenticate(request, body, state.keys))


async def admin_caller(found: Annotated[Caller, Depends(caller)]) -> Caller:
    """The enterprise routes: any other key gets the hosted API's invalid-key answer."""
    if not found.is_admin:
        raise InvalidKey()
    return found


CallerDep = Annotated[Caller, Depends(caller)]
AdminDep = Annotated[Caller, Depends(admin_caller)]


async def read_body(request: Request, settings: Settings) -> dict[str, Any]:
    """The request's fields: the query string, overridden by the body's (JSON or form)."""
    body = await read_json_body(request, settings)
    if request.query_params:
        return {**dict(request.query_params), **body}
    return body


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
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(
            "Invalid API Request",
            tip="The request body must be valid JSON with Content-Type: application/json.",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("Invalid API Request", tip="The request body must be a JSON object.")
    return body


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
