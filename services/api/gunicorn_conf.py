"""gunicorn settings for the API with several workers: ``gunicorn -c python:pacsbridge.api.gunicorn_conf
-w 4 -b 0.0.0.0:8080 'pacsbridge.api:create_app()'``.

Each gunicorn worker is a process with its own counters; ``/metrics``, answered by any one of them,
must count the requests of all. prometheus_client's multiprocess mode does that (as the listener's
receivers do, :func:`pacsbridge.listener.server._start_metrics`): every worker writes its values to
files in ``PROMETHEUS_MULTIPROC_DIR``, and a scrape sums them. The folder must be set before any worker
imports prometheus_client, so the master sets it here (a fresh temporary folder unless the variable is
set; old ``*.db`` files are removed at start), and marks a worker's files dead when it exits.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

_made: list[str] = []


def on_starting(server: Any) -> None:
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if not folder:
        folder = tempfile.mkdtemp(prefix="pacsbridge-api-metrics-")
        _made.append(folder)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".db"):
            os.unlink(os.path.join(folder, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # inherited by every worker, before it imports anything
    server.log.info("metrics of every worker in %s (prometheus multiprocess mode)", folder)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    for folder in _made:
        shutil.rmtree(folder, ignore_errors=True)
