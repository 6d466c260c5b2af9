"""``pacsbridge worker``: a Celery worker with pacsbridge's tasks, and the job sweeper."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import threading
from typing import Any, Iterator

from pacsbridge.shared.core.config import Settings

log = logging.getLogger(__name__)

# The sweeper's period (PACSBRIDGE_SWEEP_SECONDS) and the age after which a queued job is re-sent
# (PACSBRIDGE_JOB_RESEND_SECONDS; duplicates are harmless: claims are atomic) come from the settings.


def sweep_once(settings: Settings, app: object) -> list[str]:
    """Send ``run_job`` for queued jobs never (or long ago) enqueued and for running jobs of dead workers."""
    from pacsbridge.shared.core.celeryapp import RUN_JOB_TASK
    from pacsbridge.shared.core.db import make_engine
    from pacsbridge.shared.jobs.store import JobStore
    from pacsbridge.worker.runner import HEARTBEAT_SECONDS

    jobs = JobStore(_engine(settings.database_url, make_engine))
    jobs.create()
    sent = []
    for job_id in jobs.due_for_enqueue(settings.job_resend_seconds, HEARTBEAT_SECONDS * 4):
        try:
            app.send_task(RUN_JOB_TASK, [job_id])  # type: ignore[attr-defined]
            sent.append(job_id)
        except Exception as exc:  # broker down: the next sweep tries again
            log.warning("job %s: could not enqueue (%s); will retry", job_id, exc)
            jobs.forget_enqueued(job_id)
    if sent:
        log.info("sweeper: enqueued %d job(s) whose message may have been lost", len(sent))
    if settings.retention_days > 0:
        retention_once(settings, app, jobs)
    return sent


def retention_once(settings: Settings, app: object, jobs: Any) -> Any:
    """One pass of the retention policy (shared/jobs/retention.py): a ``delete`` job for the series
    delivered more than ``PACSBRIDGE_RETENTION_DAYS`` ago. Returns what it found."""
    from pacsbridge.shared.core.celeryapp import RUN_JOB_TASK
    from pacsbridge.shared.index.context import open_context
    from pacsbridge.shared.jobs import retention

    ctx = open_context(settings)
    try:
        def submit(params: dict[str, Any]) -> str:
            job, created = jobs.submit("delete", params, owner=retention.OWNER)
            if created:
                try:
                    app.send_task(RUN_JOB_TASK, [job.id])  # type: ignore[attr-defined]
                except Exception as exc:  # broker down: the row is queued, the next sweep sends it
                    log.warning("retention: job %s not enqueued yet (%s)", job.id, exc)
            return str(job.id)

        found = retention.run_pass(jobs.engine, ctx.index, settings.retention_days, submit)
        if found.series:
            log.info("retention: %d series delivered more than %g days ago go (from %d jobs)", len(found.series),
                     settings.retention_days, found.jobs)
        return found
    finally:
        ctx.index.engine.dispose()


_engines: dict[str, object] = {}


def _engine(url: str, make: Any) -> Any:
    if url not in _engines:
        _engines[url] = make(url)  # type: ignore[operator]
    return _engines[url]


# The jobs worker's main process runs the sweeper and the stable checker in threads, and Celery's
# prefork pool forks its children from that same process (at start, and again whenever it
# replaces a child). A fork copies every lock as it is at that instant, held by a thread that does
# not exist in the child: an import under way in a thread (Python's per-module import lock: the
# child's first ``import alembic`` waits forever), a SQLite transaction (SQLite's per-process
# lock bookkeeping says the lock is held in the child's own process: its ``BEGIN IMMEDIATE``
# never gets it, while /proc/locks shows no holder), a pooled connection (a psycopg2 socket or a
# SQLite file then shared by two processes). So a fork waits for the pass in progress, and a pass
# leaves no connection open: the children start with no lock and no connection of the parent.
_passes = threading.Lock()
_fork_guard_registered = False


def guard_forks() -> None:
    """Make every later ``os.fork()`` of this process wait for the sweeper's or stable checker's pass.

    Once per process (``os.register_at_fork`` cannot be undone). Billiard, Celery's prefork pool,
    forks with ``os.fork()``, which runs these hooks.
    """
    global _fork_guard_registered
    if not _fork_guard_registered:
        os.register_at_fork(before=_passes.acquire, after_in_parent=_passes.release,
                            after_in_child=_passes.release)
        _fork_guard_registered = True


@contextlib.contextmanager
def one_pass(*engines: Any) -> Iterator[None]:
    """A pass of a background thread: no fork while it runs, and its connections closed after it.

    ``engines`` are disposed at the end (pooled connections closed); an engine the pass made is
    registered in ``_engines`` and disposed too.
    """
    with _passes:
        try:
            yield
        finally:
            for engine in (*engines, *_engines.values()):
                engine.dispose()  # type: ignore[attr-defined]


def _sweeper(settings: Settings, app: object, stop: threading.Event) -> None:
    while not stop.wait(settings.sweep_seconds):
        try:
            with one_pass():
                sweep_once(settings, app)
        except Exception:  # database outage: sweep again later
            log.warning("sweeper: sweep failed", exc_info=True)


def _stable_checker(settings: Settings, stop: threading.Event) -> None:
    """Mark series/studies stable (no new arrival for PACSBRIDGE_STABLE_SECONDS); see services/worker/stable.py."""
    with _passes:  # imports: none may be under way when the pool forks
        from pacsbridge.shared.index.context import open_context
        from pacsbridge.worker.stable import check

        ctx = open_context(settings)
    while not stop.wait(max(1.0, settings.stable_seconds / 4)):
        try:
            with one_pass(ctx.index.engine):
                for level, uid in check(ctx.index, settings.stable_seconds):
                    log.info("stable %s %s", level, uid)
        except Exception:  # database outage: check again later
            log.warning("stable check failed", exc_info=True)


def _check_deid_secret(settings: Settings) -> None:
    """Refuse a ``PACSBRIDGE_DEID_SECRET`` that is not the one the projects were made with
    (:class:`~pacsbridge.shared.core.errors.DeidSecretError`): it would make new pseudonyms for patients
    already sent. Without a secret the worker runs, and a job under a project fails with the reason."""
    if not settings.deid_secret:
        return
    from pacsbridge.shared.core.db import make_engine
    from pacsbridge.shared.deid.keys import secret
    from pacsbridge.shared.deid.projects import ProjectStore
    from pacsbridge.shared.jobs.store import JobStore

    engine = _engine(settings.database_url, make_engine)
    JobStore(engine).create()
    ProjectStore(engine).check_all(secret(settings))


def main(settings: Settings, args: argparse.Namespace | None = None) -> int:
    """Run the workers until stopped: indexing, jobs and webhooks, each with processes of its own.

    ``--queues all`` (the default) starts one Celery worker per queue as child
    processes (same process group: a kill of this process group stops them all)
    and stops all if one ends; ``--queues index`` / ``jobs`` / ``webhooks`` runs
    one of them in this process (a deployment that splits them needs each).
    """
    queues = getattr(args, "queues", None) or settings.worker_queues
    # the children (``--queues all``'s workers, Celery's pool processes) read their settings from the
    # environment: pass on every setting this one has (the command line's --dicom-sql, --database ...)
    os.environ.update(settings.environ())
    if queues == "all":
        return _supervise(args)
    from pacsbridge.shared.core.celeryapp import INDEX_QUEUE, JOBS_QUEUE, WEBHOOK_QUEUE, declare_queues, make_celery

    app = make_celery(settings)
    declare_queues(app)  # the embedded broker: before this worker consumes or its tasks send
    stop = threading.Event()
    if queues == "jobs":
        _check_deid_secret(settings)  # a mistyped secret stops the jobs worker here, before any job runs
        guard_forks()  # before the threads: the pool forks while they run (see one_pass)
        threading.Thread(target=_sweeper, args=(settings, app, stop), name="job-sweeper", daemon=True).start()
        threading.Thread(target=_stable_checker, args=(settings, stop), name="stable-checker", daemon=True).start()
        concurrency = getattr(args, "job_concurrency", None) or settings.job_concurrency
        queue, node = JOBS_QUEUE, "jobs@%h"
    elif queues == "webhooks":
        # threads: each webhook waits on the network (at most PACSBRIDGE_WEBHOOK_TIMEOUT); retries
        # wait in the broker's schedule, not in a thread
        argv = ["worker", "--loglevel=INFO", "--pool=threads", f"--concurrency={settings.webhook_threads}",
                "-Q", WEBHOOK_QUEUE,
                "-n", "webhooks@%h", "--without-gossip", "--without-mingle"]
        app.worker_main(argv)
        return 0
    else:
        concurrency = getattr(args, "concurrency", None) or settings.worker_concurrency or os.cpu_count() or 1
        queue, node = INDEX_QUEUE, "index@%h"
    argv = ["worker", "--loglevel=INFO", f"--concurrency={concurrency}", "-Q", queue, "-n", node,
            "--without-gossip", "--without-mingle"]
    try:
        app.worker_main(argv)
    finally:
        stop.set()
    return 0


def _supervise(args: Any) -> int:
    """Run ``worker --queues index``, ``jobs`` and ``webhooks`` as children; stop them together.

    The children stay in this process group, so a signal to the group (compose, a test's
    kill of the group) reaches them directly too.
    """
    import sys

    from pacsbridge.shared.core.supervise import Supervisor

    base = [sys.executable, "-m", "pacsbridge.cli", "worker"]
    extra: dict[str, list[str]] = {"index": [], "jobs": []}
    if getattr(args, "concurrency", None):
        extra["index"] += ["--concurrency", str(args.concurrency)]
    if getattr(args, "job_concurrency", None):
        extra["jobs"] += ["--job-concurrency", str(args.job_concurrency)]
    sup = Supervisor()
    try:
        for queue in ("index", "jobs", "webhooks"):
            sup.start(queue, base + ["--queues", queue] + extra.get(queue, []))
        ended = sup.watch()
        if ended is not None:
            log.error("worker for %s exited with %s; stopping the others", ended, sup.children[ended].returncode)
            return 3
        return 0
    finally:
        sup.stop_all(grace=60.0)
