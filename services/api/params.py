"""Reading request input: the JSON body and query-string parameters, refused clearly when wrong."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, Iterable, TypeVar
from urllib.parse import parse_qsl

from flask import request
from werkzeug.exceptions import UnsupportedMediaType

from pacsbridge.shared.core import keyset
from pacsbridge.shared.core.errors import InvalidRequest
from pacsbridge.shared.core.models import check

from .models import DEFAULT_LIMIT, MAX_LIMIT, TOTAL_CAP, SINCE_PATTERN, Args, ListArgs, PageArgs

__all__ = ["json_object", "paging", "keyset_page", "next_cursor", "check_known",
           "check_text", "since_arg", "args", "MAX_LIMIT",
           "DEFAULT_LIMIT"]

MAX_VALUE = 256
A = TypeVar("A", bound=Args)


def args(model: type[A]) -> A:
    """The query string, checked by ``model`` (the document's parameters are made from it too):
    unknown, repeated and over-long parameters refused (:func:`check_known`), each value by its field."""
    check_known(model.model_fields)
    return check(model, dict(request.args.items()), field="query", rename=lambda loc: str(loc[0]))


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
#: What JSON's ``\\udXXX`` escapes can give and no text holds: a surrogate on its own (a pair is one
#: character once decoded). It cannot be encoded as UTF-8, so it would fail later (a path, a row).
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL_MESSAGE = "control characters (newline, tab, NUL ...) are not allowed"


def _no_control(value: Any, where: str) -> None:
    """No string of a body (key or value) may hold a control character or a lone surrogate."""
    if isinstance(value, str):
        if _CONTROL.search(value):
            raise InvalidRequest(_CONTROL_MESSAGE, where or "body")
        if _SURROGATE.search(value):
            raise InvalidRequest("a lone UTF-16 surrogate (\\udXXX) is not a character", where or "body")
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_control(k, where or "body")
            _no_control(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_control(v, f"{where}[{i}]")


def check_text() -> None:
    """``before_request``: path and query-string parameters are UTF-8 text without control characters.

    Every route takes names, ids, UIDs and filters: none needs a NUL, a newline or bytes that
    are not UTF-8, and a NUL reaching PostgreSQL fails the query (a 500). Refused here for every
    route at once, before any view or database sees them, with the parameter named.
    """
    raw_path = request.environ.get("PATH_INFO", "")
    try:  # WSGI hands the decoded path as latin-1 text: its bytes must be UTF-8
        raw_path.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise InvalidRequest("the path is not UTF-8", "path") from None
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str) and _CONTROL.search(value):
            raise InvalidRequest(_CONTROL_MESSAGE, name)
        if isinstance(value, str) and "\ufffd" in value:  # what a server may make of bytes that are not UTF-8
            raise InvalidRequest("not UTF-8 (or U+FFFD, the replacement character)", name)
    try:
        pairs = parse_qsl(request.query_string.decode("latin-1"), keep_blank_values=True,
                          encoding="utf-8", errors="strict")
    except UnicodeError:
        raise InvalidRequest("the query string is not UTF-8", "query") from None
    for name, value in pairs:
        if _CONTROL.search(name):
            raise InvalidRequest(f"a parameter name with a control character: {name!r}", "query")
        if _CONTROL.search(value):
            raise InvalidRequest(_CONTROL_MESSAGE, name)
    for name, value in request.args.items(multi=True):  # raw bytes that are not UTF-8 (not %-escaped)
        if "\ufffd" in name or "\ufffd" in value:
            raise InvalidRequest("not UTF-8 (or U+FFFD, the replacement character)", name)


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


def paging() -> tuple[int, int]:
    """``limit`` (1..1000, default 100) and ``offset`` (>= 0), as :class:`~.models.PageArgs` says
    (for routes whose other parameters are not a model: the index's filters come from its dicom.sql)."""
    page = check(PageArgs, {k: request.args[k] for k in ("limit", "offset") if k in request.args},
                 field="query", rename=lambda loc: str(loc[0]))
    return page.limit, page.offset


def keyset_page(a: ListArgs, where_from: str, types: tuple[type, ...]) -> tuple[list[Any] | None, int | None]:
    """Where a page of a :class:`~.models.ListArgs` list starts (the sort key its cursor holds, or None) and
    the cap of its count (None: count every match). A cursor with an offset is a 400: the cursor says where."""
    if a.cursor and a.offset:
        raise InvalidRequest("give `cursor` or `offset`, not both (the cursor says where the page starts)", "offset")
    after = keyset.decode(a.cursor, where_from, types) if a.cursor else None
    return after, None if a.total == "exact" else TOTAL_CAP


def next_cursor(items: list[Any], limit: int, where_from: str, key: Any) -> str | None:
    """The cursor after the last of ``items`` when the page is full (``key(item)``: its sort key), else None.
    The store was asked for ``limit + 1`` rows: the extra one says whether a next page exists, and is dropped."""
    if len(items) <= limit:
        return None
    del items[limit:]
    return keyset.encode(where_from, key(items[-1]))


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
