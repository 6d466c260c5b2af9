"""The ``retrieve`` job: find what a query matches on a node, pull it, wait until it is indexed.

Built the dicomtrolley way: the job talks to its source through two small
interfaces (:mod:`pacsbridge.shared.nodes.sources`), so that QIDO-RS / WADO-RS
sources slot in without touching jobs, progress or the API:

* a :class:`Searcher` (query model in; studies, series, instances out), here
  :class:`DimseSearcher` (C-FIND, Study Root) or, for a node searched over
  DICOMweb, :class:`~pacsbridge.shared.nodes.dicomweb.QidoSearcher` (QIDO-RS;
  :func:`~pacsbridge.shared.nodes.searchers.searcher_for` chooses);
* a :class:`Downloader` (series, or SOP UIDs of a series, in; instances into
  our storage out), here :class:`MoveDownloader` (C-MOVE to our own listener,
  which stores, and the workers index) and :class:`GetDownloader` (C-GET
  stored straight into storage through ``ctx.storage`` and indexed here).

DICOMweb nodes slot in the same way: mode ``wado-rs`` / ``wado-uri`` picks a
:class:`~pacsbridge.shared.nodes.wado.WadoRsDownloader` / :class:`~pacsbridge.shared.nodes.wado.WadoUriDownloader`
(stored and indexed as C-GET does); the series are still found by the node's searcher, and what a
downloader has to say beyond its counts (a WADO-RS 406 fallback, parts refused) is in the result's ``notes``.

What the job does (params: ``{"query": Query.to_dict(), "mode"?: "move"|"get"|"wado-rs"|"wado-uri"}``):

1. C-FIND at study level, then series level (``NumberOfSeriesRelatedInstances``;
   an IMAGE-level C-FIND where the PACS gives no count). A study answer the
   PACS cut short (its cancel/warning status, or :data:`FIND_LIMIT` reached) is
   asked again over each half of the date range, recursively (pacsanini's
   approach), instead of silently losing studies.
2. One row per series (expected, received, indexed). Series already complete
   in the index are skipped: re-running the job (a retry, or another worker
   after a crash) never pulls twice what is indexed.
3. Up to ``node.max_associations`` series at once (one thread and one
   association each): the whole series, or at IMAGE level only the SOP UIDs
   still missing. Each association holds a :class:`~.throttle.NodeSlots`
   lease; the :class:`~.throttle.RateLimiter` is charged per instance (C-GET:
   as each arrives; C-MOVE: the series' expected count before moving it).
   Outside the node's move window the job *waits* (beating, checking
   ``cancel``) rather than re-queueing itself: its row says why it waits.
4. C-MOVE: wait until the listener and workers have indexed the series
   (poll the index; give up after :data:`WAIT_SECONDS` without progress).
   Missing instances are pulled again at IMAGE level by SOP UID, at most
   :data:`REPULLS` times.
5. End state: ``succeeded`` (everything expected is indexed), ``partial``
   (series rows say which series miss how many and why; the job error sums
   it up) or ``failed`` (nothing matched, or nothing could be pulled).
   C-MOVE/C-GET sub-operation counts are kept in the job result.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from sqlalchemy import func, select

from pacsbridge.shared.core.config import initial_settings
from pacsbridge.shared.index.context import Context
from pacsbridge.shared.core.errors import DimseError, InvalidRequest, WebError
from pacsbridge.shared.index.conquest import Index
from pacsbridge.shared.index.disk import DiskLow
from pacsbridge.shared.jobs.store import Job, JobStore, SeriesProgress
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.dicom.query import Query
from pacsbridge.worker.outcome import Outcome, worker_id
from pacsbridge.shared.nodes.throttle import NodeSlots, RateLimiter, SlotTimeout, in_window, seconds_until_window
from pacsbridge.shared.nodes.searchers import searcher_for
from pacsbridge.shared.nodes.sources import Downloader, GetDownloader, MoveDownloader, Searcher, SeriesRef
from pacsbridge.shared.nodes.wado import WadoRsDownloader, WadoUriDownloader, web_client_for, web_urls
from pacsbridge.shared.nodes.webhttp import WebClient

__all__ = ["run", "WAIT_SECONDS", "REPULLS", "MODES", "WEB_MODES"]

log = logging.getLogger(__name__)

#: C-MOVE: give up waiting for the index after this many seconds without a new indexed instance.
WAIT_SECONDS = initial_settings().retrieve_wait_seconds  # PACSBRIDGE_RETRIEVE_WAIT_SECONDS
#: How many times missing instances of a series are pulled again at IMAGE level.
REPULLS = initial_settings().retrieve_repulls  # PACSBRIDGE_RETRIEVE_REPULLS
#: Retrieve modes: DIMSE (C-MOVE to our listener, C-GET) and DICOMweb (WADO-RS, WADO-URI).
MODES = ("move", "get", "wado-rs", "wado-uri")
WEB_MODES = ("wado-rs", "wado-uri")
#: How often a C-MOVE job looks at the index while the workers index what the listener stored.
POLL_SECONDS = 0.2


# -- the job ---------------------------------------------------------------------
def default_mode(node: Node) -> str:
    """How a retrieve that names no mode pulls: a DICOMweb node's first ``prefer`` entry it can do
    (``c-get`` / ``c-move`` as ``get`` / ``move``); a DIMSE-only node's ``retrieve``, as before ``prefer``."""
    if node.has_web:
        for op in node.preferences():
            return {"c-get": "get", "c-move": "move"}.get(op, op)
        if not node.has_dimse:  # a DICOMweb-only node whose prefer names no web operation
            return "wado-rs"
    return node.retrieve



