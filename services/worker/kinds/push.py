"""The ``push`` job: C-STORE stored instances to a DICOM node, through :func:`pacsbridge.shared.nodes.pusher.push`,
or STOW-RS them to a node with a STOW URL (its ``stow_url``, else its ``web_url``), through
:func:`pacsbridge.shared.nodes.stow.stow_push`: same outcomes per instance, same report (``protocol`` says which).

A push job (``{"selection": ...}`` to ``job.node``, see :mod:`pacsbridge.shared.jobs.spec`) sends every
selected instance. How instances are sent (as stored, the fallback, the node's limits, no silent drop) is the pusher's
(:mod:`pacsbridge.shared.nodes.pusher`). What the job adds: outcomes per instance in
``pacsbridge_push_instances``, per series in the job's ``pushed`` / ``failed`` counters, the failed SOP
Instance UIDs with their statuses in the job result, and:

* **Retries re-send only what was not acknowledged.** A retried (or taken
  over) job skips the instances already acknowledged for it.

The job ends ``succeeded`` (all acknowledged), ``partial`` (some failed),
``failed`` (none acknowledged: the reason is the first failure, e.g. the
node is unreachable) or ``cancelled``.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import and_, delete

from pacsbridge.shared.core.errors import InvalidRequest, WebError
from pacsbridge.shared.deid.keys import secret
from pacsbridge.shared.deid.outgoing import Outgoing, audit_identifiable
from pacsbridge.shared.deid.projects import ProjectStore
from pacsbridge.shared.index.context import Context
from pacsbridge.shared.jobs.spec import effective_project
from pacsbridge.shared.jobs.store import Job, JobStore, SeriesProgress
from pacsbridge.shared.core.schema import instances_table
from pacsbridge.shared.nodes.pusher import MAX_LISTED, Sent, acknowledged, push, record
from pacsbridge.shared.nodes.stow import stow_push
from pacsbridge.shared.nodes.wado import web_client_for, web_urls
from pacsbridge.worker.outcome import Outcome, worker_id
from pacsbridge.worker.selection import describe, resolve

__all__ = ["run"]


def _series_state(pushed: int, failed: int, expected: int, withheld: int = 0) -> str:
    if pushed >= expected and not failed:
        return "succeeded"
    if failed or (withheld and pushed + withheld >= expected):
        return "partial" if pushed else "failed"
    return "running"


def run(job: Job, ctx: Context, jobs: JobStore, cancel: threading.Event) -> Outcome:
    """Runner of ``push`` jobs (see :mod:`pacsbridge.worker.runner`)."""
    if not job.node:
        raise InvalidRequest("a push needs a destination node", "node")
    node = jobs.get_node(job.node)
    if not node.allow_store:
        raise InvalidRequest(f"node {node.name!r} does not accept pushes (allow_store is false)", "node")
    # checked again now: the node may have been made a de-identified-only one since the job was queued
    project = effective_project(node, job.params.get("project") or None)
    engine = ctx.index.engine
    actor = job.owner or f"job {job.id}"
    outgoing = None
    if project:  # the key checked against the secret before anything is sent
        outgoing = Outgoing(ProjectStore(engine).open(project, secret(ctx.settings)), actor, "push",
                            f"node {node.name}")
    selection = job.params.get("selection") or {}
    selected = resolve(ctx.index, ctx.storage, selection, jobs)
    if not selected.instances and not selected.rejected:
        raise InvalidRequest(f"no stored instance matches {describe(selection)}", "selection")
    by_series = selected.by_series()
    done = acknowledged(engine, job.id)
    with engine.begin() as conn:  # earlier failures are tried again
        conn.execute(delete(instances_table).where(and_(instances_table.c.job_id == job.id,
                                                        instances_table.c.outcome == "failed")))
    todo = [i for i in selected.instances if i.sop_uid not in done]
    before = Counter(i.series_uid for i in selected.instances if i.sop_uid in done)
    jobs.set_series(job.id, [
        SeriesProgress(uid, study_uid=items[0].study_uid if items else "",
                       patient_id=items[0].patient_id if items else "",
                       expected=len(items), pushed=before[uid], failed=0,
                       state="succeeded" if before[uid] == len(items) else "running")
        for uid, items in by_series.items() if uid])
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    errors: dict[str, str] = {}
    left: Counter[tuple[str, str]] = Counter()  # (patient, study) -> instances acknowledged, for the audit

    def on_results(batch: list[Sent]) -> None:
        record(engine, job.id, batch)
        touched = set()
        for s in batch:
            what = "quarantined" if s.withheld else "pushed" if s.ok else "failed"
            counts[s.series_uid][what] += 1
            if s.ok:
                items = by_series.get(s.series_uid) or []
                left[(items[0].patient_id, items[0].study_uid) if items else ("", "")] += 1
            if not s.ok:
                errors.setdefault(s.series_uid, f"{s.withheld}: {s.error}" if s.withheld else s.error)
            touched.add(s.series_uid)
        for uid in touched:
            c = counts[uid]
            pushed = before[uid] + c["pushed"]
            values: dict[str, Any] = {
                "pushed": pushed, "failed": c["failed"], "quarantined": c["quarantined"],
                "state": _series_state(pushed, c["failed"], len(by_series.get(uid, [])), c["quarantined"])}
            if uid in errors:
                values["error"] = (f"{c['failed']} failed, {c['quarantined']} withheld; first: {errors[uid]}"
                                   if c["quarantined"] else f"{c['failed']} failed; first: {errors[uid]}")[:2000]
            jobs.update_series(job.id, uid, **values)

    # STOW-RS to a node that speaks only DICOMweb, or both and prefers DICOMweb (its first ``prefer``)
    web_first = node.has_web and (not node.has_dimse or node.preferences()[:1] in (["wado-rs"], ["wado-uri"]))
    stow = web_urls(node).stow if web_first else ""
    try:
        if stow:  # a DICOMweb node: STOW-RS, with the same outcomes per instance
            try:
                client = web_client_for(node, ctx.settings, cancel)
            except WebError as exc:
                raise InvalidRequest(f"node {node.name!r}: {exc}", "node") from None
            with client:
                report = stow_push(node, todo, engine, client, client.url("studies", base=stow),
                                   folder=ctx.storage.incoming, holder=f"{worker_id()}:{job.id[:8]}",
                                   cancel=cancel, on_results=on_results, transform=outgoing)
        else:
            report = push(node, todo, ctx.settings.ae_title, engine, holder=f"{worker_id()}:{job.id[:8]}",
                          cancel=cancel, on_results=on_results, transform=outgoing)
    finally:  # what left is in the map and the audit, also when the job stops half-way
        if outgoing is not None:
            outgoing.close()
        elif left:
            audit_identifiable(ProjectStore(engine), actor, "push", f"node {node.name}", left, left)
    failures = [{"sop": s.sop_uid, "series": s.series_uid,
                 "status": None if s.status is None else f"0x{s.status:04X}", "error": s.error}
                for s in report.failed]
    failures += [{"sop": sop, "series": "", "status": None, "error": f"not sent: {reason}"}
                 for sop, reason in selected.rejected]
    withheld = [{"sop": s.sop_uid, "series": s.series_uid, "action": s.withheld, "reason": s.error}
                for s in report.withheld]
    total = len(selected.instances) + len(selected.rejected)
    stored = len(done) + report.acknowledged
    result = {
        "node": node.name, "protocol": "stow-rs" if stow else "c-store", "project": project, "selected": total,
        "acknowledged": stored,
        "already_acknowledged": len(done), "sent": report.acknowledged, "failed": len(failures),
        "failures": failures[:MAX_LISTED], "withheld": len(withheld), "withheld_instances": withheld[:MAX_LISTED],
        "risk_warnings": report.risks,
        "decompressed": report.fallbacks, "warnings": report.warnings, "associations": report.associations,
        "seconds": round(report.seconds, 3),
        "instances_per_second": round(report.acknowledged / report.seconds, 1) if report.seconds else None,
    }
    if report.cancelled:
        return Outcome("cancelled", "cancelled by request", result)
    if not failures and withheld:
        first_withheld = withheld[0]
        return Outcome("partial" if stored else "failed",
                       f"{len(withheld)} of {total} instance(s) withheld by project {project!r}'s risk policy; "
                       f"first: {first_withheld['action']}: {first_withheld['reason']}", result)
    if not failures:
        return Outcome("succeeded", "", result)
    first = failures[0]
    message = (f"{len(failures)} of {total} instance(s) not stored by node {node.name!r}; "
               f"first: {first['sop']}: {first['error']}")
    return Outcome("partial" if stored else "failed", message, result)
