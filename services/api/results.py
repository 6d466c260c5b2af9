"""``POST /api/v1/projects/<name>/results``: a result computed on de-identified data comes home.

A research platform sends back one instance it made on data sent under the project (a SEG, an
RTSTRUCT, an SR ...) as ``application/dicom``. The API checks the project (its key against the
secret), that the body is a DICOM instance whose patient is one of the project's pseudonyms, writes
it as received under ``PACSBRIDGE_RESULTS_ROOT`` (the API never writes storage) and queues a
``results`` job (:mod:`pacsbridge.worker.kinds.results`): a worker re-identifies it through the
project's map, stores and indexes it next to the original study, and audits it. 202 with the job;
the job's error says why something was refused. Role ``user``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
from typing import Any

from flask import Blueprint, g, request

from pacsbridge.shared.core.errors import InvalidDataset, InvalidRequest
from pacsbridge.shared.deid.keys import secret
from pacsbridge.shared.deid.options import PROJECT_NAME_PATTERN
from pacsbridge.shared.index.records import read_header

from .auth import requires
from .contract import WRITE, operation
from .models import JobSubmitted
from .params import check_known
from .state import state

__all__ = ["bp", "MAX_RESULT"]

bp = Blueprint("results", __name__)

#: The largest result accepted (bytes): a multi-frame SEG of a large CT.
MAX_RESULT = 512 << 20
_NAME = {"name": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": PROJECT_NAME_PATTERN}}
_PATIENT_ID = 0x00100020
#: The body's content types: DICOM's own, and what a generic HTTP client sends for a file.
_TYPES = ("application/dicom", "application/octet-stream")


@bp.post("/projects/<name>/results")
@requires("user")
@operation("Bring a result home (re-identified by a worker)", "projects",
           {202: ("queued: a results job re-identifies, stores and indexes it", JobSubmitted)},
           errors=WRITE + (404,), path=_NAME, body=[(t, {"type": "string", "format": "binary"}) for t in _TYPES],
           rules=("the body is one DICOM Part 10 instance whose PatientID is a pseudonym of the project",))
def result_home(name: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    check_known(())
    if request.mimetype not in _TYPES:
        raise InvalidRequest("send the instance as application/dicom (one Part 10 file)", "body")
    request.max_content_length = MAX_RESULT
    st = state()
    session = st.projects.open(name, secret(st.ctx.settings))
    folder = os.path.join(st.ctx.settings.results_root, name)
    os.makedirs(folder, exist_ok=True)
    rel = f"{name}/{uuid.uuid4().hex}.dcm"
    tmp = os.path.join(folder, f".{uuid.uuid4().hex}.part")
    try:
        # streamed to disk as it arrives (up to MAX_RESULT), never whole in memory; renamed only once it
        # is checked, so a worker never reads half a file or one refused here
        with open(tmp, "xb") as fh:
            while chunk := request.stream.read(1 << 20):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        with open(tmp, "rb") as src, (mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) if size else
                                      contextlib.nullcontext(b"")) as mm:
            try:
                header = read_header(mm, "the body", (_PATIENT_ID,))
            except InvalidDataset as exc:
                raise InvalidRequest(f"not a DICOM instance: {exc.reason}", "body") from None
        pseudonym = str(header.get("PatientID") or "")
        if session.identity.patient_by_pseudonym(pseudonym) is None:
            session.audit(getattr(g, "token_name", "") or "", "reidentify_refused",
                          detail=f"patient {pseudonym!r} is not a pseudonym of the project")
            raise InvalidRequest(f"patient {pseudonym!r} was not de-identified under project {name!r}", "body")
        os.replace(tmp, os.path.join(st.ctx.settings.results_root, rel))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    job, _ = st.jobs.submit("results", {"project": name, "file": rel}, owner=getattr(g, "token_name", "") or "")
    enqueued = st.enqueue(job)
    path = f"/api/v1/jobs/{job.id}"
    return ({"id": job.id, "path": path, "state": job.state, "created": True, "enqueued": enqueued,
             "job": job.to_dict()}, 202, {"Location": path})
