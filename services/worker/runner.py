"""Run one job row with the code of its kind: :func:`run_job` is what the worker's task calls.

The code of each kind is registered in :data:`pacsbridge.worker.kinds.RUNNERS`; claiming, heartbeats,
cancel, outcome and webhook hand-off are :mod:`pacsbridge.worker.execute`'s (a cohort runs its child
jobs through it with its own code, which is why it is a module of its own).
"""

from __future__ import annotations

from pacsbridge.shared.index.context import Context
from pacsbridge.shared.jobs.store import Job, JobStore
from pacsbridge.worker import execute
from pacsbridge.worker.execute import CANCEL_POLL_SECONDS, HEARTBEAT_SECONDS, Notify
from pacsbridge.worker.kinds import RUNNERS
from pacsbridge.worker.outcome import Outcome, worker_id

__all__ = ["Outcome", "RUNNERS", "run_job", "worker_id", "HEARTBEAT_SECONDS", "CANCEL_POLL_SECONDS"]


def run_job(job_id: str, ctx: Context, jobs: JobStore, worker: str | None = None,
            notify: Notify | None = None) -> Job | None:
    """Claim and run one job with the code of its kind (:data:`RUNNERS`). Returns the finished job, or
    None if it was not ours to run (:func:`pacsbridge.worker.execute.run_job`)."""
    return execute.run_job(job_id, ctx, jobs, RUNNERS, worker=worker, notify=notify)
