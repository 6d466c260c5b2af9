"""The ``results`` job: a result computed on de-identified data, sent home, made identifiable again.

``POST /api/v1/projects/<name>/results`` (:mod:`pacsbridge.api.results`) writes the instance as the
platform sent it under ``PACSBRIDGE_RESULTS_ROOT`` (the API may not write storage) and queues this
job (``{"project", "file"}``). The worker re-identifies it through the project's map
(:func:`pacsbridge.shared.deid.reidentify.reidentify`), stores it through storage's atomic path,
indexes it next to the original study, audits the re-identification and removes the file it read.
Something the project did not send (its patient, study or references not in the map) fails the job
with the reason, audited as ``reidentify_refused``; the file it read is removed too (it identifies
nobody, and nothing is kept of it).
"""

from __future__ import annotations

import json
import os
import threading

from pydicom import Dataset, dcmread

from pacsbridge.shared.core.errors import InvalidDataset, InvalidRequest
from pacsbridge.shared.deid.keys import secret
from pacsbridge.shared.deid.projects import ProjectStore
from pacsbridge.shared.deid.reidentify import reidentify
from pacsbridge.shared.index.context import Context
from pacsbridge.shared.index.importer import Importer
from pacsbridge.shared.index.records import read_header
from pacsbridge.shared.jobs.spec import safe_relative
from pacsbridge.shared.jobs.store import Job, JobStore
from pacsbridge.worker.outcome import Outcome

__all__ = ["run"]


def _original_header(ctx: Context, study_uid: str) -> Dataset | None:
    """The header of a stored instance of ``study_uid`` (the first of the index's that can be read)."""
    for row in ctx.index.files_for(study=study_uid)[:5]:
        if row.get("DeviceName") != "MAG0" or not row.get("ObjectFile"):
            continue
        try:
            return dcmread(ctx.storage.absolute(row["ObjectFile"]), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - gone or unreadable: try the next one
            continue
    return None


def run(job: Job, ctx: Context, jobs: JobStore, cancel: threading.Event) -> Outcome:
    """Runner of ``results`` jobs (see :mod:`pacsbridge.worker.runner`)."""
    name = str(job.params.get("project") or "")
    rel = safe_relative(job.params.get("file", ""), "file")
    root = os.path.realpath(ctx.settings.results_root)
    path = os.path.realpath(os.path.join(root, rel))
    if not path.startswith(root + os.sep):
        raise InvalidRequest("resolves outside PACSBRIDGE_RESULTS_ROOT", "file")
    session = ProjectStore(ctx.index.engine).open(name, secret(ctx.settings))
    actor = job.owner or f"job {job.id}"
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise InvalidRequest(f"{rel}: the returned instance is gone (already brought home?)", "file") from None
    try:
        back = reidentify(data, name, session.identity, session.config.options.dates == "shift",
                          lambda study: _original_header(ctx, study))
        header = read_header(back.data, f"result {rel}")
    except InvalidDataset as exc:
        session.audit(actor, "reidentify_refused", target=f"job {job.id}", detail=exc.reason[:2000])
        os.unlink(path)
        return Outcome("failed", f"refused: {exc.reason}", {"project": name, "refused": exc.reason})
    stored = ctx.storage.store(back.data, header)
    report = Importer(ctx.index, ctx.storage, workers=1).reindex_files([stored.relpath])
    session.audit(actor, "reidentify", patient_id=back.patient_id, study_uid=back.study_uid,
                  target=f"storage {stored.relpath}",
                  detail=json.dumps({"sop": back.sop_uid, "mapped": back.mapped, "job": job.id}, sort_keys=True))
    os.unlink(path)
    # what the platform that sent it may read: nothing of the original patient or study (the audit, for
    # admins, has them)
    result = {"project": name, "sop_uid": back.sop_uid, "indexed": report.indexed, "mapped": back.mapped}
    if not report.indexed:
        return Outcome("partial", "stored but not indexed (see the worker's log and the quarantine)", result)
    return Outcome("succeeded", "", result)
