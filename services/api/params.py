"""Reading request input: the JSON body and query-string parameters, refused clearly when wrong."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, Iterable

from flask import request
from werkzeug.exceptions import UnsupportedMediaType

from pacsbridge.shared.errors import InvalidRequest

__all__ = ["json_object", "paging", "check_known", "int_arg", "since_arg", "MAX_LIMIT", "DEFAULT_LIMIT"]

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_VALUE = 256


def json_object() -> dict[str, Any]:
    """The request body, which must be a JSON object.

    Malformed JSON gives Flask's 400, a non-JSON content type 415, a body over
    the limit 413 (all in the one error shape).
    """
    if not request.is_json:
        raise UnsupportedMediaType("send the body as application/json")
    raw = request.get_data(cache=True)  # 413 beyond MAX_CONTENT_LENGTH
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid JSON ({str(exc)[:120]})", "body") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", "body")
    _no_control(body, "")
    return body


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _no_control(value: Any, where: str) -> None:
    """No string of a body (key or value) may hold a control character: none needs one."""
    if isinstance(value, str):
        if _CONTROL.search(value):
            raise InvalidRequest("control characters (newline, tab, NUL ...) are not allowed", where or "body")
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_control(k, where or "body")
            _no_control(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_control(v, f"{where}[{i}]")


def check_known(allowed: Iterable[str]) -> None:
    """Refuse query-string parameters that are not ``allowed``, repeated ones and over-long values."""
    allowed = set(allowed)
    for name in request.args:
        if name not in allowed:
            raise InvalidRequest(f"unknown parameter; known: {', '.join(sorted(allowed))}", name)
        values = request.args.getlist(name)
        if len(values) > 1:
            raise InvalidRequest("given more than once", name)
        if len(values[0]) > MAX_VALUE or "\x00" in values[0]:
            raise InvalidRequest(f"at most {MAX_VALUE} characters, no NUL", name)


def int_arg(name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,12}", raw):
        raise InvalidRequest("expected a whole number", name)
    value = int(raw)
    if not minimum <= value <= maximum:
        raise InvalidRequest(f"expected {minimum} to {maximum}", name)
    return value


def paging() -> tuple[int, int]:
    """``limit`` (1..1000, default 100) and ``offset`` (>= 0)."""
    return int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT), int_arg("offset", 0, 0, 10**9)


#: ``since``: Unix seconds, or an ISO 8601 date or date-time.
SINCE_PATTERN = (r"^([0-9]{1,10}(\.[0-9]{1,9})?|[0-9]{4}-[0-9]{2}-[0-9]{2}"
                 r"([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?)?$")


def since_arg(name: str = "since") -> float | None:
    """A time as Unix seconds or ISO 8601 (``2024-05-01``, ``2024-05-01T10:00:00Z``)."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if not re.fullmatch(SINCE_PATTERN[1:-1], raw):
        raise InvalidRequest("Unix seconds or an ISO 8601 date/time", name)
    if re.fullmatch(r"[0-9.]+", raw):
        return float(raw)
    try:
        when = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{raw!r} is not a valid date/time", name) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()
