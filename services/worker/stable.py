"""Stable detection: a series or study with no new instance for ``PACSBRIDGE_STABLE_SECONDS``.

The worker calls :func:`check` periodically (a thread in ``pacsbridge worker``).
It reads the arrivals the index keeps (``pacsbridge_arrivals``: one row per
received SOP instance with its arrival time) and keeps one row per series and
per study in ``pacsbridge_stable``: how many instances, the last arrival, and
``stable_at`` once it has been quiet long enough. A new arrival in a stable
series clears ``stable_at`` (and its study's), so it becomes stable again
later. This is the hook for automatic routing: "every study stable since the
last look" is :func:`stable_since`.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from pacsbridge.shared.index.conquest import Index
from pacsbridge.shared.core.schema import stable_table

__all__ = ["check", "stable_since", "HORIZON_SECONDS"]

#: Arrivals older than this (and stable_seconds x 10) are not looked at again.
HORIZON_SECONDS = 3600.0


def _upsert(conn: Any, level: str, uid: str, values: dict[str, Any]) -> None:
    t = stable_table
    row = conn.execute(select(t.c.last_arrival, t.c.stable_at).where(
        and_(t.c.level == level, t.c.uid == uid))).first()
    if row is None:
        conn.execute(insert(t).values(level=level, uid=uid, stable_at=None, **values))
    elif values["last_arrival"] > row.last_arrival or values["instances"] != 0:
        changes = dict(values)
        if values["last_arrival"] > row.last_arrival:
            changes["stable_at"] = None  # new instances: not stable any more
        conn.execute(update(t).where(and_(t.c.level == level, t.c.uid == uid)).values(**changes))


def check(index: Index, stable_seconds: float, now: float | None = None) -> list[tuple[str, str]]:
    """Update activity from recent arrivals and mark quiet series and studies stable.

    Returns the ``(level, uid)`` pairs that became stable in this call.
    """
    now = time.time() if now is None else now
    arrivals = index.tables["Arrival"]
    horizon = now - max(HORIZON_SECONDS, 10 * stable_seconds)
    engine: Engine = index.engine
    t = stable_table
    try:
        _record(engine, arrivals, horizon)
    except IntegrityError:  # another worker inserted the same row at the same moment
        pass
    newly: list[tuple[str, str]] = []
    try:
        with engine.begin() as conn:
            quiet = and_(t.c.stable_at.is_(None), t.c.last_arrival < now - stable_seconds)
            newly = [(r.level, r.uid) for r in conn.execute(select(t.c.level, t.c.uid).where(quiet))]
            if newly:
                conn.execute(update(t).where(quiet).values(stable_at=now))
    except IntegrityError:  # pragma: no cover - another worker checked at the same moment
        return []
    return newly


def _record(engine: Engine, arrivals: Any, horizon: float) -> None:
    with engine.begin() as conn:
        recent = select(arrivals.c.series_uid).where(arrivals.c.arrived_at >= horizon).distinct()
        series_rows = conn.execute(
            select(arrivals.c.series_uid, func.max(arrivals.c.study_uid), func.max(arrivals.c.patient_id),
                   func.count(), func.max(arrivals.c.arrived_at))
            .where(arrivals.c.series_uid.in_(recent)).group_by(arrivals.c.series_uid)).all()
        studies: dict[str, dict[str, Any]] = {}
        for series_uid, study_uid, patient_id, count, last in series_rows:
            if not series_uid:
                continue
            _upsert(conn, "series", series_uid, {"study_uid": study_uid or "", "patient_id": patient_id or "",
                                                 "instances": int(count), "last_arrival": float(last)})
            if study_uid:
                s = studies.setdefault(study_uid, {"study_uid": study_uid, "patient_id": patient_id or "",
                                                   "instances": 0, "last_arrival": 0.0})
                s["instances"] += int(count)
                s["last_arrival"] = max(s["last_arrival"], float(last))
        for study_uid, values in studies.items():
            _upsert(conn, "study", study_uid, values)


def stable_since(engine: Engine, since: float, level: str = "study") -> list[dict[str, Any]]:
    """Rows of ``level`` that became stable at or after ``since`` (oldest first)."""
    t = stable_table
    with engine.connect() as conn:
        rows = conn.execute(select(t).where(and_(t.c.level == level, t.c.stable_at >= since))
                            .order_by(t.c.stable_at))
        return [dict(r._mapping) for r in rows]
