"""Nodes and jobs, kept as rows in the index database (docs/architecture.md, contract 3).

Tables (declared in :mod:`pacsbridge.shared.core.schema`)::

    pacsbridge_nodes       one row per DICOM peer: AE title, address, what it allows, its limits
    pacsbridge_jobs        one row per job: kind, parameters, state, attempts, error, timestamps
    pacsbridge_job_series  per job and series: expected, received, indexed, pushed, failed
    pacsbridge_quarantine  what indexing set aside (a refused instance, a UID of two patients)

Job states::

    queued -> running -> succeeded | partial | failed
       \\________________\\-> cancelled          (failed/partial/cancelled -> queued by retry)

Celery carries only the job id. A worker *claims* a job (queued, or running
with a heartbeat older than ``stale_after`` seconds: its worker died), beats
while it works and finishes it; the same request submitted while an equal job
is queued or running returns that job (``dedupe_key``).
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import time
import uuid
from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy import and_, delete, func, insert, or_, select, true, update
from sqlalchemy.engine import Connection, Engine

from pacsbridge.shared.core.errors import Conflict, InvalidRequest, UnknownJob, UnknownNode, UnknownProject
from pacsbridge.shared.core import keyset, migrations
from pacsbridge.shared.core.schema import COUNTERS, jobs_table, nodes_table, projects_table, series_table
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.jobs.spec import effective_project

__all__ = ["Node", "Job", "SeriesProgress", "JobStore", "STATES", "ACTIVE", "FINISHED", "KINDS",
           "COUNTERS"]

STATES = ("queued", "running", "succeeded", "partial", "failed", "cancelled")
ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "partial", "failed", "cancelled")
#: The order of a job list, newest first, as keyset paging continues it (``(column, descending)``).
JOB_ORDER = ((jobs_table.c.created_at, True), (jobs_table.c.id, False))
KINDS = ("retrieve", "push", "repack", "import", "index", "results", "cohort", "delete")

@dataclasses.dataclass
class SeriesProgress:
    """One series of a job, with its counters."""

    series_uid: str
    study_uid: str = ""
    patient_id: str = ""
    modality: str = ""
    description: str = ""
    expected: int = 0
    received: int = 0
    indexed: int = 0
    pushed: int = 0
    failed: int = 0
    quarantined: int = 0  # withheld by a project's risk policy (quarantined or dropped), not sent
    state: str = "queued"
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Job:
    """A job row, with its series when read by :meth:`JobStore.get`."""

    id: str
    kind: str
    node: str | None
    params: dict[str, Any]
    state: str
    attempts: int = 0
    error: str = ""
    result: dict[str, Any] = dataclasses.field(default_factory=dict)
    webhook: str = ""
    worker: str = ""
    owner: str = ""
    webhook_status: str = ""
    cancel_requested: bool = False
    created_at: float = 0.0
    started_at: float | None = None
    heartbeat_at: float | None = None
    finished_at: float | None = None
    series: list[SeriesProgress] = dataclasses.field(default_factory=list)
    #: totals summed by the database (:meth:`JobStore.list` reads no series rows)
    summed: dict[str, int] | None = dataclasses.field(default=None, repr=False)

    @property
    def totals(self) -> dict[str, int]:
        """Sum of every counter over the series."""
        if self.summed is not None and not self.series:
            return dict(self.summed)
        return {c: sum(getattr(s, c) for s in self.series) for c in COUNTERS}

    def to_dict(self, with_series: bool = True) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("summed")
        out["totals"] = self.totals
        out["path"] = f"/api/v1/jobs/{self.id}"
        if with_series:
            out["series"] = [s.to_dict() for s in self.series]
        else:
            out.pop("series")
        return out


    def to_webhook(self) -> dict[str, Any]:
        """The body of the job's webhook: :meth:`to_dict`, except for a job under a de-identification
        project, whose body carries no original identifier (no selection, series, patient or UIDs, no
        error text, which may name them): its identity, state, times, project and counts only."""
        project = self.params.get("project")
        if not project:
            return self.to_dict()
        counts = {k: v for k, v in self.result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return {"id": self.id, "kind": self.kind, "node": self.node, "project": project, "state": self.state,
                "attempts": self.attempts, "created_at": self.created_at, "started_at": self.started_at,
                "finished_at": self.finished_at, "path": f"/api/v1/jobs/{self.id}", "totals": self.totals,
                "series": len(self.series), "result": counts,
                "error": "see the job through the API (its details may name original identifiers)"
                if self.error else ""}


def dedupe_key(kind: str, node: str | None, params: Mapping[str, Any]) -> str:
    """The same request gives the same key (parameters compared as canonical JSON)."""
    text = json.dumps([kind, node or "", params], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _serialize(conn: Connection, key: str) -> None:
    """Hold, until the transaction ends, a lock that every submit of ``key`` takes first.

    Without it two equal requests at the same moment (a double click, a client re-sending
    a POST that timed out) both read "no equal job" and both insert one. PostgreSQL: a
    transaction-level advisory lock on the key. SQLite: a write (that changes nothing) as
    the first statement takes the database's write lock, so the read that follows sees
    the other submit's committed row.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(int(key[:15], 16))))
    else:
        conn.execute(update(jobs_table).where(jobs_table.c.id == "").values(state=jobs_table.c.state))


