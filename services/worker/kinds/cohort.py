"""The ``cohort`` job: resolve every row of a spreadsheet against a node, then pull and hand on what it found.

A cohort is a job (its id is the cohort's) with rows in :class:`~pacsbridge.shared.cohorts.store.CohortStore`.
The job runs in two stages, each resumable row by row (a row's state is written as it changes, so a job
taken over after a crash, a cancel followed by ``resume``, or a ``retry`` goes on with the rows not done):

**Query** (every ``pending`` row; the dry run stops after it unless the cohort asked for the transfer):

* a row named twice in the file (same fields) is ``duplicate`` of its first row and not asked again;
* the row becomes a study-level C-FIND (through the :class:`~pacsbridge.shared.nodes.sources.Searcher`
  interface, so a DICOMweb source fits later), then a series-level one per study for the counts;
* ``not_found`` (nothing), ``ambiguous`` (a row naming an accession or a study UID that answers with
  several patients), ``failed`` (the node's error), else ``found`` with its studies, series and instances;
  a mass transfer's chunk (a date range, many patients by design) is never ambiguous, and one with no
  study that passes the filters is ``done`` (an empty week is nothing to fix and send again);
* a study is *held* when every instance the node lists (IMAGE-level C-FIND, only for series whose counts
  say complete) is indexed here: a row all held is ``held``, and is not pulled again;
* a row's pseudonym (a project's cohort) must agree with the project's map and with the other rows of the
  cohort: one patient, one pseudonym; one pseudonym, one patient. A row that contradicts it is ``refused``.

The node is asked one row at a time per association, with at most the node's ``max_associations``
associations (each under its :class:`~pacsbridge.shared.nodes.throttle.NodeSlots` lease, across every job);
a mass transfer's chunks, one at a time.

**Transfer** (rows ``found`` / ``held``, with ``transferring`` ones a crash interrupted): per row, a child
``retrieve`` job for the studies not held (with the series the query found, not asked again), then a
child ``push`` or ``repack`` job (``then``) of all its studies under the cohort's project, after the
row's pseudonym is given to its patient in the project's map. Child jobs are real jobs (``GET
/jobs/<id>`` shows their per-series progress); the cohort runs them itself, in its own process, at most
``max_associations`` rows at once, so a cohort never waits for a free job slot that its own children
need. A child another worker already runs (the sweeper re-sent it after a crash) is waited for; one
whose worker died (its beats stopped) is taken over here, so the cohort never waits for a job slot
for it either. A child retrieve names its series (those the query kept: a ``BodyPartExamined`` filter
holds at series level), so that a worker running it without the cohort's plan pulls no more. Studies
shared by two rows are pulled by one of them at a time (a lock per study), so nothing is pulled twice.

End state: ``succeeded`` when every row succeeded (``done``, or ``duplicate``), ``partial`` when some did,
``failed`` when none did; the error counts the rows by state. A dry run ends ``succeeded`` when every
row was resolved (``found``/``held``/``duplicate``, an empty chunk ``done``), else ``partial`` with the counts.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping

from pacsbridge.shared.cohorts.mass import keep_series, keep_study
from pacsbridge.shared.cohorts.store import (NOT_SUCCEEDED, SUCCEEDED, TRANSFERABLE, CohortRow, CohortStore)
from pacsbridge.shared.core.errors import Conflict, DimseError, InvalidRequest, PacsbridgeError
from pacsbridge.shared.deid.keys import secret
from pacsbridge.shared.deid.projects import ProjectSession, ProjectStore
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.dicom.query import Query
from pacsbridge.shared.index.context import Context
from pacsbridge.shared.jobs.store import FINISHED, Job, JobStore
from pacsbridge.shared.nodes.searchers import searcher_for
from pacsbridge.shared.nodes.sources import Searcher, SeriesRef
from pacsbridge.shared.nodes.throttle import NodeSlots, SlotTimeout
from pacsbridge.worker import execute
from pacsbridge.worker.kinds import push, repack, retrieve
from pacsbridge.worker.outcome import JobCode, Outcome, worker_id

__all__ = ["run", "resolve_row"]

log = logging.getLogger(__name__)

#: How often a cohort looks at a child job that another worker runs.
CHILD_POLL_SECONDS = 0.5
#: A child running elsewhere whose heartbeat is older than this is taken over (as the sweeper would).
STALE_SECONDS = execute.HEARTBEAT_SECONDS * 4
#: Return keys a cohort asks at study level besides the query's (issuer: the pseudonym map's key).
STUDY_KEYS = ("IssuerOfPatientID", "SOPClassesInStudy", "ModalitiesInStudy", "PatientBirthDate", "PatientAge",
              "InstitutionName")


# -- the query stage -----------------------------------------------------------------------------
def _query(spec: Mapping[str, Any]) -> Query:
    """The study-level query of a row (or of a mass-transfer chunk)."""
    modalities = spec.get("Modality") or []

    def date(key: str) -> dt.date | None:
        value = spec.get(key)
        return dt.datetime.strptime(value, "%Y%m%d").date() if value else None

    include = STUDY_KEYS + (("BodyPartExamined",) if spec.get("BodyPartExamined") else ())
    return Query(level="study", PatientID=spec.get("PatientID") or "",
                 AccessionNumber=spec.get("AccessionNumber") or "",
                 StudyInstanceUID=(spec["StudyInstanceUID"],) if spec.get("StudyInstanceUID") else (),
                 SeriesInstanceUID=tuple(spec.get("SeriesInstanceUID") or ()),
                 StudyDescription=spec.get("StudyDescription") or "",
                 Modality=modalities[0] if len(modalities) == 1 else "",
                 min_study_date=date("min_date"), max_study_date=date("max_date"), include_fields=include)


def resolve_row(spec: Mapping[str, Any], searcher: Searcher, ctx: Context) -> dict[str, Any]:
    """What the node holds for one row: the fields of its row (state, reason, studies, counters).

    Raises :class:`DimseError` / :class:`SlotTimeout` when the node cannot be asked.
    """
    query = _query(spec)
    studies = [s for s in searcher.studies(query) if s.get("StudyInstanceUID") and keep_study(spec, s)]
    if not studies:
        return {"state": "not_found", "reason": f"no study on node {searcher.node.name!r} matches the row"}
    patients = sorted({(str(s.get("IssuerOfPatientID") or ""), str(s.get("PatientID") or "")) for s in studies})
    names_one_study = spec.get("AccessionNumber") or spec.get("StudyInstanceUID")
    if len(patients) > 1 and names_one_study and not spec.get("PatientID"):
        named = ", ".join(repr(p) for _, p in patients[:5])
        return {"state": "ambiguous", "reason": f"the row matches {len(patients)} patients ({named}); "
                                                "name the PatientID or the StudyInstanceUID too"}
    wanted = set(spec.get("SeriesInstanceUID") or ())
    out: list[dict[str, Any]] = []
    series_n = expected = held = 0
    for study in sorted(studies, key=lambda s: (str(s.get("StudyDate") or ""), str(s["StudyInstanceUID"]))):
        refs = [r for r in searcher.series(query, study) if keep_series(spec, r.body_part)]
        if wanted:
            refs = [r for r in refs if r.series_uid in wanted]
        if not refs:
            continue
        held_here = 0
        series: list[dict[str, Any]] = []
        for ref in refs:
            have = retrieve.indexed_count(ctx.index, ref.series_uid)
            complete = bool(ref.expected) and have >= (ref.expected or 0)
            sops: list[str] = []
            if complete:  # counts say so: check per SOP against the node's own list
                on_node = set(searcher.instances(ref))
                complete = on_node <= retrieve.indexed_sops(ctx.index, ref.series_uid)
                if not complete:  # as many here, not the same ones: the transfer must compare SOPs too
                    sops = sorted(on_node)
            held_here += (ref.expected or 0) if complete else 0
            series.append({"uid": ref.series_uid, "expected": ref.expected or 0, "modality": ref.modality,
                           "description": ref.description, "held": complete, **({"sops": sops} if sops else {})})
        n = sum(s["expected"] for s in series)
        out.append({"uid": str(study["StudyInstanceUID"]), "patient_id": str(study.get("PatientID") or ""),
                    "date": str(study.get("StudyDate") or ""), "sop_classes": list(refs[0].sop_classes),
                    "series": series, "instances": n, "held": held_here >= n})
        series_n += len(series)
        expected += n
        held += held_here
    if not out:
        return {"state": "not_found", "reason": "the studies found have none of the series the row names"}
    missing = wanted - {s["uid"] for st in out for s in st["series"]}
    issuer, patient = patients[0] if len(patients) == 1 else ("", str(spec.get("PatientID") or ""))
    reason = f"series not on the node: {', '.join(sorted(missing))}" if missing else ""
    return {"state": "held" if all(s["held"] for s in out) else "found", "reason": reason, "studies": out,
            "series": series_n, "expected": expected, "held": held, "patient_id": patient, "issuer": issuer}


def _check_pseudonyms(store: CohortStore, job: Job, projects: ProjectStore | None, ctx: Context) -> None:
    """Refuse rows whose pseudonym contradicts the project's map or an earlier row of the cohort."""
    project = job.params.get("project") or ""
    by_patient: dict[tuple[str, str], tuple[str, int]] = {}
    by_pseudonym: dict[str, tuple[tuple[str, str], int]] = {}
    session = projects.open(project, secret(ctx.settings)) if projects is not None and project else None
    for row in store.iter_rows(job.id, states=("found", "held")):
        pseudonym = row.spec.get("Pseudonym")
        if not pseudonym:
            continue
        if not project:
            store.update_row(job.id, row.number, state="refused",
                             reason="the row names a pseudonym but the cohort names no project")
            continue
        patient = (row.issuer, row.patient_id)
        why = ""
        if patient in by_patient and by_patient[patient][0] != pseudonym:
            why = f"row {by_patient[patient][1]} gives this patient the pseudonym {by_patient[patient][0]!r}"
        elif pseudonym in by_pseudonym and by_pseudonym[pseudonym][0] != patient:
            why = f"row {by_pseudonym[pseudonym][1]} gives the pseudonym {pseudonym!r} to another patient"
        elif session is not None:
            mine = session.identity.peek(*patient)
            other = session.identity.patient_by_pseudonym(pseudonym)
            if mine is not None and mine.pseudonym != pseudonym:
                why = (f"project {project!r} has given this patient another pseudonym already (ask an admin "
                       "for the map)")
            elif other is not None and (other.issuer, other.patient_id) != patient:
                why = f"project {project!r} has given the pseudonym {pseudonym!r} to another patient"
        if why:
            store.update_row(job.id, row.number, state="refused", reason=why)
            continue
        by_patient.setdefault(patient, (pseudonym, row.number))
        by_pseudonym.setdefault(pseudonym, (patient, row.number))


