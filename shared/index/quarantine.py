"""What indexing set aside, one row each in ``pacsbridge_quarantine``.

Two reasons:

``index_failed``
    The database refused this instance's rows (a value it cannot hold ...). The
    batch it came in was split until the instance was alone; every other instance
    was indexed. The file stays where it was stored. The reconciler does not queue
    it again; ``rebuild`` tries it again (and resolves the row if it now goes in),
    and so does the ``retry`` decision.
``uid_conflict``
    Its Study, Series or SOP Instance UID is already indexed under another
    PatientID. The file was moved under ``<root>/.quarantine/`` (which the index and
    ``rebuild`` never read as storage): nothing of it is exported or pushed, under
    either patient, until an admin decides.

Decisions (:meth:`Quarantine.resolve` records who and when, and logs it):
``retry`` and ``discard`` for ``index_failed``; ``correct``, ``new-patient`` and
``discard`` for ``uid_conflict`` (see :mod:`pacsbridge.shared.index.conflicts`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy import and_, func, insert, select, true, update
from sqlalchemy.engine import Engine

from pacsbridge.shared.core import keyset
from pacsbridge.shared.core.errors import Conflict, InvalidRequest, NotFound
from pacsbridge.shared.core.schema import quarantine_table as table
from pacsbridge.shared.index.storage import QUARANTINE

#: The order of the list, newest first, as keyset paging continues it (``(column, descending)``).
ORDER = ((table.c.created_at, True), (table.c.id, True))

__all__ = ["Quarantine", "REASONS", "DECISIONS", "QUARANTINE_DIR", "UnknownQuarantine"]

log = logging.getLogger(__name__)

REASONS = ("index_failed", "uid_conflict")
DECISIONS = {"index_failed": ("retry", "discard"), "uid_conflict": ("correct", "new-patient", "discard")}
#: Folder (inside the storage root) for instances set aside by a UID conflict.
QUARANTINE_DIR = QUARANTINE


class UnknownQuarantine(NotFound):
    """No quarantine entry with that id."""


def _row(r: Any) -> dict[str, Any]:
    d = dict(r._mapping)
    d["resolved"] = d["resolved_at"] is not None
    d["path"] = f"/api/v1/quarantine/{d['id']}"
    return d


class Quarantine:
    """The ``pacsbridge_quarantine`` rows of one index database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record_failures(self, failures: Iterable[Mapping[str, Any]]) -> None:
        """Record instances the database refused (``relpath``, ``detail``, UIDs, ``patient_id``).

        A file already recorded and unresolved gets its detail updated and ``attempts`` counted, not a second row.
        """
        failures = list(failures)
        if not failures:
            return
        now = time.time()
        with self.engine.begin() as conn:
            for f in failures:
                values = {k: str(f.get(k) or "")[:n] for k, n in (("relpath", 255), ("sop_uid", 64),
                                                                   ("series_uid", 64), ("study_uid", 64),
                                                                   ("patient_id", 64))}
                detail = str(f.get("detail") or "")[:2000]
                open_row = conn.execute(select(table.c.id).where(
                    table.c.relpath == values["relpath"], table.c.reason == "index_failed",
                    table.c.resolved_at.is_(None))).first()
                if open_row is not None:
                    conn.execute(update(table).where(table.c.id == open_row[0])
                                 .values(detail=detail, attempts=table.c.attempts + 1))
                else:
                    conn.execute(insert(table).values(reason="index_failed", detail=detail, created_at=now,
                                                      original_relpath=values["relpath"], **values))
                log.error("not indexed, set aside (quarantine): %s: %s", values["relpath"], detail)

    def add(self, reason: str, relpath: str, detail: str, **values: Any) -> int:
        """A new entry; returns its id."""
        with self.engine.begin() as conn:
            result = conn.execute(insert(table).values(reason=reason, relpath=relpath[:255], detail=detail[:2000],
                                                       created_at=time.time(), **values))
            return int(result.inserted_primary_key[0])  # type: ignore[index]

    def relocate(self, entry_id: int, relpath: str, detail: str) -> None:
        """Say where an entry's file lies after all (it could not be moved)."""
        with self.engine.begin() as conn:
            conn.execute(update(table).where(table.c.id == entry_id).values(relpath=relpath[:255],
                                                                            detail=detail[:2000]))

    def relpaths(self, reason: str) -> set[str]:
        """Paths of every entry (open or resolved) of ``reason``."""
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(select(table.c.relpath).where(table.c.reason == reason))}

    def open_relpaths(self) -> set[str]:
        """Paths of unresolved entries (the reconciler does not queue them again)."""
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(select(table.c.relpath).where(table.c.resolved_at.is_(None)))}

    def among(self, relpaths: Sequence[str]) -> set[str]:
        """Those of ``relpaths`` that have an entry, open or resolved (the journal's reconciler
        settles them: indexing failed and is recorded, or an admin decided)."""
        out: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(relpaths), 500):
                out.update(r[0] for r in conn.execute(
                    select(table.c.relpath).where(table.c.relpath.in_(list(relpaths[i:i + 500])))))
        return out

    def resolve_indexed(self, relpaths: Sequence[str], by: str = "rebuild") -> int:
        """Close the ``index_failed`` entries of files that were indexed after all."""
        n = 0
        if not relpaths:
            return 0
        with self.engine.begin() as conn:
            for i in range(0, len(relpaths), 500):
                n += conn.execute(update(table).where(
                    table.c.reason == "index_failed", table.c.resolved_at.is_(None),
                    table.c.relpath.in_(list(relpaths[i:i + 500]))).values(
                    resolved_at=time.time(), resolved_by=by, decision="indexed")).rowcount
        return n

    def get(self, entry_id: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            r = conn.execute(select(table).where(table.c.id == entry_id)).first()
        if r is None:
            raise UnknownQuarantine(f"no quarantine entry {entry_id}")
        return _row(r)

    def list(self, *, reason: str | None = None, resolved: bool | None = None, limit: int = 100,
             offset: int = 0, after: Sequence[Any] | None = None,
             cap: int | None = None) -> tuple[list[dict[str, Any]], Any]:
        """Entries, newest first, and how many match in all.

        ``after``: the sort key ``(created_at, id)`` of the last entry of the page before (keyset paging,
        see :mod:`pacsbridge.shared.core.keyset`). ``cap``: count at most that many (None beyond).
        """
        cond = []
        if reason:
            cond.append(table.c.reason == reason)
        if resolved is not None:
            cond.append(table.c.resolved_at.isnot(None) if resolved else table.c.resolved_at.is_(None))
        where = and_(true(), *cond)
        page = where if after is None else and_(where, keyset.after(ORDER, after))
        with self.engine.connect() as conn:
            total = keyset.count(conn, select(table.c.id).where(where), cap)
            rows = conn.execute(select(table).where(page).order_by(table.c.created_at.desc(), table.c.id.desc())
                                .limit(limit).offset(offset))
            return [_row(r) for r in rows], total

    def counts(self) -> dict[tuple[str, bool], int]:
        """``{(reason, resolved): n}`` for the metrics."""
        out = {(r, s): 0 for r in REASONS for s in (False, True)}
        with self.engine.connect() as conn:
            for reason, resolved, n in conn.execute(
                    select(table.c.reason, table.c.resolved_at.isnot(None), func.count())
                    .group_by(table.c.reason, table.c.resolved_at.isnot(None))):
                out[(reason, bool(resolved))] = int(n)
        return out

    def close(self, entry_id: int, decision: str, by: str, detail: str | None = None) -> dict[str, Any]:
        """Mark an open entry resolved (``decision`` by ``by``), once; :class:`Conflict` if it already is."""
        values: dict[str, Any] = {"resolved_at": time.time(), "resolved_by": by[:64], "decision": decision}
        if detail is not None:
            values["detail"] = detail[:2000]
        with self.engine.begin() as conn:
            n = conn.execute(update(table).where(table.c.id == entry_id, table.c.resolved_at.is_(None))
                             .values(**values)).rowcount
        if n != 1:
            self.get(entry_id)  # 404 if there is none
            raise Conflict(f"quarantine entry {entry_id} is already resolved")
        log.warning("quarantine %d resolved: %s by %s", entry_id, decision, by)
        return self.get(entry_id)

    @staticmethod
    def check_decision(entry: Mapping[str, Any], decision: Any) -> str:
        allowed = DECISIONS.get(entry["reason"], ())
        if decision not in allowed:
            raise InvalidRequest(f"for {entry['reason']}, expected one of {', '.join(allowed)}", "decision")
        return str(decision)


def file_of(ctx: Any, entry: Mapping[str, Any]) -> Any:
    """The entry's file: in storage, or (an instance indexed in place) where it lies."""
    from pathlib import Path

    rel = str(entry["relpath"])
    return Path(rel) if os.path.isabs(rel) else ctx.storage.absolute(rel)


def discard(ctx: Any, store: "Quarantine", entry: Mapping[str, Any], by: str) -> dict[str, Any]:
    """Close the entry and delete its file, if the file is storage's (one indexed in place stays)."""
    closed = store.close(entry["id"], "discard", by)
    if os.path.isabs(str(entry["relpath"])):
        return closed
    try:
        ctx.storage.absolute(entry["relpath"]).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("quarantine %d: could not remove %s: %s", entry["id"], entry["relpath"], exc)
    return closed
