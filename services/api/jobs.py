"""``/api/v1/jobs``: submit, list, read, cancel and retry jobs (rows of ``pacsbridge_jobs``).

``POST /jobs`` validates the body (:func:`pacsbridge.shared.jobs.spec.validate`),
writes a queued row and sends its id to the workers. It answers

- ``202 {"id", "path", "state", "created": true, "enqueued": ...}`` for a new job;
- ``200`` with ``"created": false`` and the existing job when an equal job (same
  kind, node and parameters) is still queued or running: nothing is pulled twice.

``enqueued`` is false when the broker could not be reached; the row stays
``queued`` (the workers' sweeper sends it later). Submitting, cancelling and
retrying need role ``user``.

A job's ``webhook`` (its URL may hold a key), ``webhook_status`` (what became of it) and
``worker`` (host and pid) are shown only to the token that submitted it (``owner``) and to
admins; others see them empty.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, g

from pacsbridge.shared.core import keyset
from pacsbridge.shared.core.errors import InvalidRequest, NotFound
from pacsbridge.shared.dicom.query import QueryModel
from pacsbridge.shared.jobs import spec as jobspec
from pacsbridge.shared.jobs.store import FINISHED, KINDS, Job

from .auth import requires
from .errors import ApiError
from .contract import READ, WRITE, operation
from .models import JobList, JobListArgs, JobOut, JobSubmitted, answer
from .params import args, check_known, json_object, keyset_page, next_cursor, since_arg
from .state import state

__all__ = ["bp", "CANCEL_WAIT_SECONDS"]

#: How long ``POST /jobs/<id>/cancel`` waits for a running job's worker to stop it.
CANCEL_WAIT_SECONDS = 5.0

bp = Blueprint("jobs", __name__)


#: Fields only a job's owner and admins see.
PRIVATE = ("webhook", "webhook_status", "worker")


_JOB_ID = {"job_id": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"^[0-9a-zA-Z]+$"}}
#: What a job request must satisfy beyond its schema (the document says it in words).
RULES = (*(f"retrieve: {r}" for r in QueryModel.rules),
         "webhook: its host is one PACSBRIDGE_WEBHOOK_ALLOW lists (and resolves to an address it allows); "
         "else 400 (`webhook`)",
         "repack: the template parses (fields of the index, known filters, bounded widths) (`template`)",
         "the node exists (else 404)")


def _view(job: Job, with_series: bool = True) -> dict[str, Any]:
    """The job as this request's token may see it: a job under a de-identification project shows
    only admins its original identifiers (:func:`_redacted`)."""
    out = job.to_dict(with_series=with_series)
    if g.get("role") != "admin" and not (job.owner and g.get("token_name") == job.owner):
        for name in PRIVATE:
            out[name] = ""
    if job.params.get("project") and g.get("role") != "admin":
        _redacted(out)
    return out


def _redacted(out: dict[str, Any]) -> None:
    """A project's job without an original identifier (as its webhook, :meth:`Job.to_webhook`): its
    selection, its series' UIDs, patient and description, the failures and withheld lists and the error
    text (which may name them) go; the counts stay."""
    out["params"] = {"project": out["params"].get("project", "")}
    out["result"] = {k: v for k, v in out["result"].items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if out["error"]:
        out["error"] = "see the job as an admin (its details may name original identifiers)"
    for series in out.get("series") or []:
        series.update(series_uid="", study_uid="", patient_id="", description="", error="")


def _summary(job: Job) -> dict[str, Any]:
    return _view(job, with_series=False)


@bp.post("/jobs")
@requires("user")
@operation("Submit a job", "jobs", {202: ("a new job, queued", JobSubmitted),
                                   200: ("an equal job is already queued or running: that job", JobSubmitted)},
           errors=WRITE + (404,), body=jobspec.JobRequest, rules=RULES,
           description="One body per kind (`kind`): retrieve (a query on a node), push (a selection to a node), "
                       "repack (a selection into a folder) or import (a folder under the import root).")
def submit() -> tuple[dict[str, Any], int, dict[str, str]]:
    check_known(())
    body = json_object()
    if not isinstance(body.get("kind"), str):  # jobspec.validate expects a hashable kind
        raise InvalidRequest(f"expected one of {', '.join(k for k in KINDS if k != 'index')}", "kind")
    st = state()
    kind, node, params, webhook = jobspec.validate(body, st.webhook_policy)
    job, created = st.jobs.submit(kind, params, node, webhook, owner=g.token_name)
    enqueued = st.enqueue(job) if created else None
    body = {"id": job.id, "path": f"/api/v1/jobs/{job.id}", "state": job.state, "created": created,
            "enqueued": enqueued, "job": _summary(job)}
    return answer(JobSubmitted, body), 202 if created else 200, {"Location": body["path"]}


@bp.get("/jobs")
@operation("List jobs, newest first", "jobs", {200: ("a page of jobs", JobList)}, args=JobListArgs,
           rules=JobListArgs.rules)
def list_jobs() -> dict[str, Any]:
    a = args(JobListArgs)
    since = since_arg()
    where_from = keyset.scope("jobs", a.state, a.kind, a.node or "", since)
    after, cap = keyset_page(a, where_from, (float, str))
    jobs, total = state().jobs.list(state=a.state, kind=a.kind, node=a.node or None, since=since,
                                    limit=a.limit + 1, offset=a.offset, after=after, cap=cap)
    nxt = next_cursor(jobs, a.limit, where_from, lambda j: [j.created_at, j.id])
    return answer(JobList, {"items": [_summary(j) for j in jobs], "total": total,  # type: ignore[no-any-return]
                            "limit": a.limit, "offset": a.offset, "next": nxt})


@bp.get("/jobs/<job_id>")
@operation("A job with per-series progress", "jobs", {200: ("the job", JobOut)}, errors=READ + (404,), path=_JOB_ID)
def get_job(job_id: str) -> dict[str, Any]:
    """The job with per-series progress (``series``), ``totals`` and its error (a project token: only
    the jobs it made, redacted)."""
    check_known(())
    job = state().jobs.get(job_id)
    if g.get("role") == "project" and job.owner != g.get("token_name"):
        raise NotFound(f"no job {job_id!r}")
    return answer(JobOut, _view(job))  # type: ignore[no-any-return]


@bp.post("/jobs/<job_id>/cancel")
@requires("user")
@operation("Cancel a job", "jobs",
           {200: ("cancelled (queued, or stopped by its worker within 5 s), or it ended first; `cancel` says which",
                  JobOut),
            202: ("still running: asked to stop (`cancel.outcome` requested)", JobOut)},
           errors=(400, 401, 403, 404, 409, 503), path=_JOB_ID)
def cancel(job_id: str) -> tuple[dict[str, Any], int]:
    """Cancel a job and say what happened (``cancel``: ``outcome`` and ``message``).

    A queued job is cancelled at once. A running one is asked to stop (``cancel_requested``);
    its worker sees that within a second and stops between instances, interrupting what it
    waits for on the network. The answer waits up to :data:`CANCEL_WAIT_SECONDS` for that:
    200 with the finished job (``cancelled``, or the state it reached first), else 202 with
    the job still running and outcome ``requested``.
    """
    check_known(())
    jobs = state().jobs
    job = jobs.cancel(job_id)
    deadline = time.monotonic() + CANCEL_WAIT_SECONDS
    while job.state == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = jobs.get(job_id)
    out = _view(job)
    if job.state == "cancelled":
        was = "stopped by its worker" if job.started_at else "cancelled before it started"
        out["cancel"] = {"outcome": "cancelled", "message": f"the job was {was}"}
        return answer(JobOut, out), 200
    if job.state in FINISHED:
        out["cancel"] = {"outcome": "finished", "message": f"the job ended {job.state} before the cancel reached it"}
        return answer(JobOut, out), 200
    worker = out.get("worker") or "its worker"  # the worker's name only where this token may see it
    out["cancel"] = {"outcome": "requested",
                     "message": f"asked {worker} to stop; it has not stopped within "
                                f"{CANCEL_WAIT_SECONDS:g} s (GET {out['path']} shows when it does)"}
    return answer(JobOut, out), 202


@bp.post("/jobs/<job_id>/retry")
@requires("user")
@operation("Queue a failed, partial or cancelled job again", "jobs", {202: ("queued again", JobOut)},
           errors=(400, 401, 403, 404, 409, 503), path=_JOB_ID)
def retry(job_id: str) -> tuple[dict[str, Any], int]:
    """Queue a failed, partial or cancelled job again and send it to the workers."""
    check_known(())
    st = state()
    if st.jobs.get(job_id).kind == "delete" and g.get("role") != "admin":
        raise ApiError(403, "a deletion is run again by an admin only")
    job = st.jobs.retry(job_id)
    out = _view(job)
    out["enqueued"] = st.enqueue(job)
    return answer(JobOut, out), 202