def _query_stage(job: Job, ctx: Context, jobs: JobStore, store: CohortStore, node: Node,
                 cancel: threading.Event, parallel: int, mass: bool = False) -> None:
    slots = NodeSlots(ctx.index.engine, node, f"{worker_id()}/{job.id[:8]}")
    searcher = searcher_for(node, ctx.settings.ae_title, slots, cancel=cancel, settings=ctx.settings)

    def one(row: CohortRow) -> None:
        if cancel.is_set():
            return
        if row.duplicate_of is not None:
            store.update_row(job.id, row.number, state="duplicate", reason=f"the same as row {row.duplicate_of}")
            return
        try:
            values = resolve_row(row.spec, searcher, ctx)
        except (DimseError, SlotTimeout) as exc:
            if cancel.is_set():
                return
            values = {"state": "failed", "reason": f"query failed: {exc}"}
        if mass and values["state"] == "not_found":  # an empty week is not a row to fix and send again
            values = {"state": "done", "reason": "no study of this chunk passes the filters"}
        store.update_row(job.id, row.number, **values)

    _each(store.iter_rows(job.id, states=("pending",)), one, parallel, f"cohort-q-{job.id[:8]}")


def _each(rows: Iterable[CohortRow], do: Callable[[CohortRow], None], parallel: int, name: str) -> None:
    """``do(row)`` for each row, ``parallel`` at once, never more than ``2 * parallel`` rows in memory."""
    if parallel == 1:
        for row in rows:
            do(row)
        return
    sem = threading.BoundedSemaphore(parallel * 2)
    errors: list[BaseException] = []

    def guarded(row: CohortRow) -> None:
        try:
            do(row)
        except BaseException as exc:  # re-raised below, once the others ended
            errors.append(exc)
        finally:
            sem.release()

    with ThreadPoolExecutor(parallel, thread_name_prefix=name) as pool:
        for row in rows:
            sem.acquire()
            if errors:
                sem.release()
                break
            pool.submit(guarded, row)
    if errors:
        raise errors[0]


