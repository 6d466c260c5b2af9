"""Worker tasks. Logic lives in :mod:`pacsbridge.shared`; these only wire it up."""

from __future__ import annotations

from functools import lru_cache

from celery import shared_task
from celery.utils.log import get_task_logger
from sqlalchemy.exc import OperationalError, DBAPIError

from pacsbridge.shared.config import load_settings
from pacsbridge.shared.context import Context, open_context
from pacsbridge.shared import runner
from pacsbridge.shared.celeryapp import RUN_JOB_TASK
from pacsbridge.shared.importer import Importer
from pacsbridge.shared.jobs import JobStore

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
    """Run one job row (retrieve, push, repack, import); see :mod:`pacsbridge.shared.runner`.

    A database outage raises and the task is retried with backoff; the job
    stays ``running`` under this worker's id, which may claim it again.
    """
    job = runner.run_job(job_id, _context(), _jobs())
    return job.state if job else None
