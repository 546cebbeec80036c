"""Strict parsing of the ids clients send: request ids are plain ASCII decimals that fit in 64 bits."""

from __future__ import annotations

import re

MAX_JOB_ID = 2**63 - 1  # the database's BIGINT; a larger number is no job, not an overflow
_DECIMAL = re.compile(r"[0-9]+")  # [0-9], not \d: full-width and other digits are no ids
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse_job_id(value: object) -> int | None:
    """The request id in `value` (a JSON number or a decimal string), else None.

    `1_0`, `+1`, `-1`, `1.0`, `1 0`, full-width digits and numbers of 2^63 or more are not ids,
    though `int()` takes most of them.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if not _DECIMAL.fullmatch(text) or len(text) > 19:
            return None
        number = int(text)
    else:
        return None
    return number if 0 < number <= MAX_JOB_ID else None


def is_decimal(value: object) -> bool:
    """An integer, or ASCII digits: a well-formed id, though perhaps of no job."""
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, str) and _DECIMAL.fullmatch(value.strip()) is not None


def is_token_id(value: object) -> bool:
    """A training id or other short ASCII token (letters, digits, `_`, `-`)."""
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None
