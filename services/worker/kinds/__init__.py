"""The job kinds the worker runs, registered here by name (the ``kind`` of a job row).

Each is a function ``run(job, ctx, jobs, cancel) -> Outcome`` (:mod:`pacsbridge.worker.outcome`);
:mod:`pacsbridge.worker.runner` claims a job and calls the one of its kind. A new kind is a module
here and one line below (and its name in :data:`pacsbridge.shared.jobs.store.KINDS`).
"""

from __future__ import annotations

from pacsbridge.worker.kinds import cohort, delete, importing, push, repack, results, retrieve
from pacsbridge.worker.outcome import JobCode

__all__ = ["RUNNERS"]

#: ``kind -> run``.
RUNNERS: dict[str, JobCode] = {
    "retrieve": retrieve.run,
    "push": push.run,
    "repack": repack.run,
    "import": importing.run,
    "results": results.run,
    "cohort": cohort.run,
    "delete": delete.run,
}