# -- the transfer stage --------------------------------------------------------------------------
class _Children:
    """Child jobs running for a cohort: cancelled with it."""

    def __init__(self, jobs: JobStore, cancel: threading.Event) -> None:
        self.jobs, self.cancel = jobs, cancel
        self.active: set[str] = set()
        self.lock = threading.Lock()
        self.done = threading.Event()
        threading.Thread(target=self._watch, name="cohort-cancel", daemon=True).start()

    def _watch(self) -> None:
        while not self.done.is_set():
            if self.cancel.wait(0.5):
                with self.lock:
                    for child in list(self.active):
                        try:
                            self.jobs.cancel(child)
                        except PacsbridgeError:
                            pass
                return

    def run(self, child: Job, ctx: Context, code: JobCode) -> Job:
        """Run ``child`` here with ``code`` (or wait for the worker that runs it); its finished row."""
        with self.lock:
            self.active.add(child.id)
        try:
            while True:
                current = self.jobs.get(child.id, with_series=False)
                if current.state in FINISHED:
                    return current
                if self.cancel.is_set():
                    self.jobs.cancel(child.id)
                elif current.state == "queued" or (current.heartbeat_at or 0) < time.time() - STALE_SECONDS:
                    # queued, or its worker died (a crash of this cohort's previous worker): run it here
                    # (the claim is atomic: if the sweeper's message reached a worker first, that one runs it)
                    finished = execute.run_job(child.id, ctx, self.jobs, {child.kind: code})
                    if finished is not None:
                        return finished
                time.sleep(CHILD_POLL_SECONDS)  # (not cancel.wait: once cancelled it would not wait)
        finally:
            with self.lock:
                self.active.discard(child.id)


