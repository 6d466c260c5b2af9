"""The Celery application shared by the listener and the API (producers) and the workers.

Tasks carry only paths and ids. They are acknowledged late and the worker
prefetches one at a time, so a worker killed mid-task leaves its message to
be redelivered (Redis: after ``visibility_timeout``), and tasks are
idempotent (upserts keyed on SOPInstanceUID), so a redelivery is harmless.
"""

from __future__ import annotations

import logging

from celery import Celery

from pacsbridge.shared.core.config import Settings, load_settings

__all__ = ["make_celery", "declare_queues", "DEFAULT_BROKER", "INDEX_TASK", "RUN_JOB_TASK", "WEBHOOK_TASK",
           "INDEX_QUEUE", "JOBS_QUEUE", "WEBHOOK_QUEUE"]

#: A broker that needs no server: kombu's SQLAlchemy transport on a SQLite file.
DEFAULT_BROKER = "sqla+sqlite:///pacsbridge-broker.db"
INDEX_TASK = "pacsbridge.worker.tasks.index_files"
#: ``run_job(job_id)``: runs one row of ``pacsbridge_jobs`` (retrieve, push, repack, import).
RUN_JOB_TASK = "pacsbridge.worker.tasks.run_job"
#: Indexing has a queue of its own, served by worker processes of its own: a retrieve job
#: waits for what it pulled to be indexed, so indexing must never queue behind jobs.
INDEX_QUEUE = "pacsbridge"
JOBS_QUEUE = "pacsbridge.jobs"
#: ``send_webhook(job_id)``: POSTs a finished job to its webhook. A queue (and worker threads) of
#: its own: a slow or dead receiver never holds a job slot, and retries wait there, not in a job.
WEBHOOK_TASK = "pacsbridge.worker.tasks.send_webhook"
WEBHOOK_QUEUE = "pacsbridge.webhooks"


log = logging.getLogger(__name__)


def broker_url(settings: Settings) -> str:
    """The broker of ``settings`` (the embedded SQLite broker if unset)."""
    return settings.broker_url or DEFAULT_BROKER


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured for pacsbridge."""
    settings = settings or load_settings()
    url = broker_url(settings)
    app = Celery("pacsbridge", broker=url, include=["pacsbridge.worker.tasks"])
    # Redis redelivers an unacknowledged message after visibility_timeout; kombu's
    # SQLAlchemy transport passes transport options to create_engine and refuses it.
    transport_options = {"visibility_timeout": 3600} if url.startswith(("redis", "rediss")) else {}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        worker_hijack_root_logger=False,
        task_default_queue=INDEX_QUEUE,
        task_routes={RUN_JOB_TASK: {"queue": JOBS_QUEUE}, INDEX_TASK: {"queue": INDEX_QUEUE},
                     WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE}},
    )
    return app



def declare_queues(app: Celery, attempts: int = 5) -> bool:
    """Make the rows of pacsbridge's queues in a SQLAlchemy broker (the embedded one) now.

    kombu's SQLAlchemy transport creates its tables and a queue's row on first use, guarded by a
    lock of its own process only: two processes using a new queue at the same moment (a worker
    starting to consume it, another worker's task sending to it) both insert the row, and one
    fails with ``UNIQUE constraint failed: kombu_queue.name`` (or finds the table made under it).
    Every worker calls this when it starts, before it consumes or sends; two starting together may
    still race here, so a failure is tried again on a fresh connection (it then finds the rows).
    Other brokers declare queues atomically: nothing to do. Returns whether the rows are there;
    False (logged) leaves them to be made on first use, as before.
    """
    if not str(app.conf.broker_url or "").startswith("sqla+"):
        return True
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(1, attempts + 1):
        try:
            with app.connection_for_write() as conn:
                channel = conn.default_channel
                for name in (INDEX_QUEUE, JOBS_QUEUE, WEBHOOK_QUEUE):
                    channel.queue_declare(queue=name)
            return True
        except (IntegrityError, OperationalError) as exc:
            if attempt == attempts:
                log.warning("broker: could not declare the queues (%s); they are made on first use", exc)
    return False
