"""A cohort's rows in the index database (``pacsbridge_cohorts``, ``pacsbridge_cohort_rows``).

A cohort is a job of kind ``cohort`` (the same id; :mod:`pacsbridge.worker.kinds.cohort` runs it): the
job row carries its state, owner, webhook and heartbeat, and this store the rest: the form of the input
(to hand back the rows that did not succeed as a file of the same form) and one row per input row, with
its cells as written, the parsed row, what the query found and how its transfer went.

Row states, in the order a row goes through them::

    pending -> found | held | ambiguous | not_found | failed | refused | duplicate     (query)
            -> transferring -> done | partial | failed | cancelled                     (transfer)

``found``: studies on the node to pull (some may be held in part); ``held``: every instance of them is
indexed here already (checked per SOP Instance UID against the node's list). A row's counters are what
its child jobs counted (summed when it has several).

The status of a running cohort is one ``GROUP BY`` over the ``(job_id, state)`` index: it answers in
milliseconds at 10,000 rows.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.engine import Engine

from pacsbridge.shared.core.errors import NotFound
from pacsbridge.shared.core.schema import cohort_rows_table, cohorts_table

__all__ = ["CohortStore", "CohortRow", "Cohort", "ROW_STATES", "QUERIED", "TRANSFERABLE", "SUCCEEDED",
           "NOT_SUCCEEDED", "COUNTERS"]

ROW_STATES = ("pending", "found", "held", "ambiguous", "not_found", "failed", "refused", "duplicate",
              "transferring", "done", "partial", "cancelled")
#: What the query stage leaves a row in.
QUERIED = ("found", "held", "ambiguous", "not_found", "failed", "refused", "duplicate")
#: Rows the transfer stage takes (``transferring``: one a crash or a cancel interrupted).
TRANSFERABLE = ("found", "held", "transferring")
#: A row that needs nothing more (``duplicate``: its first row does the work).
SUCCEEDED = ("done", "duplicate")
#: Rows handed back as "did not succeed" (the failed-rows file): fixable input, or a transfer short.
NOT_SUCCEEDED = ("ambiguous", "not_found", "failed", "refused", "partial", "cancelled")
#: A row's counters.
COUNTERS = ("series", "expected", "held", "received", "sent", "quarantined", "failed")
_BATCH = 500


@dataclasses.dataclass
class CohortRow:
    """One input row (or mass-transfer chunk) and what became of it."""

    number: int
    cells: dict[str, str]
    spec: dict[str, Any]
    duplicate_of: int | None = None
    state: str = "pending"
    reason: str = ""
    patient_id: str = ""
    issuer: str = ""
    studies: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    series: int = 0
    expected: int = 0
    held: int = 0
    received: int = 0
    sent: int = 0
    quarantined: int = 0
    failed: int = 0
    children: list[str] = dataclasses.field(default_factory=list)
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Cohort:
    """What a cohort holds besides its job row."""

    job_id: str
    format: str
    form: dict[str, Any]
    transfer: bool
    then: dict[str, Any]
    mass: dict[str, Any] | None
    created_at: float


def _row(r: Any) -> CohortRow:
    m = r._mapping
    return CohortRow(number=m["number"], cells=json.loads(m["cells"]), spec=json.loads(m["spec"]),
                     duplicate_of=m["duplicate_of"], state=m["state"], reason=m["reason"],
                     patient_id=m["patient_id"], issuer=m["issuer"], studies=json.loads(m["studies"]),
                     **{c: m[c] for c in COUNTERS}, children=json.loads(m["children"]), updated_at=m["updated_at"])


_JSON_FIELDS = ("cells", "spec", "studies", "children")


def _values(values: Mapping[str, Any]) -> dict[str, Any]:
    allowed = {f.name for f in dataclasses.fields(CohortRow)} - {"number", "updated_at"}
    bad = set(values) - allowed
    if bad:
        raise ValueError(f"unknown cohort row fields: {sorted(bad)}")
    out = {k: (json.dumps(v, sort_keys=True) if k in _JSON_FIELDS else v) for k, v in values.items()}
    if "reason" in out:
        out["reason"] = str(out["reason"])[:2000]
    for k in ("patient_id", "issuer"):
        if k in out:
            out[k] = str(out[k])[:64]
    out["updated_at"] = time.time()
    return out


class CohortStore:
    """Cohorts and their rows (the job rows themselves are :class:`~pacsbridge.shared.jobs.store.JobStore`'s)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, job_id: str, *, format: str, form: Mapping[str, Any], rows: Iterable[CohortRow],
               then: Mapping[str, Any] | None = None, mass: Mapping[str, Any] | None = None,
               transfer: bool = False) -> None:
        """Write a cohort and its rows (in batches: 10,000 rows are a few round trips)."""
        now = time.time()
        with self.engine.begin() as conn:
            if conn.execute(select(cohorts_table.c.job_id).where(cohorts_table.c.job_id == job_id)).first():
                return  # written already (an equal cohort submitted twice is the same job)
            conn.execute(insert(cohorts_table).values(
                job_id=job_id, format=format, form=json.dumps(dict(form), sort_keys=True), transfer=transfer,
                then=json.dumps(dict(then or {}), sort_keys=True), mass=json.dumps(dict(mass)) if mass else "",
                created_at=now))
            batch: list[dict[str, Any]] = []
            for row in rows:
                values = _values({k: v for k, v in row.to_dict().items() if k not in ("number", "updated_at")})
                batch.append({"job_id": job_id, "number": row.number, **values})
                if len(batch) >= _BATCH:
                    conn.execute(insert(cohort_rows_table), batch)
                    batch = []
            if batch:
                conn.execute(insert(cohort_rows_table), batch)

    def get(self, job_id: str) -> Cohort:
        """The cohort of job ``job_id``; :class:`NotFound` if it is not one."""
        with self.engine.connect() as conn:
            r = conn.execute(select(cohorts_table).where(cohorts_table.c.job_id == job_id)).first()
        if r is None:
            raise NotFound(f"no cohort {job_id!r}")
        m = r._mapping
        return Cohort(job_id=m["job_id"], format=m["format"], form=json.loads(m["form"]), transfer=bool(m["transfer"]),
                      then=json.loads(m["then"] or "{}"), mass=json.loads(m["mass"]) if m["mass"] else None,
                      created_at=m["created_at"])

    def set_transfer(self, job_id: str, transfer: bool = True) -> None:
        """Ask for (or not) the transfer stage: a dry run's ``start``."""
        with self.engine.begin() as conn:
            conn.execute(update(cohorts_table).where(cohorts_table.c.job_id == job_id).values(transfer=transfer))

    # -- rows ---------------------------------------------------------------------------------------
    def counts(self, job_id: str) -> dict[str, int]:
        """``state -> rows`` (one indexed GROUP BY)."""
        c = cohort_rows_table.c
        with self.engine.connect() as conn:
            return {s: n for s, n in conn.execute(select(c.state, func.count()).where(c.job_id == job_id)
                                                  .group_by(c.state))}

    def totals(self, job_id: str) -> dict[str, int]:
        """Every counter summed over the cohort's rows."""
        c = cohort_rows_table.c
        with self.engine.connect() as conn:
            r = conn.execute(select(*(func.coalesce(func.sum(c[k]), 0) for k in COUNTERS))
                             .where(c.job_id == job_id)).one()
        return {k: int(v) for k, v in zip(COUNTERS, r)}

    def row(self, job_id: str, number: int) -> CohortRow:
        c = cohort_rows_table.c
        with self.engine.connect() as conn:
            r = conn.execute(select(cohort_rows_table).where(and_(c.job_id == job_id, c.number == number))).first()
        if r is None:
            raise NotFound(f"cohort {job_id!r} has no row {number}")
        return _row(r)

    def rows(self, job_id: str, *, states: Sequence[str] | None = None, limit: int | None = None,
             offset: int = 0) -> list[CohortRow]:
        """Rows in input order (a page of them with ``limit``/``offset``)."""
        c = cohort_rows_table.c
        where = c.job_id == job_id
        if states is not None:
            where = and_(where, c.state.in_(list(states)))
        stmt = select(cohort_rows_table).where(where).order_by(c.number).offset(offset)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(stmt)]

    def iter_rows(self, job_id: str, states: Sequence[str] | None = None) -> Iterator[CohortRow]:
        """Every row (of ``states``) in input order, read in keyset batches (memory stays bounded)."""
        c = cohort_rows_table.c
        after = -1
        while True:
            where = and_(c.job_id == job_id, c.number > after)
            if states is not None:
                where = and_(where, c.state.in_(list(states)))
            with self.engine.connect() as conn:
                batch = [_row(r) for r in conn.execute(select(cohort_rows_table).where(where)
                                                       .order_by(c.number).limit(_BATCH))]
            if not batch:
                return
            yield from batch
            after = batch[-1].number

    def count(self, job_id: str, states: Sequence[str] | None = None) -> int:
        c = cohort_rows_table.c
        where = c.job_id == job_id
        if states is not None:
            where = and_(where, c.state.in_(list(states)))
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(cohort_rows_table).where(where)).scalar_one())

    def update_row(self, job_id: str, number: int, **values: Any) -> None:
        """Set some fields of one row."""
        c = cohort_rows_table.c
        with self.engine.begin() as conn:
            conn.execute(update(cohort_rows_table).where(and_(c.job_id == job_id, c.number == number))
                         .values(**_values(values)))

    def reset(self, job_id: str, states: Sequence[str], to: str = "pending") -> int:
        """Put rows of ``states`` back to ``to`` (a retry: only the rows not done), counters kept."""
        c = cohort_rows_table.c
        with self.engine.begin() as conn:
            done = conn.execute(update(cohort_rows_table).where(and_(c.job_id == job_id, c.state.in_(list(states))))
                                .values(state=to, reason="", updated_at=time.time()))
        return int(done.rowcount or 0)
