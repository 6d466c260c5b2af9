"""What a job's code returns, and who runs it (shared by the runner and every job kind)."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Callable, NamedTuple

from pacsbridge.shared.index.context import Context
from pacsbridge.shared.jobs.store import Job, JobStore

__all__ = ["Outcome", "JobCode", "worker_id"]


class Outcome(NamedTuple):
    """How a job ended: state (succeeded, partial, failed, cancelled), error text, result summary."""

    state: str
    error: str = ""
    result: dict[str, Any] = {}


def worker_id() -> str:
    """This process, as ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


#: The code of a job kind: ``run(job, ctx, jobs, cancel) -> Outcome``.
JobCode = Callable[[Job, Context, JobStore, threading.Event], Outcome]
