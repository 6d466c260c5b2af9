"""Run one job row with the code its caller names: claim it, run it, record the outcome, hand on its webhook.

The code of each kind is a function ``run(job, ctx, jobs, cancel) -> Outcome``
in its own module, registered in :data:`pacsbridge.worker.kinds.RUNNERS` (:mod:`pacsbridge.worker.runner` runs
with those; a cohort runs its children with its own). It reports progress through ``jobs``
(:meth:`~pacsbridge.shared.jobs.store.JobStore.set_series` / ``update_series``),
checks ``cancel`` (a :class:`threading.Event` set when the job is cancelled or
another worker took it over) between steps, and raises
:class:`~pacsbridge.shared.core.errors.PacsbridgeError` for a failure the user must
see. A database outage (:class:`sqlalchemy.exc.DBAPIError`, a pool timeout)
propagates, leaving the job ``running``: the worker task retries it, or
another worker claims it once its heartbeat is stale. Any other exception (a
bug, an OS error) fails the job with its type and message, traceback logged:
re-running it would only fail again, for ever.

A worker ends only a job it still holds: one taken over by another worker
(its beats came late) is left to that worker. A finished job with a webhook is
handed to ``notify`` (the worker queues it for :mod:`pacsbridge.shared.jobs.webhooks`):
the job's slot never waits on the receiver.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from pacsbridge.shared.core.config import initial_settings
from pacsbridge.shared.index.context import Context
from pacsbridge.shared.core.errors import PacsbridgeError
from pacsbridge.shared.jobs.store import Job, JobStore
from pacsbridge.shared.jobs.spec import check_params
from pacsbridge.worker.outcome import JobCode, Outcome, worker_id

__all__ = ["run_job", "HEARTBEAT_SECONDS", "CANCEL_POLL_SECONDS", "Runners"]

log = logging.getLogger(__name__)

#: How often a running job says it is alive; a job silent for 4 beats may be taken over.
HEARTBEAT_SECONDS = initial_settings().heartbeat_seconds  # PACSBRIDGE_HEARTBEAT_SECONDS
#: How often a running job looks whether it was cancelled (one indexed read), between its beats:
#: a cancel takes effect within this, not within a heartbeat.
CANCEL_POLL_SECONDS = 0.5

Notify = Callable[[Job], None]
#: ``kind -> run`` (:data:`pacsbridge.worker.kinds.RUNNERS`, or a caller's own: a cohort's children).
Runners = Mapping[str, JobCode]


def run_job(job_id: str, ctx: Context, jobs: JobStore, runners: Runners, worker: str | None = None,
            notify: Notify | None = None) -> Job | None:
    """Claim and run one job. Returns the finished job, or None if it was not ours to run.

    ``runners[job.kind]`` runs it (a cohort runs its child retrieve with the series its query found,
    :mod:`pacsbridge.worker.kinds.cohort`). ``notify(job)`` is called once the outcome is recorded, for
    a job with a webhook.
    """
    worker = worker or worker_id()
    stale = HEARTBEAT_SECONDS * 4
    job = jobs.claim(job_id, worker, stale_after=stale)
    if job is None:
        log.info("job %s: not claimed (finished, cancelled or held by a live worker)", job_id)
        return None
    log.info("job %s (%s): started by %s, attempt %d", job.id, job.kind, worker, job.attempts)
    if job.cancel_requested:  # cancelled while its previous worker was dead: do not start again
        return _end(job_id, jobs, worker, Outcome("cancelled", "cancelled by request", job.result), notify)
    cancel = threading.Event()
    done = threading.Event()

    def beat() -> None:
        # beats every HEARTBEAT_SECONDS; in between, a cheap look at cancel_requested so that a
        # cancel reaches the job (and interrupts what it waits for) within CANCEL_POLL_SECONDS
        last = time.monotonic()
        while not done.wait(min(CANCEL_POLL_SECONDS, HEARTBEAT_SECONDS)):
            try:
                if time.monotonic() - last >= HEARTBEAT_SECONDS:
                    last = time.monotonic()
                    if not jobs.heartbeat(job_id, worker):
                        cancel.set()
                elif not cancel.is_set() and jobs.is_cancelled(job_id):
                    cancel.set()
            except Exception:  # database outage: keep working, beat again later
                log.warning("job %s: heartbeat failed", job_id, exc_info=True)

    beater = threading.Thread(target=beat, name=f"heartbeat-{job_id[:8]}", daemon=True)
    beater.start()
    try:
        try:
            check_params(job.kind, job.params)  # the models the API checked the request with
            outcome = runners[job.kind](job, ctx, jobs, cancel)
        except PacsbridgeError as exc:
            log.warning("job %s failed: %s", job_id, exc)
            outcome = Outcome("failed", str(exc))
        except (DBAPIError, SATimeoutError):
            raise  # the database: the task retries, or the sweeper re-sends once the beats stop
        except Exception as exc:
            log.exception("job %s (%s): unexpected error", job_id, job.kind)
            outcome = Outcome("failed", f"unexpected error: {type(exc).__name__}: {exc}"[:2000])
        if cancel.is_set() and jobs.is_cancelled(job_id):
            outcome = Outcome("cancelled", "cancelled by request", outcome.result)
    finally:
        done.set()
        beater.join()
    return _end(job_id, jobs, worker, outcome, notify)


def _end(job_id: str, jobs: JobStore, worker: str, outcome: Outcome, notify: Notify | None) -> Job | None:
    """Record the outcome if ``worker`` still holds the job, then hand on its webhook."""
    if not jobs.finish(job_id, outcome.state, outcome.error, outcome.result, worker=worker):
        log.warning("job %s: no longer held by %s (taken over by another worker); its outcome "
                    "%s is not recorded", job_id, worker, outcome.state)
        return None
    finished = jobs.get(job_id)
    log.info("job %s (%s): %s %s", job_id, finished.kind, outcome.state, outcome.error)
    if finished.webhook and notify is not None:
        try:
            notify(finished)
        except Exception:  # the broker: the job is done all the same; its webhook is lost (logged)
            log.exception("job %s: could not queue its webhook", job_id)
    return finished
