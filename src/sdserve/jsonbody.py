"""Request bodies parsed once, strictly: JSON objects of finite numbers and encodable text only."""

from __future__ import annotations

import json
import math
from typing import Any

from sdserve.errors import InvalidRequest, ValidationFailed

MAX_DEPTH = 64  # no request shape nests deeper than a few levels


class _NonFinite(float):
    """What `NaN`, `Infinity` and `-Infinity` parse to, so the walk can name the field."""


def _constant(name: str) -> float:
    return _NonFinite(name.replace("Infinity", "inf"))


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The JSON object in `raw`; InvalidRequest or ValidationFailed for anything a job can't hold."""
    try:
        body = json.loads(raw, parse_constant=_constant)
    except RecursionError:  # ~1000 nested arrays: refuse it like any other bad body
        raise InvalidRequest(
            "Invalid API Request", tip=f"The request body nests deeper than {MAX_DEPTH} levels."
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(
            "Invalid API Request",
            tip="The request body must be valid JSON with Content-Type: application/json.",
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("Invalid API Request", tip="The request body must be a JSON object.")
    check_values(body)
    return body


def check_values(body: dict[str, Any]) -> None:
    """Refuse, with the field's name, what would fail later where the client can't see it:
    NaN/Infinity (also `1e999`), lone surrogates (`\\ud800` cannot be stored or answered as
    UTF-8), NUL characters, and deep nesting. Iterative, so depth itself can't overflow the stack."""
    stack: list[tuple[str, Any, int]] = [(name, value, 1) for name, value in body.items()]
    for name in body:
        _check_text(name, name)
    while stack:
        path, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(
                "Invalid API Request",
                tip=f"The request body nests deeper than {MAX_DEPTH} levels.",
            )
        field = path.split(".", 1)[0].split("[", 1)[0]
        if isinstance(value, float) and not math.isfinite(value):
            raise ValidationFailed({field: [f"The {field} must be a finite number."]})
        if isinstance(value, str):
            _check_text(field, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(field, key)
                stack.append((f"{path}.{key}", item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value))


def _check_text(field: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationFailed(
            {field: [f"The {field} contains an invalid character (an unpaired surrogate)."]}
        ) from None
    if "\x00" in text:  # PostgreSQL text and JSON columns cannot hold NUL
        raise ValidationFailed({field: [f"The {field} contains a NUL character."]})