def _project_exists(conn: Connection, project: str) -> None:
    """A node's de-identification project must exist (in the same transaction as the node's row)."""
    if project and conn.execute(select(projects_table.c.name).where(projects_table.c.name == project)).first() is None:
        raise InvalidRequest(f"no project called {project!r} (create it first: pacsbridge projects add)", "project")


def _job(row: Any) -> Job:
    m = row._mapping
    return Job(id=m["id"], kind=m["kind"], node=m["node"], params=json.loads(m["params"]),
               state=m["state"], attempts=m["attempts"], error=m["error"],
               result=json.loads(m["result"] or "{}"), webhook=m["webhook"], worker=m["worker"], owner=m["owner"],
               webhook_status=m["webhook_status"],
               cancel_requested=bool(m["cancel_requested"]), created_at=m["created_at"],
               started_at=m["started_at"], heartbeat_at=m["heartbeat_at"], finished_at=m["finished_at"])


class JobStore:
    """Nodes and jobs in the index database (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self) -> None:
        """Bring pacsbridge's tables to the current schema (the migrations; idempotent)."""
        with self.engine.begin() as conn:
            migrations.upgrade(conn)

    # -- nodes --------------------------------------------------------------
    def add_node(self, node: Node) -> Node:
        """Store a new node. Raises :class:`Conflict` if the name is taken."""
        node.validate()
        now = time.time()
        with self.engine.begin() as conn:
            if conn.execute(select(nodes_table.c.name).where(nodes_table.c.name == node.name)).first():
                raise Conflict(f"node {node.name!r} exists already")
            _project_exists(conn, node.project)
            conn.execute(insert(nodes_table).values(**node.to_dict(), created_at=now, updated_at=now))
        return node

    def update_node(self, name: str, changes: Mapping[str, Any]) -> Node:
        """Change some fields of a node (validated as :meth:`Node.from_dict`). The name stays."""
        if "name" in changes and changes["name"] != name:
            raise InvalidRequest("a node cannot be renamed; delete it and create another", "name")
        with self.engine.begin() as conn:
            node = Node.from_dict(changes, partial_of=self._node(conn, name))
            _project_exists(conn, node.project)
            conn.execute(update(nodes_table).where(nodes_table.c.name == name)
                         .values(**node.to_dict(), updated_at=time.time()))
        return node

    def set_node_secret(self, name: str, sealed: str) -> None:
        """Keep ``sealed`` (a secret encrypted by :func:`~pacsbridge.shared.nodes.credentials.seal`) as the
        node's stored secret, replacing any. :class:`UnknownNode` if there is no such node."""
        with self.engine.begin() as conn:
            self._node(conn, name)
            conn.execute(update(nodes_table).where(nodes_table.c.name == name)
                         .values(web_secret_sealed=sealed, updated_at=time.time()))

    def clear_node_secret(self, name: str) -> bool:
        """Forget the node's stored secret; False when it had none. :class:`UnknownNode` if no such node."""
        with self.engine.begin() as conn:
            if not self._node(conn, name).web_secret_sealed:
                return False
            conn.execute(update(nodes_table).where(nodes_table.c.name == name)
                         .values(web_secret_sealed="", updated_at=time.time()))
        return True

    def get_node(self, name: str) -> Node:
        """The node called ``name``; :class:`UnknownNode` if there is none."""
        with self.engine.connect() as conn:
            return self._node(conn, name)

    @staticmethod
    def _node(conn: Connection, name: str) -> Node:
        row = conn.execute(select(nodes_table).where(nodes_table.c.name == name)).first()
        if row is None:
            raise UnknownNode(f"no node called {name!r}")
        fields = {f.name for f in dataclasses.fields(Node)}
        return Node(**{k: v for k, v in row._mapping.items() if k in fields})

    def list_nodes(self) -> list[Node]:
        fields = {f.name for f in dataclasses.fields(Node)}
        with self.engine.connect() as conn:
            rows = conn.execute(select(nodes_table).order_by(nodes_table.c.name))
            return [Node(**{k: v for k, v in r._mapping.items() if k in fields}) for r in rows]

    def delete_node(self, name: str) -> None:
        """Remove a node; :class:`Conflict` while an active job uses it."""
        with self.engine.begin() as conn:
            self._node(conn, name)
            busy = conn.execute(select(func.count()).select_from(jobs_table).where(
                and_(jobs_table.c.node == name, jobs_table.c.state.in_(ACTIVE)))).scalar_one()
            if busy:
                raise Conflict(f"node {name!r} is used by {busy} queued or running job(s)")
            conn.execute(delete(nodes_table).where(nodes_table.c.name == name))

    # -- jobs ---------------------------------------------------------------
    def submit(self, kind: str, params: Mapping[str, Any], node: str | None = None,
               webhook: str = "", owner: str = "") -> tuple[Job, bool]:
        """Create a queued job, or return the equal one already queued or running.

        Returns ``(job, created)``. The node, when given, must exist. ``owner`` is the name
        of the API token that asks (it, and admins, see the job's webhook and worker).
        """
        if kind not in KINDS:
            raise InvalidRequest(f"expected one of {', '.join(KINDS)}", "kind")
        if node is not None or params.get("project"):
            params = self._with_project(kind, node, params)
        key = dedupe_key(kind, node, params)
        with self.engine.begin() as conn:
            _serialize(conn, key)
            if node is not None:
                self._node(conn, node)
            row = conn.execute(select(jobs_table).where(and_(
                jobs_table.c.dedupe_key == key, jobs_table.c.state.in_(ACTIVE)))
                .order_by(jobs_table.c.created_at).limit(1)).first()
            if row is not None:
                return _job(row), False
            job_id = uuid.uuid4().hex
            conn.execute(insert(jobs_table).values(
                id=job_id, kind=kind, node=node, params=json.dumps(params, sort_keys=True),
                dedupe_key=key, state="queued", attempts=0, error="", result="{}", webhook=webhook,
                worker="", owner=owner, cancel_requested=False, created_at=time.time()))
        return self.get(job_id), True

    def _with_project(self, kind: str, node: str | None, params: Mapping[str, Any]) -> Mapping[str, Any]:
        """``params`` with the project the job de-identifies under (:func:`~.spec.effective_project`:
        a push takes its node's default), which must exist; refused for a node that receives
        de-identified data only when no project applies."""
        with self.engine.connect() as conn:
            target = self._node(conn, node) if node is not None and kind == "push" else None
            project = effective_project(target, params.get("project"))
            if project and conn.execute(select(projects_table.c.name)
                                        .where(projects_table.c.name == project)).first() is None:
                raise UnknownProject(f"no project called {project!r}")
        return {**params, "project": project} if project else params

    def get(self, job_id: str, with_series: bool = True) -> Job:
        """The job and (by default) its series; :class:`UnknownJob` if there is none."""
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
            if row is None:
                raise UnknownJob(f"no job {job_id!r}")
            job = _job(row)
            if with_series:
                rows = conn.execute(select(series_table).where(series_table.c.job_id == job_id)
                                    .order_by(series_table.c.study_uid, series_table.c.series_uid))
                job.series = [SeriesProgress(**{k: v for k, v in r._mapping.items() if k != "job_id"})
                              for r in rows]
        return job

    def list(self, *, state: str | None = None, kind: str | None = None, node: str | None = None,
             since: float | None = None, limit: int = 100, offset: int = 0,
             after: Sequence[Any] | None = None, cap: int | None = None) -> tuple[list[Job], Any]:
        """Jobs matching the filters, newest first, and how many match in all.

        ``after``: the sort key ``(created_at, id)`` of the last job of the page before (keyset paging,
        see :mod:`pacsbridge.shared.core.keyset`). ``cap``: count at most that many (None beyond).
        """
        cond = []
        if state:
            cond.append(jobs_table.c.state == state)
        if kind:
            cond.append(jobs_table.c.kind == kind)
        if node:
            cond.append(jobs_table.c.node == node)
        if since is not None:
            cond.append(jobs_table.c.created_at >= since)
        where = and_(true(), *cond)
        page = where if after is None else and_(where, keyset.after(JOB_ORDER, after))
        with self.engine.connect() as conn:
            total = keyset.count(conn, select(jobs_table.c.id).where(where), cap)
            rows = conn.execute(select(jobs_table).where(page)
                                .order_by(jobs_table.c.created_at.desc(), jobs_table.c.id)
                                .limit(limit).offset(offset))
            found = [_job(r) for r in rows]
            sums = {r[0]: dict(zip(COUNTERS, map(int, r[1:]))) for r in conn.execute(
                select(series_table.c.job_id, *(func.sum(series_table.c[c]) for c in COUNTERS))
                .where(series_table.c.job_id.in_([j.id for j in found])).group_by(series_table.c.job_id))}
            for job in found:
                job.summed = sums.get(job.id, dict.fromkeys(COUNTERS, 0))
            return found, total

    def claim(self, job_id: str, worker: str, stale_after: float = 120.0) -> Job | None:
        """Take a job to run it: queued, or running with a stale heartbeat (its worker died)
        or already held by this same ``worker`` (a retried task).

        Returns the job (state running, attempts + 1) or None if another live
        worker holds it, or it is finished or cancelled.
        """
        now = time.time()
        with self.engine.begin() as conn:
            result = conn.execute(update(jobs_table).where(and_(
                jobs_table.c.id == job_id,
                or_(jobs_table.c.state == "queued",
                    and_(jobs_table.c.state == "running",
                         or_(jobs_table.c.worker == worker, jobs_table.c.heartbeat_at.is_(None),
                             jobs_table.c.heartbeat_at < now - stale_after))))).values(
                state="running", worker=worker, attempts=jobs_table.c.attempts + 1,
                started_at=func.coalesce(jobs_table.c.started_at, now), heartbeat_at=now))
            if result.rowcount != 1:
                return None
        return self.get(job_id)

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Say the job is alive. False if it was cancelled or taken over: stop working on it."""
        with self.engine.begin() as conn:
            result = conn.execute(update(jobs_table).where(and_(
                jobs_table.c.id == job_id, jobs_table.c.worker == worker,
                jobs_table.c.state == "running", jobs_table.c.cancel_requested.is_(False)))
                .values(heartbeat_at=time.time()))
            return result.rowcount == 1

    def finish(self, job_id: str, state: str, error: str = "",
               result: Mapping[str, Any] | None = None, worker: str | None = None) -> bool:
        """End a running job (succeeded, partial, failed or cancelled).

        With ``worker``, only while that worker still holds the job running: a
        worker whose job was taken over (its beats came late) or ended meanwhile
        must not write its own end over another run. Returns whether the row changed.
        """
        if state not in FINISHED:
            raise ValueError(f"not a final state: {state}")
        values: dict[str, Any] = {"state": state, "error": error, "finished_at": time.time()}
        if result is not None:
            values["result"] = json.dumps(result, sort_keys=True)
        where = jobs_table.c.id == job_id
        if worker is not None:
            where = and_(where, jobs_table.c.worker == worker, jobs_table.c.state == "running")
        with self.engine.begin() as conn:
            return conn.execute(update(jobs_table).where(where).values(**values)).rowcount == 1

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once; ask a running one to stop. :class:`Conflict` if finished."""
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs_table.c.state).where(jobs_table.c.id == job_id)).first()
            if row is None:
                raise UnknownJob(f"no job {job_id!r}")
            if row.state in FINISHED:
                raise Conflict(f"job {job_id} is {row.state} already")
            values: dict[str, Any] = {"cancel_requested": True}
            if row.state == "queued":
                values.update(state="cancelled", finished_at=time.time(), error="cancelled by request")
            # only in the state read: a worker claiming the job meanwhile keeps it running
            # (and sees cancel_requested), instead of running a job the row calls cancelled
            done = conn.execute(update(jobs_table).where(and_(
                jobs_table.c.id == job_id, jobs_table.c.state == row.state)).values(**values))
            if done.rowcount == 0:
                conn.execute(update(jobs_table).where(and_(
                    jobs_table.c.id == job_id, jobs_table.c.state == "running"))
                    .values(cancel_requested=True))
        return self.get(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        with self.engine.connect() as conn:
            return bool(conn.execute(select(jobs_table.c.cancel_requested)
                                     .where(jobs_table.c.id == job_id)).scalar())

    def retry(self, job_id: str, states: Sequence[str] = ("failed", "partial", "cancelled")) -> Job:
        """Queue a job again (its progress is kept): a failed, partial or cancelled one, or one of ``states``
        (a cohort's ``start`` queues a finished dry run again)."""
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs_table.c.state).where(jobs_table.c.id == job_id)).first()
            if row is None:
                raise UnknownJob(f"no job {job_id!r}")
            if row.state not in states:
                raise Conflict(f"job {job_id} is {row.state}; only {', '.join(states)} jobs can be queued again")
            conn.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(
                state="queued", error="", cancel_requested=False, finished_at=None, worker="",
                heartbeat_at=None, enqueued_at=None))
        return self.get(job_id)

    # -- progress -----------------------------------------------------------
    def set_series(self, job_id: str, series: Iterable[SeriesProgress]) -> None:
        """Insert or replace series rows of a job (all fields as given)."""
        rows = [{"job_id": job_id, **s.to_dict()} for s in series]
        if not rows:
            return
        with self.engine.begin() as conn:
            for r in rows:
                done = conn.execute(update(series_table).where(and_(
                    series_table.c.job_id == job_id, series_table.c.series_uid == r["series_uid"]))
                    .values(**{k: v for k, v in r.items() if k not in ("job_id", "series_uid")}))
                if done.rowcount == 0:
                    conn.execute(insert(series_table).values(**r))

    def update_series(self, job_id: str, series_uid: str, **values: Any) -> None:
        """Set some fields of one series row (counters, state, error)."""
        allowed = set(COUNTERS) | {"state", "error", "study_uid", "patient_id", "modality", "description"}
        bad = set(values) - allowed
        if bad:
            raise ValueError(f"unknown series fields: {sorted(bad)}")
        with self.engine.begin() as conn:
            conn.execute(update(series_table).where(and_(
                series_table.c.job_id == job_id, series_table.c.series_uid == series_uid)).values(**values))

    def series(self, job_id: str) -> builtins.list[SeriesProgress]:
        return self.get(job_id).series

    def set_webhook_status(self, job_id: str, status: str) -> None:
        """Say what became of the job's webhook (shown to its owner and admins)."""
        with self.engine.begin() as conn:
            conn.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(webhook_status=status[:512]))

    def mark_enqueued(self, job_id: str) -> None:
        """Remember that a ``run_job`` message for this job was just sent."""
        with self.engine.begin() as conn:
            conn.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(enqueued_at=time.time()))

    def forget_enqueued(self, job_id: str) -> None:
        """The message could not be sent: let the next sweep take the job again."""
        with self.engine.begin() as conn:
            conn.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(enqueued_at=None))

    def due_for_enqueue(self, resend_after: float, stale_after: float) -> builtins.list[str]:
        """Jobs whose message may be lost, each taken by one caller only.

        Queued jobs never enqueued or not re-sent for ``resend_after`` seconds
        (the broker was down at submit time, or restarted without persistence),
        and running jobs whose heartbeat is older than ``stale_after`` (their
        worker died). Their ``enqueued_at`` is set, so that several workers
        sweeping at once send each job once.
        """
        now = time.time()
        c = jobs_table.c
        due = or_(and_(c.state == "queued", or_(c.enqueued_at.is_(None), c.enqueued_at < now - resend_after)),
                  and_(c.state == "running", c.heartbeat_at < now - stale_after,
                       or_(c.enqueued_at.is_(None), c.enqueued_at < now - stale_after)))
        taken: builtins.list[str] = []
        with self.engine.begin() as conn:
            candidates = [r[0] for r in conn.execute(select(c.id).where(due).order_by(c.created_at).limit(1000))]
            for job_id in candidates:
                if conn.execute(update(jobs_table).where(and_(c.id == job_id, due))
                                .values(enqueued_at=now)).rowcount == 1:
                    taken.append(job_id)
        return taken

    def active_jobs(self, kinds: Sequence[str] = KINDS) -> builtins.list[Job]:
        """Queued or running jobs (for a worker that resumes after a restart)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs_table).where(and_(
                jobs_table.c.state.in_(ACTIVE), jobs_table.c.kind.in_(list(kinds))))
                .order_by(jobs_table.c.created_at))
            return [_job(r) for r in rows]
