"""The ``import`` job: files under ``PACSBRIDGE_IMPORT_ROOT/<path>`` into storage and the index (copies)."""

from __future__ import annotations

import threading

from pacsbridge.shared.core.errors import InvalidRequest
from pacsbridge.shared.index.context import Context
from pacsbridge.shared.index.importer import Importer
from pacsbridge.shared.jobs.store import Job, JobStore
from pacsbridge.worker.outcome import Outcome

__all__ = ["run"]


def run(job: Job, ctx: Context, jobs: JobStore, cancel: threading.Event) -> Outcome:
    """Import files under ``PACSBRIDGE_IMPORT_ROOT/<path>`` into storage and the index (copies)."""
    root = ctx.settings.import_root.resolve()
    source = (root / job.params["path"]).resolve()
    if not source.is_relative_to(root):
        raise InvalidRequest("must stay inside PACSBRIDGE_IMPORT_ROOT", "path")
    if not source.exists():
        raise InvalidRequest(f"{job.params['path']!r} does not exist under the import root", "path")
    # every file is checked against the root after resolving links, and only regular files are read
    report = Importer(ctx.index, ctx.storage, workers=ctx.settings.import_workers).import_paths(
        [source], confine=root, cancel=cancel)
    result = {**report.as_dict(), "rejected": len(report.rejected),
              "rejected_files": [f"{p}: {r}" for p, r in report.rejected[:100]]}
    if report.cancelled:
        return Outcome("cancelled", "cancelled by request", result)
    imported = report.stored + report.indexed + report.duplicate
    if report.rejected and imported:
        return Outcome("partial", f"{len(report.rejected)} file(s) rejected", result)
    if report.rejected:
        return Outcome("failed", f"no file imported; {len(report.rejected)} rejected", result)
    return Outcome("succeeded", "", result)
