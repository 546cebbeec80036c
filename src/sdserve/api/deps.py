"""The caller of a route: the server state, the request's fields (query string, form or JSON body,
merged), the authenticated key and whether it is the admin key. No route reads a body by hand."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import Depends, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser

from sdserve.api.state import ServerState, get_state
from sdserve.errors import InvalidKey, InvalidRequest
from sdserve.jobs.keys import KeyRing, Principal
from sdserve.jsonbody import check_values, parse_json_object
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
    """The request's fields (reference §16.1): the query string, overridden by the body's. The
    body is JSON, form-urlencoded (also with no Content-Type) or multipart, whose file parts
    become data URLs, so they go through the same decoding and size guards as any image."""
    raw = await _read_capped(request, settings)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # Each source is checked once for what a job cannot hold (NaN, lone surrogates, NUL, depth).
    if not raw.strip():
        body: dict[str, Any] = {}
    elif kind == "multipart/form-data":
        body = await _multipart(request, raw)
        check_values(body)
    elif kind == "application/x-www-form-urlencoded" or (not kind and raw.lstrip()[:1] != b"{"):
        body = _fields(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        check_values(body)
    else:
        body = parse_json_object(raw)
    if request.query_params:
        query = dict(request.query_params)
        check_values(query)
        body = {**query, **body}
    return body


async def _read_capped(request: Request, settings: Settings) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise _too_large(settings)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_body_bytes:
            raise _too_large(settings)
        chunks.append(chunk)
    return b"".join(chunks)


def _fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Form fields by name; a name sent more than once (or as `name[]`) is a list."""
    fields: dict[str, Any] = {}
    for name, value in pairs:
        listed = name.endswith("[]")
        name = name.removesuffix("[]")
        if name in fields:
            previous = fields[name]
            fields[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            fields[name] = [value] if listed else value
    return fields


async def _multipart(request: Request, raw: bytes) -> dict[str, Any]:
    async def stream():
        yield raw

    parser = MultiPartParser(
        request.headers, stream(), max_files=64, max_fields=1000, max_part_size=len(raw) + 1
    )
    try:
        form = await parser.parse()
    except Exception:
        raise InvalidRequest("Invalid API Request", tip="The multipart body is malformed.") from None
    pairs = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read()
            media = value.content_type or "application/octet-stream"
            value = f"data:{media};base64," + base64.b64encode(data).decode()
        pairs.append((name, value))
    return _fields(pairs)


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
