"""The worker's Celery app (``celery -A pacsbridge.worker.app``); built in :mod:`pacsbridge.shared.core.celeryapp`."""

from __future__ import annotations

from pacsbridge.shared.core.celeryapp import DEFAULT_BROKER, INDEX_TASK, RUN_JOB_TASK, make_celery

__all__ = ["app", "make_celery", "DEFAULT_BROKER", "INDEX_TASK", "RUN_JOB_TASK"]

app = make_celery()
