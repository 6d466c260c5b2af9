"""Nodes and jobs, kept as rows in the index database (DESIGN.md, contract 3).

Tables (beside Conquest's, prefixed so they never clash with a ``dicom.sql``)::

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

import dataclasses
import hashlib
import json
import re
import time
import uuid
from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy import (Boolean, Column, Float, Integer, MetaData, String, Table, Text, and_,
                        delete, func, insert, or_, select, true, update)
from sqlalchemy.engine import Connection, Engine

from .errors import Conflict, InvalidRequest, UnknownJob, UnknownNode

__all__ = ["Node", "Job", "SeriesProgress", "JobStore", "STATES", "ACTIVE", "FINISHED", "KINDS",
           "COUNTERS"]

STATES = ("queued", "running", "succeeded", "partial", "failed", "cancelled")
ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "partial", "failed", "cancelled")
KINDS = ("retrieve", "push", "repack", "import", "index")
COUNTERS = ("expected", "received", "indexed", "pushed", "failed")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_AET = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}\Z")  # printable, no backslash
_WINDOW = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]\Z")

metadata = MetaData()

nodes_table = Table(
    "pacsbridge_nodes", metadata,
    Column("name", String(64), primary_key=True),
    Column("ae_title", String(16), nullable=False),
    Column("host", String(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("retrieve", String(8), nullable=False, default="move"),
    Column("move_destination", String(16), nullable=False, default=""),
    Column("allow_find", Boolean, nullable=False, default=True),
    Column("allow_move", Boolean, nullable=False, default=True),
    Column("allow_get", Boolean, nullable=False, default=True),
    Column("allow_store", Boolean, nullable=False, default=True),
    Column("max_associations", Integer, nullable=False, default=2),
    Column("max_rate", Float, nullable=False, default=0.0),
    Column("move_window", String(11), nullable=False, default=""),
    Column("description", String(255), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

jobs_table = Table(
    "pacsbridge_jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(16), nullable=False, index=True),
    Column("node", String(64), nullable=True, index=True),
    Column("params", Text, nullable=False),
    Column("dedupe_key", String(64), nullable=False, index=True),
    Column("state", String(16), nullable=False, index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text, nullable=False, default=""),
    Column("result", Text, nullable=False, default="{}"),
    Column("webhook", String(2048), nullable=False, default=""),
    Column("worker", String(255), nullable=False, default=""),
    # the name of the API token that submitted the job ("" from the CLI or a rule): it, and admins,
    # see the job's webhook and worker. Added to older databases by upgrade().
    Column("owner", String(64), nullable=False, default="", server_default=""),
    # what became of the webhook: queued, sent (status), retrying (why), failed or refused (why)
    Column("webhook_status", String(512), nullable=False, default="", server_default=""),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False, index=True),
    Column("enqueued_at", Float, nullable=True),
    Column("started_at", Float, nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
)

series_table = Table(
    "pacsbridge_job_series", metadata,
    Column("job_id", String(32), primary_key=True),
    Column("series_uid", String(64), primary_key=True),
    Column("study_uid", String(64), nullable=False, default=""),
    Column("patient_id", String(64), nullable=False, default=""),
    Column("modality", String(16), nullable=False, default=""),
    Column("description", String(64), nullable=False, default=""),
    *(Column(c, Integer, nullable=False, default=0) for c in COUNTERS),
    Column("state", String(16), nullable=False, default="queued"),
    Column("error", Text, nullable=False, default=""),
)

# Per-node limits shared by every worker (pacsbridge.shared.throttle): one row per held
# association slot (a lease that expires if its holder dies), and the rate limiter's clock.
node_leases_table = Table(
    "pacsbridge_node_leases", metadata,
    Column("node", String(64), primary_key=True),
    Column("slot", Integer, primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

node_rates_table = Table(
    "pacsbridge_node_rates", metadata,
    Column("node", String(64), primary_key=True),
    Column("next_at", Float, nullable=False),
)

# Series and studies seen arriving, and when they went quiet (pacsbridge.shared.stable).
stable_table = Table(
    "pacsbridge_stable", metadata,
    Column("level", String(8), primary_key=True),          # "series" or "study"
    Column("uid", String(64), primary_key=True),
    Column("study_uid", String(64), nullable=False, default=""),
    Column("patient_id", String(64), nullable=False, default=""),
    Column("instances", Integer, nullable=False, default=0),
    Column("last_arrival", Float, nullable=False),
    Column("stable_at", Float, nullable=True, index=True),
)

# What indexing set aside (pacsbridge.shared.quarantine): an instance whose rows the database
# refused (index_failed), or one whose UID is already indexed under another patient (uid_conflict).
quarantine_table = Table(
    "pacsbridge_quarantine", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("relpath", String(255), nullable=False, index=True),  # where the file lies, relative to the root
    Column("reason", String(16), nullable=False, index=True),    # index_failed | uid_conflict
    Column("detail", Text, nullable=False, default=""),
    Column("level", String(8), nullable=False, default=""),      # uid_conflict: study, series or image
    Column("sop_uid", String(64), nullable=False, default="", index=True),
    Column("series_uid", String(64), nullable=False, default=""),
    Column("study_uid", String(64), nullable=False, default=""),
    Column("patient_id", String(64), nullable=False, default=""),        # of this instance
    Column("other_patient_id", String(64), nullable=False, default=""),  # already indexed under the UID
    Column("original_relpath", String(255), nullable=False, default=""),
    Column("attempts", Integer, nullable=False, default=1),
    Column("created_at", Float, nullable=False, index=True),
    Column("resolved_at", Float, nullable=True, index=True),
    Column("resolved_by", String(64), nullable=False, default=""),
    Column("decision", String(16), nullable=False, default=""),
)


@dataclasses.dataclass(frozen=True)
class Node:
    """A DICOM peer (a PACS to query and retrieve from, or a destination to push to).

    ``retrieve`` is ``move`` (C-MOVE to ``move_destination``, our listener's
    AE title by default) or ``get`` (C-GET straight into storage).
    ``max_rate`` is instances per second (0: unlimited); ``move_window``
    ``HH:MM-HH:MM`` (local time, may wrap midnight; '' = any time).
    """

    name: str
    ae_title: str
    host: str
    port: int
    retrieve: str = "move"
    move_destination: str = ""
    allow_find: bool = True
    allow_move: bool = True
    allow_get: bool = True
    allow_store: bool = True
    max_associations: int = 2
    max_rate: float = 0.0
    move_window: str = ""
    description: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], partial_of: "Node | None" = None) -> "Node":
        """Validate user input. With ``partial_of``, missing fields keep that node's values.

        Raises
        ------
        InvalidRequest
            Unknown field, wrong type or impossible value (the field is named).
        """
        if not isinstance(data, Mapping):
            raise InvalidRequest("a node must be a JSON object", "node")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise InvalidRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                 f"known: {', '.join(fields)}", unknown[0])
        base = dataclasses.asdict(partial_of) if partial_of else {}
        merged = {**base, **data}
        for required in ("name", "ae_title", "host", "port"):
            if required not in merged:
                raise InvalidRequest("required", required)
        kw: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in merged:
                continue
            value = merged[name]
            want = {"str": str, "int": int, "float": (int, float), "bool": bool}[str(f.type)]
            if isinstance(value, bool) and want is not bool:
                raise InvalidRequest(f"expected {f.type}", name)
            if not isinstance(value, want):
                raise InvalidRequest(f"expected {f.type}", name)
            kw[name] = float(value) if f.type == "float" else value
        node = cls(**kw)
        node.validate()
        return node

    def validate(self) -> None:
        """Raise :class:`InvalidRequest` for an impossible value."""
        if not _NAME.match(self.name):
            raise InvalidRequest("letters, digits, '_', '.', '-' (at most 64, starting with a letter or digit)",
                                 "name")
        if not _AET.match(self.ae_title) or not self.ae_title.strip():
            raise InvalidRequest("an AE title: 1 to 16 printable characters, no backslash", "ae_title")
        if self.move_destination and not _AET.match(self.move_destination):
            raise InvalidRequest("an AE title: 1 to 16 printable characters, no backslash",
                                 "move_destination")
        if not self.host or len(self.host) > 255 or not re.match(r"^[A-Za-z0-9.:_-]+\Z", self.host):
            raise InvalidRequest("a host name or IP address", "host")
        if not 1 <= self.port <= 65535:
            raise InvalidRequest("a TCP port, 1 to 65535", "port")
        if self.retrieve not in ("move", "get"):
            raise InvalidRequest("'move' or 'get'", "retrieve")
        if not 1 <= self.max_associations <= 64:
            raise InvalidRequest("1 to 64", "max_associations")
        if self.max_rate < 0:
            raise InvalidRequest("instances per second, 0 for unlimited", "max_rate")
        if self.move_window and not _WINDOW.match(self.move_window):
            raise InvalidRequest("HH:MM-HH:MM, e.g. 20:00-06:00", "move_window")
        if len(self.description) > 255:
            raise InvalidRequest("at most 255 characters", "description")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def dedupe_key(kind: str, node: str | None, params: Mapping[str, Any]) -> str:
    """The same request gives the same key (parameters compared as canonical JSON)."""
    text = json.dumps([kind, node or "", params], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def upgrade(conn: Connection) -> list[str]:
    """Add the columns of these tables that an older database lacks (each has a server default).

    ``create_all`` makes missing tables only. Returns what was added, as ``table.column``.
    """
    from sqlalchemy import inspect, text
    from sqlalchemy.schema import CreateColumn

    added = []
    insp = inspect(conn)
    for table in metadata.sorted_tables:
        have = {c["name"].lower() for c in insp.get_columns(table.name)}
        for column in table.columns:
            if column.name.lower() not in have:
                # identifiers and types from the metadata above, never from input
                ddl = CreateColumn(column).compile(dialect=conn.dialect)
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))
                added.append(f"{table.name}.{column.name}")
    return added


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
        """Create the tables if missing, and their newer columns (idempotent)."""
        with self.engine.begin() as conn:
            metadata.create_all(conn, checkfirst=True)
            upgrade(conn)

    # -- nodes --------------------------------------------------------------
    def add_node(self, node: Node) -> Node:
        """Store a new node. Raises :class:`Conflict` if the name is taken."""
        node.validate()
        now = time.time()
        with self.engine.begin() as conn:
            if conn.execute(select(nodes_table.c.name).where(nodes_table.c.name == node.name)).first():
                raise Conflict(f"node {node.name!r} exists already")
            conn.execute(insert(nodes_table).values(**node.to_dict(), created_at=now, updated_at=now))
        return node

    def update_node(self, name: str, changes: Mapping[str, Any]) -> Node:
        """Change some fields of a node (validated as :meth:`Node.from_dict`). The name stays."""
        if "name" in changes and changes["name"] != name:
            raise InvalidRequest("a node cannot be renamed; delete it and create another", "name")
        with self.engine.begin() as conn:
            node = Node.from_dict(changes, partial_of=self._node(conn, name))
            conn.execute(update(nodes_table).where(nodes_table.c.name == name)
                         .values(**node.to_dict(), updated_at=time.time()))
        return node

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
             since: float | None = None, limit: int = 100, offset: int = 0) -> tuple[list[Job], int]:
        """Jobs matching the filters, newest first, and how many match in all."""
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
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(jobs_table).where(where)).scalar_one()
            rows = conn.execute(select(jobs_table).where(where)
                                .order_by(jobs_table.c.created_at.desc(), jobs_table.c.id)
                                .limit(limit).offset(offset))
            found = [_job(r) for r in rows]
            sums = {r[0]: dict(zip(COUNTERS, map(int, r[1:]))) for r in conn.execute(
                select(series_table.c.job_id, *(func.sum(series_table.c[c]) for c in COUNTERS))
                .where(series_table.c.job_id.in_([j.id for j in found])).group_by(series_table.c.job_id))}
            for job in found:
                job.summed = sums.get(job.id, dict.fromkeys(COUNTERS, 0))
            return found, int(total)

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

    def retry(self, job_id: str) -> Job:
        """Queue a failed, partial or cancelled job again (its progress is kept)."""
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs_table.c.state).where(jobs_table.c.id == job_id)).first()
            if row is None:
                raise UnknownJob(f"no job {job_id!r}")
            if row.state not in ("failed", "partial", "cancelled"):
                raise Conflict(f"job {job_id} is {row.state}; only failed, partial or cancelled jobs "
                               "can be retried")
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

    def series(self, job_id: str) -> list[SeriesProgress]:
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

    def due_for_enqueue(self, resend_after: float, stale_after: float) -> list[str]:
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
        taken: list[str] = []
        with self.engine.begin() as conn:
            candidates = [r[0] for r in conn.execute(select(c.id).where(due).order_by(c.created_at).limit(1000))]
            for job_id in candidates:
                if conn.execute(update(jobs_table).where(and_(c.id == job_id, due))
                                .values(enqueued_at=now)).rowcount == 1:
                    taken.append(job_id)
        return taken

    def active_jobs(self, kinds: Sequence[str] = KINDS) -> list[Job]:
        """Queued or running jobs (for a worker that resumes after a restart)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs_table).where(and_(
                jobs_table.c.state.in_(ACTIVE), jobs_table.c.kind.in_(list(kinds))))
                .order_by(jobs_table.c.created_at))
            return [_job(r) for r in rows]