def _plan(row: CohortRow) -> list[SeriesRef]:
    """The series of a row's studies not held, as its query found them. A series with as many instances
    indexed as the node counts but not the same ones carries the node's SOP list (``sops``): the retrieve
    then compares SOP UIDs, not counts, and pulls the ones missing (by count it would skip the series)."""
    return [SeriesRef(study_uid=st["uid"], series_uid=s["uid"], patient_id=st.get("patient_id", ""),
                      modality=s.get("modality", ""), description=s.get("description", ""),
                      expected=len(s["sops"]) if s.get("sops") else s.get("expected", 0),
                      sop_classes=tuple(st.get("sop_classes") or ()),
                      sops=tuple(s["sops"]) if s.get("sops") else None)
            for st in row.studies if not st.get("held") for s in st["series"] if not s.get("held")]


def _missing_series(row: CohortRow) -> str:
    """Why a row cannot be whole: the series it names that the node did not have ("" when none)."""
    wanted = set(row.spec.get("SeriesInstanceUID") or ())
    missing = wanted - {s["uid"] for st in row.studies for s in st["series"]}
    return f"series not on the node: {', '.join(sorted(missing))}" if missing else ""


def _indexed_now(ctx: Context, ref: SeriesRef) -> bool:
    """Whether the index holds all of a planned series now (another row of the cohort pulled it)."""
    if ref.sops is not None:
        return set(ref.sops) <= retrieve.indexed_sops(ctx.index, ref.series_uid)
    return bool(ref.expected) and retrieve.indexed_count(ctx.index, ref.series_uid) >= (ref.expected or 0)


def _selection(row: CohortRow) -> dict[str, list[str]]:
    series = row.spec.get("SeriesInstanceUID") or []
    if series:
        return {"SeriesInstanceUID": sorted({s["uid"] for st in row.studies for s in st["series"]})}
    return {"StudyInstanceUID": [st["uid"] for st in row.studies]}


