"""The ModelsLab wire encodings (numbers as strings, yes/no flags, comma lists), coerced once at the edge."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationInfo
from pydantic_core import PydanticCustomError

_TRUE = {"yes", "true", "1", "on", "y"}
_FALSE = {"no", "false", "0", "off", "n", "none", ""}


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _to_int(value: Any, info: ValidationInfo) -> int | None:
    if _blank(value):
        return None
    if isinstance(value, bool):
        raise PydanticCustomError(
            "integer", "The {field} must be an integer.", {"field": info.field_name}
        )
    try:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float):
            if not math.isfinite(number) or number != int(number):
                raise ValueError
            number = int(number)
        if not isinstance(number, int):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise PydanticCustomError(
            "integer", "The {field} must be an integer.", {"field": info.field_name}
        ) from None
    return number


def _to_float(value: Any, info: ValidationInfo) -> float | None:
    if _blank(value):
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError):
        raise PydanticCustomError(
            "number", "The {field} must be a number.", {"field": info.field_name}
        ) from None
    return number


def _to_flag(value: Any, info: ValidationInfo) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise PydanticCustomError(
        "flag", "The {field} field must be yes/no or true/false.", {"field": info.field_name}
    )


def _to_str_list(value: Any, info: ValidationInfo) -> list[str] | None:
    if _blank(value):
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    cleaned = [str(item).strip() for item in items if str(item).strip()]
    return cleaned or None


def _to_float_list(value: Any, info: ValidationInfo) -> list[float] | None:
    if _blank(value):
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    return [_to_float(item, info) for item in items if not _blank(item)] or None


def _to_text(value: Any, info: ValidationInfo) -> str | None:
    if value is None:
        return None
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    raise PydanticCustomError("string", "The {field} must be a string.", {"field": info.field_name})


Int = Annotated[int | None, BeforeValidator(_to_int)]
Float = Annotated[float | None, BeforeValidator(_to_float)]
Flag = Annotated[bool | None, BeforeValidator(_to_flag)]
StrList = Annotated[list[str] | None, BeforeValidator(_to_str_list)]
FloatList = Annotated[list[float] | None, BeforeValidator(_to_float_list)]
Text = Annotated[str | None, BeforeValidator(_to_text)]


def yes_no(flag: bool) -> str:
    """Meta echoes flags as "yes"/"no" whatever the client sent (§1.2)."""
    return "yes" if flag else "no"
