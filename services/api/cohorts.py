"""``/api/v1/cohorts``: many studies from a spreadsheet (or a date range), queried first, then pulled.

``POST /cohorts`` takes a CSV, xlsx or JSON file (multipart, field ``file``, options as form fields) or a
JSON body with the rows inline (``rows``) or a mass transfer (``mass``). The whole file is checked
before anything runs: a file with problems is answered 400 with every problem by row and column, and
nothing is written. A valid one becomes a ``cohort`` job (:mod:`pacsbridge.worker.kinds.cohort`) that
queries every row against the node: a dry run unless ``start`` is true; ``POST /cohorts/<id>/start``
then moves what it found. The report (``/report``) and the rows that did not succeed (``/failed``, a
file of the input's own form, to fix and submit again) download as CSV, xlsx or JSON.

A report shows the pseudonyms the rows supplied, never the ones a project's map made (those are the
map's, admin-only and audited: ``/projects/<name>/map``); and the supplied ones only to the token that
submitted the cohort and to admins: any other token sees a ``Pseudonym`` column's cells empty (in the
rows, the report and the failed rows), since a pseudonym next to a PatientID is a line of the map.
Submitting, starting, cancelling, resuming and retrying need role ``user``; a project token may do none
of it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from flask import Blueprint, Response, g, request
from pydantic import Field, model_validator

from pacsbridge.shared.cohorts import sheets
from pacsbridge.shared.cohorts.mass import MassRequest, chunk_rows
from pacsbridge.shared.cohorts.store import COUNTERS, NOT_SUCCEEDED, ROW_STATES, CohortRow, CohortStore
from pacsbridge.shared.core.errors import Conflict, InvalidRequest, NotFound
from pacsbridge.shared.core.models import Model, check, refuse
from pacsbridge.shared.deid.options import PROJECT_NAME_PATTERN
from pacsbridge.shared.jobs import spec as jobspec
from pacsbridge.shared.jobs.store import FINISHED, Job

from .auth import requires
from .contract import READ, WRITE, operation
from .jobs import _view
from .models import DEFAULT_LIMIT, MAX_LIMIT, Args, Limit, Offset, Out, PageArgs, answer
from .params import args, check_known, json_object
from .state import state

__all__ = ["bp", "CohortRequest"]

bp = Blueprint("cohorts", __name__)

_ID = {"job_id": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"^[0-9a-zA-Z]+$"}}
_NODE = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
FORMATS = ("csv", "xlsx", "json")
_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json",
          "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"}


class RepackThen(Model):
    help = {"dest": "a folder under PACSBRIDGE_EXPORT_ROOT", "template": "a repack template (see repack jobs)"}
    dest: str = Field(min_length=1, max_length=255)
    template: str | None = Field(default=None, max_length=512)


class Then(Model):
    """What follows each row's retrieve: a push to a node, or a repack into a folder (one of them)."""

    help = {"push": "a node to push each row's studies to", "repack": "a folder to repack each row's studies into"}
    push: str | None = _NODE
    repack: RepackThen | None = None

    @model_validator(mode="after")
    def _one(self) -> "Then":
        if (self.push is None) == (self.repack is None):
            raise refuse("name one of push or repack")
        return self


class CohortRequest(Model):
    """A cohort as a JSON body: rows inline, or a mass transfer."""

    rules: ClassVar[tuple[str, ...]] = ("one of rows or mass", "a row that names a pseudonym needs a project")
    help = {"node": "the node to query and pull from", "project": "the de-identification project of what leaves",
            "then": "push or repack after each row's retrieve", "start": "false: a dry run (query only)",
            "rows": "the rows, as objects keyed by the accepted headers", "mass": "a date range in chunks",
            "webhook": "called when the cohort ends"}
    node: str = _NODE
    project: str | None = Field(default=None, pattern=PROJECT_NAME_PATTERN)
    then: Then | None = None
    start: bool = False
    rows: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    mass: MassRequest | None = None
    webhook: str | None = Field(default=None, max_length=2048)

    @model_validator(mode="after")
    def _source(self) -> "CohortRequest":
        if (self.rows is None) == (self.mass is None):
            raise refuse("give rows or mass (one of them)")
        return self


