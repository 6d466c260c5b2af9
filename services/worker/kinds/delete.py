"""The ``delete`` job: patients, studies or series out of the index and the storage (admins only, audited).

The API's ``DELETE /patients/{id}``, ``/studies/{uid}`` and ``/series/{uid}`` submit it (the API's
storage is mounted read-only; a worker deletes, and a large patient takes as long as it takes, with
progress per series). The order of the steps, and what a crash leaves, is
:mod:`pacsbridge.shared.index.removal`'s. Each series is a series row of the job (``expected``: its
instances, ``failed``: files that could not be removed), ``done`` once its rows and files are gone.

A job that is queued or running on the same patient, study or series (its parameters name one of
them: a push, repack, retrieve or cohort) makes the deletion fail before anything is deleted, with
those jobs named: delete again once they are done. A push that selects by a retrieve job's id (``{"job":
...}``) is not recognised; if it runs meanwhile, the instances whose files are gone fail in it
("file missing") and it ends ``partial``; nothing else is affected.
"""

from __future__ import annotations

import json
import threading

from pacsbridge.shared.core.errors import Conflict
from pacsbridge.shared.index import removal
from pacsbridge.shared.index.context import Context
from pacsbridge.shared.jobs.store import Job, JobStore, SeriesProgress
from pacsbridge.worker.outcome import Outcome

__all__ = ["run"]

#: Kinds whose running jobs read what a deletion takes away.
READERS = ("push", "repack", "retrieve", "cohort", "results")


def _busy(job: Job, jobs: JobStore, plan: list[removal.SeriesPlan], values: list[str]) -> list[Job]:
    """Queued or running jobs whose parameters name one of the patients, studies or series deleted."""
    names = set(values) | {p.series_uid for p in plan} | {p.study_uid for p in plan} | \
        {p.patient_id for p in plan}
    names.discard("")
    busy = []
    for other in jobs.active_jobs(READERS):
        if other.id == job.id:
            continue
        text = json.dumps(other.params)
        if any(json.dumps(name) in text for name in names):  # a whole JSON string: "1.2.3" never matches "1.2.34"
            busy.append(other)
    return busy


def run(job: Job, ctx: Context, jobs: JobStore, cancel: threading.Event) -> Outcome:
    """Delete what ``params.selection`` names (one of PatientID, StudyInstanceUID, SeriesInstanceUID)."""
    (key, values), = job.params["selection"].items()
    values = [values] if isinstance(values, str) else list(values)
    planned = removal.plan(ctx.index, key, values)
    busy = _busy(job, jobs, planned, values)
    if busy:
        named = ", ".join(f"{b.id} ({b.kind}, {b.state})" for b in busy[:5])
        raise Conflict(f"{len(busy)} job(s) use what this would delete: {named}; nothing was deleted "
                       "(delete again once they are done)")
    jobs.set_series(job.id, [SeriesProgress(series_uid=p.series_uid, study_uid=p.study_uid,
                                            patient_id=p.patient_id[:64], expected=p.instances)
                             for p in planned])

    def progress(one: removal.SeriesPlan, report: removal.Report) -> None:
        jobs.update_series(job.id, one.series_uid, state="done")

    actor = job.owner or f"job {job.id}"
    done, report = removal.remove(ctx.index, ctx.storage, key, values, actor, f"job {job.id}", cancel=cancel,
                                  progress=progress)
    result = report.as_dict()
    if cancel.is_set() and report.series < len(done):
        return Outcome("cancelled", f"cancelled by request after {report.series} of {len(done)} series "
                                    "(those are deleted)", result)
    if not done and not (report.finished_earlier or report.studies or report.patients):
        return Outcome("failed", f"nothing in the index matches {key} {', '.join(values[:5])}", result)
    if report.files_refused or report.files_failed:
        return Outcome("partial", f"index rows deleted; {report.files_refused + report.files_failed} file(s) "
                                  f"left in storage: {'; '.join(report.errors[:3])}", result)
    return Outcome("succeeded", "", result)
