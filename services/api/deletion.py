"""``DELETE /api/v1/patients/{id}``, ``/studies/{uid}``, ``/series/{uid}``: delete from the index and storage.

Admins only. Each answers 202 with a job of kind ``delete`` (the workers delete: the API's storage is
read-only, and a patient of 100,000 instances takes a while; the job shows progress per series), or 200
with the same deletion when it is already queued or running. The request is audited
(``delete_request``), and each series deleted is audited by the worker (``delete``, naming its files).
What is not in the index is a 404, a value that is not a UID (or, for a patient, has a backslash, a
wildcard or a control character) a 400: neither deletes anything. See
:mod:`pacsbridge.shared.index.removal` for the order of rows and files, and
:mod:`pacsbridge.worker.kinds.delete` for jobs using what is deleted.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, g
from sqlalchemy import select

from pacsbridge.shared.core.errors import InvalidRequest, NotFound
from pacsbridge.shared.index import removal

from .auth import requires
from .contract import WRITE, operation
from .jobs import _summary
from .models import JobSubmitted, answer
from .params import check_known
from .state import state

__all__ = ["bp"]

bp = Blueprint("deletion", __name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*\Z")
_PID = re.compile(r"^[^\\\x00-\x1f\x7f*?]{1,64}\Z")
_UID_PATH = {"uid": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"^[0-9]+(\.[0-9]+)*$"}}
_PID_PATH = {"patient_id": {"type": "string", "minLength": 1, "maxLength": 64,
                            "pattern": r"^[^\\\x00-\x1f\x7f*?]+$"}}
_RESPONSES = {202: ("the deletion, queued as a job", JobSubmitted),
              200: ("the same deletion is already queued or running: that job", JobSubmitted)}
_LEVEL_NAME = {"PatientID": "patient", "StudyInstanceUID": "study", "SeriesInstanceUID": "series"}


def _indexed(key: str, value: str) -> bool:
    """Whether the index holds a row of that patient, study or series."""
    index = state().ctx.index
    level = removal.KEYS[key]
    table = index.tables[level]
    column = table.c[index.schema[level].key.column]
    with index.engine.connect() as conn:
        return conn.execute(select(column).where(column == value).limit(1)).first() is not None


def _submit(key: str, value: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    check_known(())
    pattern = _PID if key == "PatientID" else _UID
    if len(value) > 64 or not pattern.match(value):
        raise InvalidRequest("a DICOM UID (digits and dots)" if key != "PatientID" else
                             "at most 64 characters, no backslash, wildcard or control character", key)
    if not _indexed(key, value):
        raise NotFound(f"no {_LEVEL_NAME[key]} {value!r} in the index")
    st = state()
    job, created = st.jobs.submit("delete", {"selection": {key: [value]}}, owner=g.token_name)
    if created:
        st.projects.audit(g.token_name, "delete_request", patient_id=value if key == "PatientID" else "",
                          study_uid=value if key == "StudyInstanceUID" else "", target=f"job {job.id}",
                          detail=f"{key}={value}")
    enqueued = st.enqueue(job) if created else None
    path = f"/api/v1/jobs/{job.id}"
    body = {"id": job.id, "path": path, "state": job.state, "created": created,
            "enqueued": enqueued, "job": _summary(job)}
    return answer(JobSubmitted, body), 202 if created else 200, {"Location": path}


@bp.delete("/patients/<patient_id>")
@requires("admin")
@operation("Delete a patient: index rows and stored files (admins; a job, audited)", "index", _RESPONSES,
           errors=WRITE + (404,), path=_PID_PATH)
def delete_patient(patient_id: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    return _submit("PatientID", patient_id)


@bp.delete("/studies/<uid>")
@requires("admin")
@operation("Delete a study: index rows and stored files (admins; a job, audited)", "index", _RESPONSES,
           errors=WRITE + (404,), path=_UID_PATH)
def delete_study(uid: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    return _submit("StudyInstanceUID", uid)


@bp.delete("/series/<uid>")
@requires("admin")
@operation("Delete a series: index rows and stored files (admins; a job, audited)", "index", _RESPONSES,
           errors=WRITE + (404,), path=_UID_PATH)
def delete_series(uid: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    return _submit("SeriesInstanceUID", uid)