class CohortOut(Out):
    """A cohort: its job's state, the rows counted by state, the counters summed; ``items``: a page of rows."""

    id: str
    path: str
    state: str
    stage: str = Field(description="query or transfer while it runs; queried after a dry run, transferred once "
                                   "moved (query / transfer: cancelled in that stage)")
    node: str
    project: str
    then: dict[str, Any]
    transfer: bool
    format: str
    rows: int
    states: dict[str, int]
    totals: dict[str, int]
    error: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    created: bool = False
    enqueued: bool | None = None
    items: list[dict[str, Any]] = Field(default_factory=list)


class CohortArgs(Args):
    help = {"rows": "1: include a page of rows", "state": "only rows in this state",
            "limit": "rows per page", "offset": "rows to skip"}
    rows: Literal["0", "1"] = "0"
    state: Literal[ROW_STATES] | None = None  # type: ignore[valid-type]
    limit: Limit = Field(DEFAULT_LIMIT, description=f"1 to {MAX_LIMIT}")
    offset: Offset = 0


class FormatArgs(Args):
    help = {"format": "csv, xlsx or json"}
    format: Literal["csv", "xlsx", "json"] | None = None


def _cohort_view(job: Job, store: CohortStore, a: CohortArgs | None = None) -> dict[str, Any]:
    cohort = store.get(job.id)
    counts = store.counts(job.id)
    out = {"id": job.id, "path": f"/api/v1/cohorts/{job.id}", "state": job.state,
           "stage": _stage(job, cohort.transfer, counts),
           "node": job.node or "", "project": str(job.params.get("project") or ""), "then": cohort.then,
           "transfer": cohort.transfer, "format": cohort.format, "rows": sum(counts.values()), "states": counts,
           "totals": store.totals(job.id), "error": _view(job, with_series=False)["error"],
           "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at}
    if a is not None and a.rows == "1":
        rows = store.rows(job.id, states=[a.state] if a.state else None, limit=a.limit, offset=a.offset)
        hidden = _hidden_cells(job, cohort.form.get("headers") or [])
        out["items"] = [_row_view(r, hidden) for r in rows]
    return out


def _hidden_cells(job: Job, headers: list[str]) -> frozenset[str]:
    """The columns this request's token may not see: the ``Pseudonym`` ones (under any of their headers)
    unless the token submitted the cohort or is an admin's. Another user, or a read token, would see
    which pseudonym the submitter gave which patient: a part of the map, which is the admins'."""
    if g.get("role") == "admin" or (job.owner and g.get("token_name") == job.owner):
        return frozenset()
    return frozenset(h for h in headers if sheets.HEADER_ALIASES.get(sheets.normalise_header(h)) == "Pseudonym")


def _cells(cells: dict[str, str], hidden: frozenset[str]) -> dict[str, str]:
    return {h: ("" if h in hidden else v) for h, v in cells.items()} if hidden else cells


def _stage(job: Job, transfer: bool, counts: dict[str, int]) -> str:
    """What a cohort does now: ``query`` or ``transfer`` while it runs (its rows say which: a rerun's job
    still carries the result of the run before), else what its last run ended in."""
    if job.state not in FINISHED:
        return "transfer" if transfer and not counts.get("pending") else "query"
    return str(job.result.get("stage") or "")


def _row_view(row: CohortRow, hidden: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A row as the API shows it: its cells as written (with the pseudonym the row supplied, unless
    ``hidden``: :func:`_hidden_cells`), never a pseudonym the project's map made."""
    return {"row": row.number, "state": row.state, "reason": row.reason, "cells": _cells(row.cells, hidden),
            "patient_id": row.patient_id, "studies": [s["uid"] for s in row.studies],
            **{c: getattr(row, c) for c in COUNTERS}, "jobs": row.children}


def _cohort(job_id: str) -> Job:
    job = state().jobs.get(job_id, with_series=False)
    if job.kind != "cohort":
        raise NotFound(f"no cohort {job_id!r}")
    return job


def _check_then(then: Then | None, project: str | None) -> tuple[dict[str, Any], str | None]:
    """``then`` as the cohort keeps it, and the project that applies (a push node's default)."""
    st = state()
    if then is None:
        return {}, project
    selection = {"StudyInstanceUID": ["1.2"]}  # checked with the models of the child jobs
    if then.push is not None:
        node = st.jobs.get_node(then.push)
        project = jobspec.effective_project(node, project) or None
        jobspec.validate({"kind": "push", "node": then.push, "selection": selection,
                          **({"project": project} if project else {})})
        return {"push": then.push}, project
    assert then.repack is not None
    repack = {"dest": then.repack.dest, **({"template": then.repack.template} if then.repack.template else {})}
    jobspec.validate({"kind": "repack", "selection": selection, **repack, **({"project": project} if project else {})})
    return {"repack": repack}, project


def _multipart() -> tuple[CohortRequest, sheets.Sheet]:
    form = request.form
    known = {"node", "project", "then", "start", "template", "webhook"}
    unknown = sorted(set(form) - known)
    if unknown:
        raise InvalidRequest(f"unknown form field(s): {', '.join(unknown)}", unknown[0])
    upload = request.files.get("file")
    if upload is None or len(request.files) != 1:
        raise InvalidRequest("send one file, in the form field `file`", "file")
    then: dict[str, Any] | None = None
    text = form.get("then", "")
    if text:
        what, _, target = text.partition(":")
        if what == "push" and target:
            then = {"push": target}
        elif what == "repack" and target:
            then = {"repack": {"dest": target, "template": form.get("template") or None}}
        else:
            raise InvalidRequest("expected push:NODE or repack:FOLDER", "then")
    body: dict[str, Any] = {"node": form.get("node", ""), "project": form.get("project") or None, "then": then,
            "start": form.get("start", "").lower() in ("1", "true", "yes"), "rows": [{}],
            "webhook": form.get("webhook") or None}
    req = check(CohortRequest, body, field="body", rename=lambda loc: ".".join(str(p) for p in loc))
    data = upload.read()
    sheet = sheets.read_sheet(data, filename=upload.filename or "", content_type=upload.mimetype or "",
                              max_rows=state().settings.cohort_max_rows)
    return req, sheet


@bp.post("/cohorts")
@requires("user")
@operation("Submit a cohort (a spreadsheet, JSON rows or a date range)", "cohorts",
           {202: ("a new cohort, queued: its rows are queried first", CohortOut),
            200: ("the same cohort (same rows and options) is already queued or running: that one", CohortOut)},
           errors=WRITE + (404,),
           body=[CohortRequest,
                 ("multipart/form-data", {"type": "object", "required": ["file", "node"], "properties": {
                     "file": {"type": "string", "format": "binary"}, "node": {"type": "string"},
                     "project": {"type": "string"}, "then": {"type": "string"}, "start": {"type": "string"},
                     "template": {"type": "string"}, "webhook": {"type": "string"}}})],
           rules=CohortRequest.rules)
def submit() -> tuple[dict[str, Any], int, dict[str, str]]:
    check_known(())
    st = state()
    request.max_content_length = st.settings.cohort_max_bytes
    sheet: sheets.Sheet | None
    if request.mimetype == "multipart/form-data":
        req, sheet = _multipart()
    else:
        body = json_object()
        req = check(CohortRequest, body, field="body", rename=lambda loc: ".".join(str(p) for p in loc))
        sheet = sheets.read_rows(req.rows, max_rows=st.settings.cohort_max_rows) if req.rows is not None else None
    st.jobs.get_node(req.node)
    then, project = _check_then(req.then, req.project)
    webhook = ""
    if req.webhook:
        _, _, _, webhook = jobspec.validate({"kind": "import", "path": "x", "webhook": req.webhook},
                                            st.webhook_policy)
    if sheet is not None:
        rows = [CohortRow(number=r.number, cells=r.cells, spec=r.spec.to_dict(), duplicate_of=r.duplicate_of)
                for r in sheet.rows]
        if not rows:
            raise InvalidRequest("the file has no row to do (only a header, or empty rows)", "file")
        if not project and any(r.spec.get("Pseudonym") for r in rows):
            first = next(r for r in rows if r.spec.get("Pseudonym"))
            raise InvalidRequest(f"row {first.number} names a pseudonym: name a project too", "project")
        fmt = sheet.format
        form: dict[str, Any] = {"format": sheet.format, "headers": sheet.headers, "dialect": sheet.dialect}
    else:
        assert req.mass is not None
        rows = [CohortRow(number=i, cells=cells, spec=spec) for i, (cells, spec) in enumerate(chunk_rows(req.mass), 1)]
        fmt = "json"
        form = {"format": "json", "headers": list(dict.fromkeys(h for r in rows for h in r.cells)),
                "dialect": {"wrapper": "list"}, "mass": True}
    digest = hashlib.sha256(json.dumps([[r.number, r.cells, r.spec] for r in rows], sort_keys=True).encode()
                            + json.dumps([then, req.mass.model_dump(by_alias=True) if req.mass else None,
                                          req.start], sort_keys=True).encode()).hexdigest()
    params: dict[str, Any] = {"rows": digest, **({"project": project} if project else {})}
    job, created = st.jobs.submit("cohort", params, req.node, webhook, owner=g.token_name)
    store = CohortStore(st.ctx.index.engine)
    if created:
        store.create(job.id, format=fmt, form=form, rows=rows, then=then,
                     mass=req.mass.model_dump(by_alias=True) if req.mass else None, transfer=req.start)
    out = _cohort_view(job, store)
    out["created"] = created
    out["enqueued"] = st.enqueue(job) if created else None
    return out, 202 if created else 200, {"Location": out["path"]}


class CohortList(Out):
    items: list[CohortOut]
    total: int
    limit: int
    offset: int


@bp.get("/cohorts")
@operation("List cohorts, newest first", "cohorts", {200: ("a page of cohorts", CohortList)}, args=PageArgs)
def list_cohorts() -> dict[str, Any]:
    a = args(PageArgs)
    jobs, total = state().jobs.list(kind="cohort", limit=a.limit, offset=a.offset)
    store = CohortStore(state().ctx.index.engine)
    return answer(CohortList, {"items": [_cohort_view(j, store) for j in jobs],  # type: ignore[no-any-return]
                               "total": total, "limit": a.limit, "offset": a.offset})


@bp.get("/cohorts/<job_id>")
@operation("A cohort: rows counted by state, counters, a page of rows", "cohorts", {200: ("the cohort", CohortOut)},
           errors=READ + (404,), path=_ID, args=CohortArgs)
def get_cohort(job_id: str) -> dict[str, Any]:
    a = args(CohortArgs)
    return _cohort_view(_cohort(job_id), CohortStore(state().ctx.index.engine), a)


_REPORT_COLUMNS = ("row", "state", "reason")
_REPORT_TAIL = ("patient_id", "studies", *COUNTERS, "jobs")


def _download(body: bytes, fmt: str, name: str) -> Response:
    return Response(body, mimetype=_TYPES[fmt].split(";")[0], headers={
        "Content-Type": _TYPES[fmt], "Content-Disposition": f'attachment; filename="{name}.{fmt}"'})


@bp.get("/cohorts/<job_id>/report")
@operation("The per-row report of a cohort (CSV, xlsx or JSON)", "cohorts",
           {200: ("the report", [(t.split(";")[0], {"type": "string"}) for t in _TYPES.values()])},
           errors=READ + (404,), path=_ID, args=FormatArgs)
def report(job_id: str) -> Response:
    a = args(FormatArgs)
    job = _cohort(job_id)
    store = CohortStore(state().ctx.index.engine)
    cohort = store.get(job.id)
    headers = list(cohort.form.get("headers") or [])
    columns = [*_REPORT_COLUMNS, *headers, *_REPORT_TAIL]
    hidden = _hidden_cells(job, headers)

    def rows() -> Any:
        for r in store.iter_rows(job.id):
            v = _row_view(r)
            yield {"row": r.number, "state": r.state, "reason": r.reason,
                   **{h: "" if h in hidden else r.cells.get(h, "") for h in headers}, "patient_id": r.patient_id,
                   "studies": " ".join(v["studies"]), **{c: getattr(r, c) for c in COUNTERS},
                   "jobs": " ".join(r.children)}

    fmt = a.format or "csv"
    return _download(sheets.write_table(fmt, columns, rows()), fmt, f"cohort-{job.id[:8]}-report")


@bp.get("/cohorts/<job_id>/failed")
@operation("The rows that did not succeed, as a file of the input's own form (fix it and submit it again)",
           "cohorts", {200: ("the rows", [(t.split(";")[0], {"type": "string"}) for t in _TYPES.values()])},
           errors=READ + (404,), path=_ID, args=FormatArgs)
def failed(job_id: str) -> Response:
    a = args(FormatArgs)
    job = _cohort(job_id)
    store = CohortStore(state().ctx.index.engine)
    cohort = store.get(job.id)
    fmt = a.format or cohort.format
    hidden = _hidden_cells(job, list(cohort.form.get("headers") or []))
    cells = (_cells(r.cells, hidden) for r in store.iter_rows(job.id, states=NOT_SUCCEEDED))
    form = cohort.form if fmt == cohort.format else {**cohort.form, "format": fmt, "dialect": {}}
    body = sheets.write_input_form(form, cells)
    return _download(body, fmt, f"cohort-{job.id[:8]}-failed")


def _requeue(job: Job, states: tuple[str, ...]) -> tuple[dict[str, Any], int]:
    st = state()
    if job.state not in FINISHED:
        raise Conflict(f"cohort {job.id} is {job.state}; wait until it ends, or cancel it")
    again = st.jobs.retry(job.id, states=states)
    out = _cohort_view(again, CohortStore(st.ctx.index.engine))
    out["enqueued"] = st.enqueue(again)
    return out, 202


#: The end states of a dry run that ``start`` moves on from (a cancelled one is resumed first).
_STARTABLE = ("succeeded", "partial", "failed")


@bp.post("/cohorts/<job_id>/start")
@requires("user")
@operation("Move what a dry run found", "cohorts", {202: ("queued to transfer", CohortOut)},
           errors=(400, 401, 403, 404, 409, 503), path=_ID)
def start(job_id: str) -> tuple[dict[str, Any], int]:
    check_known(())
    job = _cohort(job_id)
    store = CohortStore(state().ctx.index.engine)
    if store.get(job.id).transfer:
        raise Conflict(f"cohort {job.id} was started already; resume or retry it")
    if job.state in FINISHED and job.state not in _STARTABLE:  # checked before the flag is set
        raise Conflict(f"cohort {job.id} is {job.state}; resume it (its dry run) first, then start it")
    store.set_transfer(job.id, True)
    if job.state not in FINISHED:  # still querying: it goes on to the transfer by itself
        return _cohort_view(state().jobs.get(job.id, with_series=False), store), 202
    return _requeue(job, _STARTABLE)


@bp.post("/cohorts/<job_id>/cancel")
@requires("user")
@operation("Cancel a cohort (and the child jobs it runs)", "cohorts", {200: ("cancelled or asked to stop", CohortOut)},
           errors=(400, 401, 403, 404, 409, 503), path=_ID)
def cancel(job_id: str) -> dict[str, Any]:
    check_known(())
    job = state().jobs.cancel(_cohort(job_id).id)
    return _cohort_view(job, CohortStore(state().ctx.index.engine))


@bp.post("/cohorts/<job_id>/resume")
@requires("user")
@operation("Go on with a cancelled or interrupted cohort", "cohorts", {202: ("queued again", CohortOut)},
           errors=(400, 401, 403, 404, 409, 503), path=_ID)
def resume(job_id: str) -> tuple[dict[str, Any], int]:
    check_known(())
    job = _cohort(job_id)
    if job.state not in FINISHED:  # before any row changes: a cohort still stopping keeps its rows as they are
        raise Conflict(f"cohort {job.id} is {job.state}; wait until it ends, or cancel it")
    store = CohortStore(state().ctx.index.engine)
    for row in store.iter_rows(job.id, states=("cancelled",)):
        store.update_row(job.id, row.number, state="found" if row.studies else "pending", reason="")
    return _requeue(job, ("cancelled", "failed", "partial"))


@bp.post("/cohorts/<job_id>/retry")
@requires("user")
@operation("Run the rows that did not succeed again (queried again, then moved)", "cohorts",
           {202: ("queued again", CohortOut)}, errors=(400, 401, 403, 404, 409, 503), path=_ID)
def retry(job_id: str) -> tuple[dict[str, Any], int]:
    check_known(())
    job = _cohort(job_id)
    if job.state not in FINISHED:
        raise Conflict(f"cohort {job.id} is {job.state}; wait until it ends, or cancel it")
    CohortStore(state().ctx.index.engine).reset(job.id, NOT_SUCCEEDED)
    return _requeue(job, ("partial", "failed", "cancelled", "succeeded"))
