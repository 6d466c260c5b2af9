"""The retention policy (``PACSBRIDGE_RETENTION_DAYS``): purge series delivered more than N days ago.

*Delivered* means a push or repack job that ended ``succeeded`` or ``partial`` more than N days ago
sent every instance of the series (its series row is ``succeeded``, ``pushed`` at least ``expected``),
and the series holds no more instances now than were sent then (one that grew since holds instances
no job delivered: it is kept). Nothing else is ever purged: what was retrieved or received and never
pushed or repacked stays. A purge is a ``delete`` job (owner ``retention``; the same order of rows and
files, the same audit, :mod:`pacsbridge.shared.index.removal`).

Cost: each pass reads at most :data:`JOBS_PER_PASS` push/repack jobs after a checkpoint, in the order
they were created (``pacsbridge_jobs.created_at`` is indexed), and looks up each of their series by
its key: it does not grow with the archive or with the history of jobs already considered. The
checkpoint is the ``created_at`` of the last job considered, kept in the audit (an entry ``retention``
per pass that moved it; the newest one is read). A pass stops at the first job that is still running or
ended less than N days ago, so jobs are considered in order and none is skipped (a very long job holds
the next ones back until it ends).
"""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple

from sqlalchemy import and_, func, select
from sqlalchemy.engine import Engine

from pacsbridge.shared.core.schema import audit_table, jobs_table, series_table
from pacsbridge.shared.index.conquest import Index

__all__ = ["Due", "due", "record", "checkpoint", "run_pass", "JOBS_PER_PASS", "ACTION", "OWNER"]

#: Jobs read per pass, and the most series one purge job takes.
JOBS_PER_PASS = 50
SERIES_PER_JOB = 500
ACTION = "retention"
OWNER = "retention"
#: What delivers a series.
DELIVERING = ("push", "repack")


class Due(NamedTuple):
    """What a pass found: series to purge, and the checkpoint to record once they are submitted."""

    series: list[str]
    through: float  #: ``created_at`` of the last job considered (the checkpoint moves here)
    jobs: int  #: jobs considered


def checkpoint(engine: Engine) -> float:
    """The ``created_at`` of the last job a pass considered (0: none yet)."""
    with engine.connect() as conn:
        row = conn.execute(select(audit_table.c.detail).where(audit_table.c.action == ACTION)
                           .order_by(audit_table.c.at.desc(), audit_table.c.id.desc()).limit(1)).first()
    if row is None:
        return 0.0
    try:
        return float(json.loads(row[0])["through"])
    except (ValueError, KeyError, TypeError):
        return 0.0


def due(engine: Engine, index: Index, days: float, now: float | None = None) -> Due:
    """The series delivered more than ``days`` ago and not grown since, from the jobs after the checkpoint."""
    cutoff = (now if now is not None else time.time()) - days * 86400
    after = checkpoint(engine)
    j, s = jobs_table.c, series_table.c
    img = index.tables["Image"]
    ilink = index.schema["Image"].parent.column  # type: ignore[union-attr]
    found: list[str] = []
    through, considered = after, 0
    with engine.connect() as conn:
        jobs = conn.execute(select(j.id, j.state, j.finished_at, j.created_at)
                            .where(and_(j.kind.in_(DELIVERING), j.created_at > after))
                            .order_by(j.created_at, j.id).limit(JOBS_PER_PASS)).all()
        for job_id, state, finished_at, created_at in jobs:
            if finished_at is None or finished_at > cutoff:
                break  # running, or ended too recently: it and the jobs after it wait
            if len(found) >= SERIES_PER_JOB:
                break
            considered += 1
            through = created_at
            if state not in ("succeeded", "partial"):
                continue
            for uid, pushed in conn.execute(select(s.series_uid, s.pushed).where(and_(
                    s.job_id == job_id, s.state == "succeeded", s.expected > 0, s.pushed >= s.expected))):
                if uid in found:
                    continue
                held = conn.execute(select(func.count()).select_from(img).where(img.c[ilink] == uid)).scalar_one()
                if 0 < held <= pushed:
                    found.append(uid)
    return Due(found, through, considered)


def record(engine: Engine, due_: Due, job_id: str = "") -> None:
    """Move the checkpoint (an audit entry ``retention``) once the purge job is submitted."""
    with engine.begin() as conn:
        conn.execute(audit_table.insert().values(
            at=time.time(), actor=OWNER, action=ACTION, project="", patient_id="", study_uid="",
            target=f"job {job_id}" if job_id else "", detail=json.dumps({"through": due_.through, "jobs": due_.jobs,
                                                                          "series": len(due_.series)})))


def run_pass(engine: Engine, index: Index, days: float, submit: Any, now: float | None = None) -> Due:
    """One pass: find what is due, submit one ``delete`` job for it (``submit(params) -> job id``), move the
    checkpoint. Returns what was found."""
    found = due(engine, index, days, now)
    if found.jobs == 0:
        return found
    job_id = submit({"selection": {"SeriesInstanceUID": found.series}}) if found.series else ""
    record(engine, found, job_id)
    return found
