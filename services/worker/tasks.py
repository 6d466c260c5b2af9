"""Worker tasks. Logic lives in :mod:`pacsbridge.shared`; these only wire it up."""

from __future__ import annotations

import json
from functools import lru_cache

from celery import Task, shared_task
from celery.utils.log import get_task_logger
from sqlalchemy.exc import OperationalError, DBAPIError

from pacsbridge.shared.core.config import load_settings
from pacsbridge.shared.index.context import Context, open_context
from pacsbridge.worker import runner
from pacsbridge.shared.jobs import webhooks
from pacsbridge.shared.core.celeryapp import RUN_JOB_TASK, WEBHOOK_QUEUE, WEBHOOK_TASK
from pacsbridge.shared.index.importer import Importer
from pacsbridge.shared.jobs.store import Job, JobStore

log = get_task_logger(__name__)


@lru_cache(maxsize=1)
def _context() -> Context:
    ctx = open_context(load_settings())
    ctx.index.create()
    return ctx


@shared_task(name="pacsbridge.worker.tasks.index_files", autoretry_for=(OperationalError, DBAPIError),
             retry_backoff=True, retry_backoff_max=600, retry_jitter=True, max_retries=None)
def index_files(relpaths: list[str], arrivals: list[list] | None = None) -> dict[str, int]:
    """Index stored files (paths relative to the storage root). Idempotent.

    ``arrivals`` (optional, one per path): ``[calling_ae, association_id, arrived_at]``.
    A database outage raises and the task is retried with backoff, without
    limit: the files are in storage, so waiting loses nothing.
    """
    ctx = _context()
    report = Importer(ctx.index, ctx.storage, workers=1).reindex_files(relpaths, arrivals)
    for path, reason in report.rejected:
        log.warning("not indexed: %s: %s", path, reason)
    return {"indexed": report.indexed, "rejected": len(report.rejected)}


@lru_cache(maxsize=1)
def _jobs() -> JobStore:
    return JobStore(_context().index.engine)


@shared_task(name=RUN_JOB_TASK, autoretry_for=(OperationalError, DBAPIError), retry_backoff=True,
             retry_backoff_max=600, retry_jitter=True, max_retries=None)
def run_job(job_id: str) -> str | None:
    """Run one job row (retrieve, push, repack, import); see :mod:`pacsbridge.worker.runner`.

    A database outage raises and the task is retried with backoff; the job
    stays ``running`` under this worker's id, which may claim it again.
    """
    job = runner.run_job(job_id, _context(), _jobs(), notify=_queue_webhook)
    return job.state if job else None


def _queue_webhook(job: Job) -> None:
    """Hand the finished job's webhook to the webhook queue (the job's slot never waits on it)."""
    _jobs().set_webhook_status(job.id, "queued")  # first: the sender may write its outcome at once
    try:
        send_webhook.apply_async([job.id], queue=WEBHOOK_QUEUE, retry=True,
                                 retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
    except Exception as exc:  # kombu and redis raise many types
        _jobs().set_webhook_status(job.id, f"not sent: the broker was unreachable ({exc})")
        raise


@shared_task(name=WEBHOOK_TASK, bind=True, autoretry_for=(OperationalError, DBAPIError), retry_backoff=True,
             retry_backoff_max=600, retry_jitter=True, max_retries=None)
def send_webhook(self: Task, job_id: str) -> str:
    """POST the finished job to its webhook (see :mod:`pacsbridge.shared.jobs.webhooks`).

    Runs on its own queue: a slow receiver holds one webhook thread, never a job slot. A
    timeout, refused connection or 5xx is retried with exponential backoff
    (``PACSBRIDGE_WEBHOOK_RETRIES``); a destination not allowed, a redirect or a 4xx is not.
    """
    settings = _context().settings
    job = _jobs().get(job_id)
    body = json.dumps(job.to_webhook(), separators=(",", ":")).encode()
    try:
        status = webhooks.deliver(job.webhook, body, _webhook_policy(), settings.webhook_secret.encode(),
                                  timeout=settings.webhook_timeout, delivery=job.id)
    except webhooks.WebhookRefused as exc:
        log.warning("job %s: webhook not sent: %s", job_id, exc)
        _jobs().set_webhook_status(job_id, f"refused: {exc.reason}")
        return "refused"
    except webhooks.WebhookFailed as exc:
        if self.request.retries >= settings.webhook_retries:
            log.error("job %s: webhook given up after %d retries: %s", job_id, self.request.retries, exc)
            _jobs().set_webhook_status(job_id, f"failed after {self.request.retries} retries: {exc}")
            return "failed"
        delay = webhooks.backoff(self.request.retries)
        log.warning("job %s: webhook failed (%s); retry %d in %g s", job_id, exc, self.request.retries + 1, delay)
        _jobs().set_webhook_status(job_id, f"retry {self.request.retries + 1} of {settings.webhook_retries} "
                                           f"in {delay:g} s: {exc}")
        raise self.retry(countdown=delay, max_retries=settings.webhook_retries) from None
    log.info("job %s: webhook answered %s", job_id, status)
    _jobs().set_webhook_status(job_id, f"sent: answered {status}")
    return "sent"


@lru_cache(maxsize=1)
def _webhook_policy() -> webhooks.Policy:
    return webhooks.Policy.parse(_context().settings.webhook_allow)
