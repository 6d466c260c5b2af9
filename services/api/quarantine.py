"""``/api/v1/quarantine``: what indexing set aside, and an admin's decision on each.

``GET /quarantine`` lists entries newest first (``reason``, ``resolved``, paging),
``GET /quarantine/<id>`` reads one, ``POST /quarantine/<id>/resolve``
``{"decision": ...}`` (role ``admin``) carries a decision out; the token's name
and the time are kept in the entry and logged. See :mod:`pacsbridge.shared.index.quarantine`.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, g

from pacsbridge.shared.core import keyset
from pacsbridge.shared.core.models import check
from pacsbridge.shared.index.conflicts import resolve
from pacsbridge.shared.index.quarantine import Quarantine, UnknownQuarantine

from .auth import requires
from .contract import READ, WRITE, operation
from .models import QuarantineArgs, QuarantineDecision, QuarantineEntry, QuarantineList, answer
from .params import args, check_known, json_object, keyset_page, next_cursor
from .state import state

__all__ = ["bp"]

log = logging.getLogger(__name__)

bp = Blueprint("quarantine", __name__)


def _entry_id(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 12:
        raise UnknownQuarantine(f"no quarantine entry {raw[:64]!r}")
    return int(raw)


_ENTRY = {"entry_id": {"type": "string", "minLength": 1, "maxLength": 12, "pattern": r"^[0-9]+$"}}


@bp.get("/quarantine")
@operation("What indexing set aside, newest first", "quarantine", {200: ("a page of entries", QuarantineList)},
           args=QuarantineArgs, rules=QuarantineArgs.rules)
def list_entries() -> dict[str, Any]:
    a = args(QuarantineArgs)
    resolved = None if not a.resolved else a.resolved == "true"
    where_from = keyset.scope("quarantine", a.reason or "", resolved)
    after, cap = keyset_page(a, where_from, (float, int))
    items, total = Quarantine(state().ctx.index.engine).list(reason=a.reason or None, resolved=resolved,
                                                             limit=a.limit + 1, offset=a.offset, after=after,
                                                             cap=cap)
    nxt = next_cursor(items, a.limit, where_from, lambda e: [e["created_at"], e["id"]])
    return answer(QuarantineList, {"items": items, "total": total,  # type: ignore[no-any-return]
                                   "limit": a.limit, "offset": a.offset, "next": nxt})


@bp.get("/quarantine/<entry_id>")
@operation("One quarantine entry", "quarantine", {200: ("the entry", QuarantineEntry)}, errors=READ + (404,),
           path=_ENTRY)
def get_entry(entry_id: str) -> dict[str, Any]:
    check_known(())
    return answer(QuarantineEntry, Quarantine(state().ctx.index.engine).get(_entry_id(entry_id)))  # type: ignore[no-any-return]


@bp.post("/quarantine/<entry_id>/resolve")
@requires("admin")
@operation("Decide on an entry (audited)", "quarantine", {200: ("resolved", QuarantineEntry)},
           errors=WRITE + (404, 409), body=QuarantineDecision, path=_ENTRY,
           rules=("the decision fits the entry's reason: index_failed takes retry or discard, uid_conflict "
                  "correct, new-patient or discard (`decision`)",))
def resolve_entry(entry_id: str) -> dict[str, Any]:
    """Carry out ``decision``: retry / discard (index_failed), correct / new-patient / discard (uid_conflict)."""
    check_known(())
    number = _entry_id(entry_id)
    decision = check(QuarantineDecision, json_object()).decision
    by = g.get("token_name", "") or "?"
    log.warning("quarantine %d: %s decides %r", number, by, decision)
    return answer(QuarantineEntry, resolve(state().ctx, number, decision, by))  # type: ignore[no-any-return]
