"""Keyset paging: a page starts *after* the last row of the one before, not after skipping rows.

``OFFSET n`` makes the database read and throw away ``n`` rows: page 1,000 of ``/studies`` reads
100,000 index entries, and a row inserted before the reader's place shifts every later page (a row
seen twice, or missed). A keyset page asks ``WHERE (sort key) > (last key seen) ORDER BY sort key
LIMIT n``: an index range scan whose cost does not grow with the depth, and rows added behind the
reader never move the pages ahead of it.

The last key travels to the client as an opaque **cursor** (URL-safe base64 of a small JSON
array: the list it belongs to and the key's values). A cursor is checked before any query: not
base64, not JSON, of another list or with values of the wrong type is an :class:`InvalidRequest`
(the API's 400), never a database error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any, Sequence

from sqlalchemy import and_, func, or_, select

from pacsbridge.shared.core.errors import InvalidRequest

__all__ = ["encode", "decode", "after", "scope", "count", "MAX_CURSOR", "TOTAL_CAP"]

#: A cursor is at most this long (a few UIDs fit; a longer one is refused before decoding).
MAX_CURSOR = 256
#: A list's ``total`` is counted up to this many rows, and null beyond unless an exact count is asked.
TOTAL_CAP = 10_000
_VERSION = 1


def scope(*parts: object) -> str:
    """A short fingerprint of the list a cursor belongs to (resource and filters): a cursor made for
    ``studies?PatientID=A`` is refused by ``studies?PatientID=B`` instead of paging it wrongly."""
    text = json.dumps([str(p) for p in parts], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def encode(where: str, values: Sequence[str | int | float]) -> str:
    """The cursor that continues list ``where`` after the row whose sort key is ``values``."""
    raw = json.dumps([_VERSION, where, list(values)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str, where: str, types: Sequence[type], field: str = "cursor") -> list[Any]:
    """The sort key a cursor holds, checked against the list ``where`` and the key's ``types``.

    Raises
    ------
    InvalidRequest
        The cursor is malformed, belongs to another list, or holds values of other types.
    """
    if len(cursor) > MAX_CURSOR:
        raise InvalidRequest(f"a cursor has at most {MAX_CURSOR} characters; use the `next` of a page", field)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, found, values = json.loads(raw.decode())
    except (binascii.Error, ValueError, UnicodeDecodeError, TypeError):
        raise InvalidRequest("not a cursor of this API (use the `next` of a page as it is)", field) from None
    if version != _VERSION or not isinstance(values, list) or len(values) != len(types):
        raise InvalidRequest("not a cursor of this API (use the `next` of a page as it is)", field)
    if found != where:
        raise InvalidRequest("this cursor belongs to another list (other resource or filters)", field)
    for value, kind in zip(values, types):
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or (isinstance(value, str) and len(value) > 255):
            raise InvalidRequest("not a cursor of this API (use the `next` of a page as it is)", field)
    return values


def after(order: Sequence[tuple[Any, bool]], values: Sequence[Any]) -> Any:
    """The WHERE clause of the rows after ``values`` in ``order`` (``(column, descending)`` pairs, the
    last one unique): ``a > x OR (a = x AND b > y) ...``, each column in its own direction. Written out
    rather than as a row-value comparison so that mixed directions work, on SQLite as on PostgreSQL;
    PostgreSQL still reads it as a range of the index that has the columns in that order."""
    terms = []
    for i, ((column, descending), value) in enumerate(zip(order, values)):
        equal = [c == v for (c, _), v in zip(order[:i], values[:i])]
        beyond = column < value if descending else column > value
        terms.append(and_(*equal, beyond))
    return or_(*terms)


def count(conn: Any, rows: Any, cap: int | None) -> int | None:
    """How many rows the select ``rows`` gives: all of them when ``cap`` is None (a scan of every match),
    else up to ``cap`` and None beyond (the database stops reading at ``cap + 1``)."""
    if cap is not None:
        rows = rows.limit(cap + 1)
    found = int(conn.execute(select(func.count()).select_from(rows.subquery())).scalar_one())
    return found if cap is None or found <= cap else None
