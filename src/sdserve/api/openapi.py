"""What the OpenAPI document says of a route: its request body and its answers.

Answers are declared as `responses=` metadata, never as a `response_model`: handlers return their
bodies as they are (fetch and submissions rendered once with orjson), so declaring them costs a
request nothing and changes no byte a client gets."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from sdserve.schemas.answers import ErrorAnswer

_OK = "The answer. With SDSERVE_ERROR_STATUS=legacy (the default) errors come with 200 too."
_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "model": ErrorAnswer,
        "description": "An error, with SDSERVE_ERROR_STATUS=http; 429 (a full queue) always",
    }
}


def body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring a JSON body of `model`'s fields (they may also come as form
    fields, multipart parts or the query string: api/deps.py). It is required when a field is."""
    required = any(field.is_required() for field in model.model_fields.values())
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": _inlined(model.model_json_schema())}},
        }
    }


def _inlined(schema: Any, defs: dict[str, Any] | None = None) -> Any:
    """`schema` with its nested models (`$defs`, which the document would not resolve) written
    in place; the request models hold no recursive ones."""
    if isinstance(schema, dict):
        if defs is None:
            defs = schema.pop("$defs", {})
        ref = schema.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inlined(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inlined(value, defs) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inlined(item, defs) for item in schema]
    return schema


def query(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring `model`'s fields as query parameters (a GET's request)."""
    schema = _inlined(model.model_json_schema())
    required = set(schema.get("required", ()))
    return {
        "parameters": [
            {"name": name, "in": "query", "required": name in required, "schema": field}
            for name, field in schema["properties"].items()
        ]
    }


def answers(ok: Any, *, with_error: bool = True, **extra: Any) -> dict[int | str, dict[str, Any]]:
    """`responses=`: `ok` (a model or a type) with HTTP 200, or the error envelope, which also
    comes with 200 in the legacy error mode (`with_error=False` when `ok` includes it); 4xx
    answers are the error envelope. `extra` adds to the 200 response (other content types)."""
    model = ok | ErrorAnswer if with_error else ok
    return {200: {"model": model, "description": _OK, **extra}, **_ERRORS}


def openai_answers(
    ok: type[BaseModel], error: type[BaseModel], *, stream: bool = False
) -> dict[int | str, dict[str, Any]]:
    """`responses=` of an OpenAI route: `ok` with 200 (with `stream`, or its chunks as server-sent
    events), and `error`, OpenAI's error object, with the error's own 4xx or 5xx status."""
    success: dict[str, Any] = {"model": ok, "description": "The answer"}
    if stream:
        success["description"] = "The answer; with `stream`, its chunks as server-sent events"
        event = {  # each event of the stream
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {"type": "string", "description": "a chunk's JSON; the last: `[DONE]`"}
            },
        }
        success["content"] = {"text/event-stream": {"schema": event}}
    return {
        200: success,
        "4XX": {"model": error, "description": "An OpenAI error: 400, 401, 404, 413, 429"},
        "5XX": {
            "model": error,
            "description": "An OpenAI error: the upstream failed (502), or no answer in time (504)",
        },
    }
