"""What one API process shares between requests: settings, one Engine, the job and project stores, one Celery
app."""

from __future__ import annotations

import logging
import threading
from typing import Any

from flask import current_app

from pacsbridge.shared.jobs import webhooks
from pacsbridge.shared.core.config import Settings
from pacsbridge.shared.deid.keys import secret
from pacsbridge.shared.deid.projects import ProjectStore
from pacsbridge.shared.index.context import Context, open_context
from pacsbridge.shared.jobs.store import Job, JobStore

from .auth import Token, parse_tokens

__all__ = ["ApiState", "state"]

log = logging.getLogger(__name__)


class ApiState:
    """Per-process resources of the API, kept in ``app.extensions["pacsbridge"]``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokens: list[Token] = parse_tokens(settings.api_tokens)
        self.webhook_policy = webhooks.Policy.parse(settings.webhook_allow)
        self.ctx: Context = open_context(settings)
        self.ctx.index.create()  # idempotent: also creates the node and job tables
        self.jobs = JobStore(self.ctx.index.engine)
        self.projects = ProjectStore(self.ctx.index.engine)
        if settings.deid_secret:
            # a mistyped secret is refused at start, not discovered as new pseudonyms (DeidSecretError)
            self.projects.check_all(secret(settings))
        self._celery: Any = None
        self._lock = threading.Lock()

    @property
    def celery(self) -> Any:
        """The process's one Celery app (made on first use)."""
        with self._lock:
            if self._celery is None:
                from pacsbridge.shared.core.celeryapp import make_celery

                self._celery = make_celery(self.settings)
            return self._celery

    def enqueue(self, job: Job) -> bool:
        """Send ``run_job(job.id)`` to the workers. False (logged) if the broker is unreachable:
        the row stays queued and the workers' sweeper picks it up later."""
        from pacsbridge.shared.core.celeryapp import RUN_JOB_TASK

        try:
            self.celery.send_task(RUN_JOB_TASK, [job.id], retry=True,
                                  retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                                "interval_max": 0.5})
        except Exception as exc:  # kombu/redis raise many types; the job row is the truth anyway
            log.warning("job %s stays queued: the broker is unreachable (%s)", job.id, exc)
            return False
        try:  # the workers' sweeper re-sends only what was not sent (or long ago)
            self.jobs.mark_enqueued(job.id)
        except Exception as exc:  # the message is out; at worst the sweeper sends it once more
            log.warning("job %s: sent, but not recorded as sent (%s)", job.id, exc)
        return True

    def close(self) -> None:
        self.ctx.index.engine.dispose()


def state() -> ApiState:
    """The :class:`ApiState` of the current app."""
    return current_app.extensions["pacsbridge"]  # type: ignore[no-any-return]