def _transfer_row(row: CohortRow, job: Job, ctx: Context, jobs: JobStore, store: CohortStore,
                  then: Mapping[str, Any], children: _Children, study_locks: "_Locks",
                  projects: ProjectStore | None) -> None:
    store.update_row(job.id, row.number, state="transferring", reason="")
    project = job.params.get("project") or ""
    kids = list(row.children)
    reasons: list[str] = [why] if (why := _missing_series(row)) else []  # what moves, moves; the row is short
    received = row.held
    with study_locks.hold([st["uid"] for st in row.studies]):
        plan = _plan(row)
        # a series another row of the cohort pulled while this one waited for the lock is held now (the
        # query saw it missing): counted as received, not asked for again in an empty child retrieve
        pulled = {r.series_uid for r in plan if _indexed_now(ctx, r)}
        if pulled:
            received += sum(r.expected or 0 for r in plan if r.series_uid in pulled)
            plan = [r for r in plan if r.series_uid not in pulled]
            store.update_row(job.id, row.number, received=received)
        if plan:
            # the series too: a worker that runs this child without the plan (the sweeper re-sent it
            # after a crash) asks for no more than the query kept (a study's other body parts, the
            # series already held)
            query = {"level": "study", "StudyInstanceUID": sorted({r.study_uid for r in plan}),
                     "SeriesInstanceUID": sorted({r.series_uid for r in plan})}
            child, _ = jobs.submit("retrieve", {"query": query}, node=job.node, owner=job.owner)
            jobs.mark_enqueued(child.id)  # run here; the sweeper re-sends it only if this worker dies
            if child.id not in kids:
                kids.append(child.id)
                store.update_row(job.id, row.number, children=kids)

            def with_plan(j: Job, c: Context, s: JobStore, ev: threading.Event) -> Outcome:
                return retrieve.run(j, c, s, ev, plan=plan)

            done = children.run(child, ctx, with_plan)
            done = jobs.get(done.id)
            totals = done.totals
            received += totals["indexed"]
            if done.state != "succeeded":
                reasons.append(f"retrieve {done.id}: {done.state} {done.error}".strip())
            store.update_row(job.id, row.number, received=received, failed=totals["failed"])
            if done.state in ("failed", "cancelled"):
                store.update_row(job.id, row.number, state=done.state if done.state == "cancelled" else "failed",
                                 reason="; ".join(reasons))
                return
    if then:
        if project and row.spec.get("Pseudonym") and projects is not None:
            why = _assign(projects.open(project, secret(ctx.settings)), project, row)
            if why:
                store.update_row(job.id, row.number, state="refused", reason=why)
                return
        params: dict[str, Any] = {"selection": _selection(row)}
        if project:
            params["project"] = project
        if "push" in then:
            child, _ = jobs.submit("push", params, node=then["push"], owner=job.owner)
        else:
            params.update({k: v for k, v in then["repack"].items() if v is not None})
            child, _ = jobs.submit("repack", params, owner=job.owner)
        jobs.mark_enqueued(child.id)
        if child.id not in kids:
            kids.append(child.id)
            store.update_row(job.id, row.number, children=kids)
        done = jobs.get(children.run(child, ctx, push.run if child.kind == "push" else repack.run).id)
        totals = done.totals
        store.update_row(job.id, row.number, sent=totals["pushed"], quarantined=totals["quarantined"],
                         failed=totals["failed"])
        if done.state != "succeeded":
            reasons.append(f"{child.kind} {done.id}: {done.state} {done.error}".strip())
        if done.state in ("failed", "cancelled"):
            store.update_row(job.id, row.number, state=done.state, reason="; ".join(reasons))
            return
    store.update_row(job.id, row.number, state="partial" if reasons else "done", reason="; ".join(reasons))


def _assign(session: ProjectSession, project: str, row: CohortRow) -> str:
    """Give the row's patient the row's pseudonym in the project's map; why not ("" when given).

    The reason never quotes the map (its message names the pseudonym the patient has, perhaps one the
    map made, and a report is no place for it)."""
    try:
        session.identity.assign(row.issuer, row.patient_id, row.spec["Pseudonym"])
    except Conflict:
        mine = session.identity.peek(row.issuer, row.patient_id)
        if mine is not None and mine.pseudonym != row.spec["Pseudonym"]:
            return f"project {project!r} has given this patient another pseudonym already (ask an admin for the map)"
        return f"project {project!r} has given the pseudonym {row.spec['Pseudonym']!r} to another patient"
    except InvalidRequest as exc:
        return str(exc)
    return ""


def _assign_all(store: CohortStore, job: Job, projects: ProjectStore, ctx: Context) -> None:
    """Give every row's pseudonym to its patient before anything moves: a row of the same patient without
    a pseudonym, pushed first, would otherwise have the map make one, and the row that names the
    patient's pseudonym would be refused (or not, as the rows' threads happen to run)."""
    project = str(job.params.get("project") or "")
    session = projects.open(project, secret(ctx.settings))
    for row in store.iter_rows(job.id, states=TRANSFERABLE):
        if row.spec.get("Pseudonym"):
            why = _assign(session, project, row)
            if why:
                store.update_row(job.id, row.number, state="refused", reason=why)


