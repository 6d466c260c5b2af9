"""What a job's code returns, and who runs it (shared by the runner and every job kind)."""

from __future__ import annotations

import threading
from typing import Any, Callable, NamedTuple

from pacsbridge.shared.index.context import Context
from pacsbridge.shared.jobs.store import Job, JobStore
from pacsbridge.shared.nodes.throttle import worker_id

__all__ = ["Outcome", "JobCode", "worker_id"]


class Outcome(NamedTuple):
    """How a job ended: state (succeeded, partial, failed, cancelled), error text, result summary."""

    state: str
    error: str = ""
    result: dict[str, Any] = {}



#: The code of a job kind: ``run(job, ctx, jobs, cancel) -> Outcome``.
JobCode = Callable[[Job, Context, JobStore, threading.Event], Outcome]