def indexed_sops(index: Index, series_uid: str) -> set[str]:
    """SOP Instance UIDs of a series that the index holds."""
    img = index.tables["Image"]
    key = index.schema["Image"].key.column
    link = index.schema["Image"].parent.column  # type: ignore[union-attr]
    with index.engine.connect() as conn:
        return {r[0] for r in conn.execute(select(img.c[key]).where(img.c[link] == series_uid))}


def _wanted(ref: SeriesRef, have: set[str]) -> int:
    """How many of the expected instances the index holds."""
    if ref.sops is not None:
        return len(have & set(ref.sops))
    return len(have)


def _wait_window(node: Node, jobs: JobStore, job: Job, cancel: threading.Event) -> bool:
    """Wait until the node's move window opens; False if cancelled meanwhile."""
    while not in_window(node):
        delay = seconds_until_window(node)
        log.info("job %s: node %s allows moves %s only; waiting %.0f s", job.id, node.name,
                 node.move_window, delay)
        if cancel.wait(min(delay, 30.0)):
            return False
    return not cancel.is_set()


def run(job: Job, ctx: Context, jobs: JobStore, cancel: threading.Event,
        plan: Sequence[SeriesRef] | None = None) -> Outcome:
    """Run a ``retrieve`` job (see the module docstring).

    ``plan``: the series the query matches, when the caller knows them already (a cohort's query stage
    asked the node; it is not asked again). Without it the job asks the node.
    """
    started = time.monotonic()
    if not job.node:
        raise InvalidRequest("a retrieve job needs a node", "node")
    ctx.storage.guard.require()  # below the watermark (PACSBRIDGE_DISK_MIN_FREE): fail now, saying why
    node = jobs.get_node(job.node)
    mode = job.params.get("mode") or default_mode(node)
    if not node.allow_find:
        raise InvalidRequest(f"node {node.name!r} does not allow C-FIND", "node")
    if mode not in MODES:
        raise InvalidRequest(f"mode {mode!r}: use one of {', '.join(MODES)}", "mode")
    if mode == "move" and not node.allow_move:
        raise InvalidRequest(f"node {node.name!r} does not allow C-MOVE; try mode 'get'", "mode")
    if mode == "get" and not node.allow_get:
        raise InvalidRequest(f"node {node.name!r} does not allow C-GET; try mode 'move'", "mode")
    calling_ae = ctx.settings.ae_title
    engine = ctx.index.engine
    slots = NodeSlots(engine, node, f"{worker_id()}/{job.id[:8]}")
    rate = RateLimiter(engine, node)
    # C-FIND, or QIDO-RS for a DICOMweb node
    searcher = searcher_for(node, calling_ae, slots, cancel=cancel, settings=ctx.settings)
    downloader: Downloader
    client: WebClient | None = None
    if mode in WEB_MODES:
        try:
            client = web_client_for(node, ctx.settings, cancel)
        except WebError as exc:
            raise InvalidRequest(f"mode {mode!r}: {exc}", "mode") from None
        urls = web_urls(node)
        if mode == "wado-rs":
            downloader = WadoRsDownloader(client, ctx, node, slots, rate, base=urls.wado)
        else:
            downloader = WadoUriDownloader(client, ctx, node, searcher.instances, slots, rate, url=urls.wado_uri)
    elif mode == "get":
        downloader = GetDownloader(node, calling_ae, ctx, slots, rate)
    else:
        downloader = MoveDownloader(node, calling_ae, node.move_destination or calling_ae, slots, rate)
    try:
        return _run(job, ctx, jobs, cancel, plan, node, mode, searcher, downloader, started)
    finally:
        if client is not None:
            client.close()


