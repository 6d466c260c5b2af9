"""``pacsbridge worker``: a Celery worker with pacsbridge's tasks."""

from __future__ import annotations

import argparse
import os

from pacsbridge.shared.config import Settings


def main(settings: Settings, args: argparse.Namespace | None = None) -> int:
    """Run a worker in this process until it is stopped."""
    from .app import make_celery

    # tasks read their settings from the environment: pass on what the command line changed
    os.environ["PACSBRIDGE_DATABASE_URL"] = settings.database_url
    os.environ["PACSBRIDGE_STORAGE"] = str(settings.storage)

    app = make_celery(settings)
    concurrency = getattr(args, "concurrency", None) or int(os.environ.get("PACSBRIDGE_WORKER_CONCURRENCY", "0")) \
        or os.cpu_count() or 1
    argv = ["worker", "--loglevel=INFO", f"--concurrency={concurrency}", "-Q", "pacsbridge", "--without-gossip",
            "--without-mingle"]
    app.worker_main(argv)
    return 0