class _Locks:
    """One lock per study UID, so that two rows never pull the same study at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.locks: dict[str, threading.Lock] = {}

    def hold(self, uids: list[str]) -> "_Held":
        with self.lock:
            return _Held([self.locks.setdefault(u, threading.Lock()) for u in sorted(set(uids))])


class _Held:
    def __init__(self, locks: list[threading.Lock]) -> None:
        self.locks = locks

    def __enter__(self) -> None:
        for lock in self.locks:  # sorted: two rows never wait on each other
            lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        for lock in reversed(self.locks):
            lock.release()


# -- the job ---------------------------------------------------------------------------------------
def run(job: Job, ctx: Context, jobs: JobStore, cancel: threading.Event) -> Outcome:
    """Run a ``cohort`` job (see the module docstring)."""
    if not job.node:
        raise InvalidRequest("a cohort needs a node", "node")
    node = jobs.get_node(job.node)
    if not node.allow_find:
        raise InvalidRequest(f"node {node.name!r} does not allow C-FIND", "node")
    store = CohortStore(ctx.index.engine)
    cohort = store.get(job.id)
    projects = ProjectStore(ctx.index.engine) if job.params.get("project") else None
    started = time.monotonic()

    # a mass transfer asks the PACS one chunk at a time (each may be large); rows, up to the node's limit
    _query_stage(job, ctx, jobs, store, node, cancel, 1 if cohort.mass else max(1, node.max_associations),
                 mass=cohort.mass is not None)
    if cancel.is_set():
        return Outcome("cancelled", "cancelled by request", _result(store, job, "query", started))
    _check_pseudonyms(store, job, projects, ctx)

    cohort = store.get(job.id)  # read again: a dry run may have been started meanwhile
    if not cohort.transfer:
        counts = store.counts(job.id)
        result = _result(store, job, "queried", started)
        short = {s: n for s, n in counts.items() if s not in ("found", "held", "duplicate", "done")}
        if not short:
            return Outcome("succeeded", "", result)
        return Outcome("partial" if len(short) < len(counts) or counts.get("found") or counts.get("held")
                       else "failed", "query: " + _summary(short, sum(counts.values())), result)

    then = cohort.then
    if then and projects is not None:
        _assign_all(store, job, projects, ctx)
    children = _Children(jobs, cancel)
    locks = _Locks()
    try:
        def one(row: CohortRow) -> None:
            if cancel.is_set():
                return
            if not then and not _plan(row):
                short = _missing_series(row)
                store.update_row(job.id, row.number, state="partial" if short else "done", reason=short,
                                 received=row.held)
                return
            _transfer_row(row, job, ctx, jobs, store, then, children, locks, projects)

        _each(store.iter_rows(job.id, states=TRANSFERABLE), one, max(1, node.max_associations),
              f"cohort-t-{job.id[:8]}")
    finally:
        children.done.set()
    result = _result(store, job, "transferred", started)
    if cancel.is_set():
        store.reset(job.id, ("transferring",), to="found")
        return Outcome("cancelled", "cancelled by request", _result(store, job, "transfer", started))
    counts = store.counts(job.id)
    total = sum(counts.values())
    ok = sum(counts.get(s, 0) for s in SUCCEEDED)
    if ok == total:
        return Outcome("succeeded", "", result)
    short = {s: n for s, n in counts.items() if s not in SUCCEEDED}
    return Outcome("partial" if ok else "failed", _summary(short, total), result)


def _summary(short: Mapping[str, int], total: int) -> str:
    n = sum(short.values())
    parts = ", ".join(f"{c} {s.replace('_', ' ')}" for s, c in sorted(short.items(), key=lambda kv: -kv[1]))
    return f"{n} of {total} rows did not succeed ({parts}); GET the cohort's report for the reasons"


def _result(store: CohortStore, job: Job, stage: str, started: float) -> dict[str, Any]:
    counts = store.counts(job.id)
    return {"stage": stage, "rows": sum(counts.values()), "states": dict(Counter(counts)),
            **store.totals(job.id), "not_succeeded": sum(counts.get(s, 0) for s in NOT_SUCCEEDED),
            "seconds": round(time.monotonic() - started, 3)}