def _run(job: Job, ctx: Context, jobs: JobStore, cancel: threading.Event, plan: Sequence[SeriesRef] | None,
         node: Node, mode: str, searcher: Searcher, downloader: Downloader, started: float) -> Outcome:
    query = Query.from_dict(job.params.get("query", {}))

    plan = list(plan) if plan is not None else searcher.plan(query)
    result: dict[str, Any] = {"mode": mode, "series": len(plan), "splits": searcher.splits,
                              "suboperations": {"completed": 0, "failed": 0, "warning": 0},
                              "repulls": 0, "skipped_complete": 0, "notes": []}
    if not plan:
        return Outcome("failed", f"nothing on node {node.name!r} matches the query", result)
    previous = {s.series_uid: s for s in jobs.series(job.id)}
    rows = []
    for ref in plan:
        have = _wanted(ref, indexed_sops(ctx.index, ref.series_uid))
        done = have >= (ref.expected or 0)
        rows.append(SeriesProgress(series_uid=ref.series_uid, study_uid=ref.study_uid, patient_id=ref.patient_id[:64],
                                   modality=ref.modality[:16], description=ref.description,
                                   expected=ref.expected or 0, received=have, indexed=have,
                                   failed=0, state="done" if done else "queued",
                                   error="" if done else (previous[ref.series_uid].error
                                                          if ref.series_uid in previous else "")))
    jobs.set_series(job.id, rows)
    result["expected"] = sum(r.expected for r in rows)

    todo = [(ref, row) for ref, row in zip(plan, rows) if row.state != "done"]
    result["skipped_complete"] = len(plan) - len(todo)
    lock = threading.Lock()

    # Several series at once, each in its own association (within the node's slots): the
    # PACS, our listener's receivers and the indexing workers then work side by side
    # instead of waiting for one another series after series. (A series is not split in
    # parts over spare slots: listing it costs an IMAGE-level C-FIND, ~2 s per 1,000
    # instances from Orthanc, and on 2 cores 4 associations were slower than 2.)
    parallel = max(1, min(node.max_associations, len(todo)))

    def pull(ref: SeriesRef, row: SeriesProgress) -> None:
        if cancel.is_set():
            return
        # the window is the PACS's: every way of pulling from it waits for it (C-MOVE, C-GET, WADO)
        if not _wait_window(node, jobs, job, cancel):
            return
        try:  # checked again before every series: the disk fills while the job runs
            ctx.storage.guard.require()
        except DiskLow as exc:
            jobs.update_series(job.id, ref.series_uid, state="partial", error=f"not pulled: {exc}"[:2000])
            with lock:
                result["disk_low"] = str(exc)
            return
        _pull_series(ref, row, ctx, jobs, job, searcher, downloader, cancel, result, lock)

    if parallel == 1:
        for ref, row in todo:
            pull(ref, row)
    else:
        with ThreadPoolExecutor(parallel, thread_name_prefix=f"retrieve-{job.id[:8]}") as pool:
            futures = [pool.submit(pull, ref, row) for ref, row in todo]
            errors = [f.exception() for f in futures]  # waits for every series
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    rows = jobs.series(job.id)
    missing = [r for r in rows if r.indexed < r.expected]
    result["indexed"] = sum(r.indexed for r in rows)
    result["missing"] = sum(r.expected - r.indexed for r in missing)
    result["seconds"] = round(time.monotonic() - started, 3)
    if cancel.is_set():
        return Outcome("cancelled", "cancelled by request", result)
    if not missing:
        return Outcome("succeeded", "", result)
    if result.get("disk_low"):
        state = "partial" if result["indexed"] else "failed"
        return Outcome(state, f"stopped with {len(missing)} of {len(rows)} series incomplete: {result['disk_low']}",
                       result)
    summary = "; ".join(f"series {r.series_uid}: {r.expected - r.indexed} of {r.expected} missing"
                        f" ({r.error or 'not received'})" for r in missing[:5])
    more = f"; and {len(missing) - 5} more series" if len(missing) > 5 else ""
    state = "partial" if result["indexed"] else "failed"
    return Outcome(state, f"{len(missing)} of {len(rows)} series incomplete: {summary}{more}", result)


