"""``/api/v1/quarantine``: what indexing set aside, and an admin's decision on each.

``GET /quarantine`` lists entries newest first (``reason``, ``resolved``, paging),
``GET /quarantine/<id>`` reads one, ``POST /quarantine/<id>/resolve``
``{"decision": ...}`` (role ``admin``) carries a decision out; the token's name
and the time are kept in the entry and logged. See :mod:`pacsbridge.shared.index.quarantine`.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, g, request

from pacsbridge.shared.core.errors import InvalidRequest
from pacsbridge.shared.index.conflicts import resolve
from pacsbridge.shared.index.quarantine import REASONS, Quarantine, UnknownQuarantine

from .auth import requires
from .params import check_known, json_object, paging
from .state import state

__all__ = ["bp"]

log = logging.getLogger(__name__)

bp = Blueprint("quarantine", __name__)


def _entry_id(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 12:
        raise UnknownQuarantine(f"no quarantine entry {raw[:64]!r}")
    return int(raw)


@bp.get("/quarantine")
def list_entries() -> dict[str, Any]:
    check_known(("reason", "resolved", "limit", "offset"))
    reason = request.args.get("reason") or None
    if reason is not None and reason not in REASONS:
        raise InvalidRequest(f"expected one of {', '.join(REASONS)}", "reason")
    raw = request.args.get("resolved")
    if raw not in (None, "", "true", "false"):
        raise InvalidRequest("expected true or false", "resolved")
    resolved = None if not raw else raw == "true"
    limit, offset = paging()
    items, total = Quarantine(state().ctx.index.engine).list(reason=reason, resolved=resolved, limit=limit,
                                                             offset=offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


@bp.get("/quarantine/<entry_id>")
def get_entry(entry_id: str) -> dict[str, Any]:
    check_known(())
    return Quarantine(state().ctx.index.engine).get(_entry_id(entry_id))


@bp.post("/quarantine/<entry_id>/resolve")
@requires("admin")
def resolve_entry(entry_id: str) -> dict[str, Any]:
    """Carry out ``decision``: retry / discard (index_failed), correct / new-patient / discard (uid_conflict)."""
    check_known(())
    number = _entry_id(entry_id)
    body = json_object()
    unknown = set(body) - {"decision"}
    if unknown:
        raise InvalidRequest("unknown field", sorted(unknown)[0])
    by = g.get("token_name", "") or "?"
    log.warning("quarantine %d: %s decides %r", number, by, body.get("decision"))
    return resolve(state().ctx, number, body.get("decision"), by)