def _pull_series(ref: SeriesRef, row: SeriesProgress, ctx: Context, jobs: JobStore, job: Job,
                 searcher: Searcher, downloader: Downloader, cancel: threading.Event,
                 result: dict[str, Any], lock: threading.Lock | None = None) -> None:
    """Pull one series until it is indexed, re-pulling missing instances a bounded number of times.

    Runs in parallel with other series of the job: ``result`` is only changed under ``lock``.
    """
    lock = lock or threading.Lock()
    expected = ref.expected or 0
    have = indexed_sops(ctx.index, ref.series_uid)
    jobs.update_series(job.id, ref.series_uid, state="running", error="")
    error = ""
    received = _wanted(ref, have)
    for attempt in range(REPULLS + 1):
        if cancel.is_set():
            break
        sops: Sequence[str] | None = ref.sops
        if attempt > 0 or have:
            try:
                on_source = ref.sops if ref.sops is not None else searcher.instances(ref)
            except (DimseError, SlotTimeout) as exc:
                error = str(exc)
                break
            sops = [s for s in on_source if s not in have]
            if not sops:
                break
            if attempt > 0:
                with lock:
                    result["repulls"] += 1
        before = _wanted(ref, have)
        transfer = downloader.fetch(ref, sops, cancel)
        with lock:
            for k in ("completed", "failed", "warning"):
                result["suboperations"][k] += getattr(transfer, k)
            for note in transfer.notes:  # a WADO-RS fallback, parts refused: said once each
                if note not in result["notes"] and len(result["notes"]) < 20:
                    result["notes"].append(note)
        received = max(received, min(expected, before + transfer.completed + transfer.warning))
        if downloader.indexes_itself:
            have = indexed_sops(ctx.index, ref.series_uid)
        else:
            have = _wait_indexed(ctx.index, ref, expected, jobs, job, cancel, received)
        error = transfer.error
        jobs.update_series(job.id, ref.series_uid, received=max(received, _wanted(ref, have)),
                           indexed=_wanted(ref, have), failed=transfer.failed)
        if _wanted(ref, have) >= expected:
            error = ""
            break
        if transfer.error and not transfer.completed and attempt == 0 and "cancelled" in transfer.error:
            break
    indexed = _wanted(ref, have)
    if indexed >= expected:
        jobs.update_series(job.id, ref.series_uid, state="done", error="", indexed=indexed,
                           received=max(received, indexed))
    elif cancel.is_set():
        jobs.update_series(job.id, ref.series_uid, state="cancelled", error="cancelled by request")
    else:
        why = error or "the source answered success but did not send them"
        jobs.update_series(job.id, ref.series_uid, state="partial",
                           error=f"{expected - indexed} of {expected} instances missing after "
                                 f"{REPULLS} re-pull(s): {why}"[:2000])


def indexed_count(index: Index, series_uid: str) -> int:
    """How many instances of a series the index holds (one COUNT, not the SOP list)."""
    img = index.tables["Image"]
    link = index.schema["Image"].parent.column  # type: ignore[union-attr]
    with index.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(img).where(img.c[link] == series_uid))
                   .scalar_one())


def _wait_indexed(index: Index, ref: SeriesRef, expected: int, jobs: JobStore, job: Job,
                  cancel: threading.Event, received: int) -> set[str]:
    """Poll the index until the series is complete, or nothing new arrives for WAIT_SECONDS.

    Polls with a COUNT (a whole series' SOP list every poll costs the database more than
    the answer is worth); the SOP list is read once at the end. A job pulling only some
    instances (``ref.sops``) compares SOP lists, since other instances may be indexed too.
    """
    def wanted() -> int:
        if ref.sops is not None:
            return _wanted(ref, indexed_sops(index, ref.series_uid))
        return indexed_count(index, ref.series_uid)

    n = wanted()
    last, last_change = n, time.monotonic()
    while n < expected and not cancel.is_set():
        if time.monotonic() - last_change > WAIT_SECONDS:
            break
        # what the PACS said it delivered is durably in our storage; give the workers time
        if n >= received and time.monotonic() - last_change > min(WAIT_SECONDS, 5.0):
            break
        cancel.wait(POLL_SECONDS)
        n = wanted()
        if n != last:
            last, last_change = n, time.monotonic()
            jobs.update_series(job.id, ref.series_uid, indexed=n, received=max(received, n))
    return indexed_sops(index, ref.series_uid)
