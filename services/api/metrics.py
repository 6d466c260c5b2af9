"""Prometheus metrics of the API (served by :mod:`.health` at ``/metrics``).

- ``pacsbridge_api_requests_total{method,route,status}``
- ``pacsbridge_api_request_seconds{method,route}`` (histogram)
- ``pacsbridge_jobs{state}``: jobs per state, counted in the database at scrape time
- ``pacsbridge_quarantine{reason,state}``: entries set aside by indexing (``index_failed``,
  ``uid_conflict``), ``open`` or ``resolved``, counted at scrape time
- ``pacsbridge_storage_free_bytes``, ``pacsbridge_storage_min_free_bytes`` and ``pacsbridge_storage_low``
  (1 below the watermark, ``PACSBRIDGE_DISK_MIN_FREE``, when the listener refuses C-STORE): read at scrape time

``route`` is the URL rule (``/api/v1/jobs/<job_id>``), never the raw path, so
the label set stays small.

One process (``pacsbridge api``, waitress): each app has its own registry. Several (gunicorn workers):
with ``PROMETHEUS_MULTIPROC_DIR`` set (:mod:`pacsbridge.api.gunicorn_conf` sets it), prometheus_client's
multiprocess mode writes each worker's counts to that folder and every scrape sums them, whichever
worker answers it. Without it, under gunicorn, a warning says that ``/metrics`` counts one worker only.
The job and quarantine gauges are read from the database at scrape time, the same everywhere.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterator

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from pacsbridge.shared.jobs.store import STATES
from pacsbridge.shared.core.schema import jobs_table
from pacsbridge.shared.index.quarantine import Quarantine

__all__ = ["init_app"]

log = logging.getLogger(__name__)


class JobsCollector(Collector):
    """Jobs by state, read from the jobs table when scraped."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("pacsbridge_jobs", "Jobs per state (counted at scrape time)", labels=["state"])
        counts = dict.fromkeys(STATES, 0)
        try:
            engine = self.app.extensions["pacsbridge"].jobs.engine
            with engine.connect() as conn:
                for state, n in conn.execute(select(jobs_table.c.state, func.count()).group_by(jobs_table.c.state)):
                    counts[state] = int(n)
        except Exception as exc:  # the database being down must not break the scrape
            log.warning("metrics: cannot count jobs: %s", exc)
            return
        for state, n in counts.items():
            gauge.add_metric([state], n)
        yield gauge


class QuarantineCollector(Collector):
    """Quarantine entries by reason, open or resolved, read when scraped."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("pacsbridge_quarantine", "Instances set aside by indexing, by reason "
                                  "(index_failed, uid_conflict), open or resolved", labels=["reason", "state"])
        try:
            counts = Quarantine(self.app.extensions["pacsbridge"].jobs.engine).counts()
        except Exception as exc:  # the database being down must not break the scrape
            log.warning("metrics: cannot count the quarantine: %s", exc)
            return
        for (reason, resolved), n in sorted(counts.items()):
            gauge.add_metric([reason, "resolved" if resolved else "open"], n)
        yield gauge


class DiskCollector(Collector):
    """The storage's free space and its watermark, looked at when scraped."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        try:
            disk = self.app.extensions["pacsbridge"].ctx.storage.guard.state(fresh=True)
        except Exception as exc:  # storage not mounted here: no figures rather than a broken scrape
            log.warning("metrics: cannot look at the storage's free space: %s", exc)
            return
        yield GaugeMetricFamily("pacsbridge_storage_free_bytes", "Free bytes of the storage's file system",
                                value=disk.free)
        yield GaugeMetricFamily("pacsbridge_storage_min_free_bytes", "The free-space watermark in bytes "
                                "(PACSBRIDGE_DISK_MIN_FREE; 0: off)", value=disk.min_free)
        yield GaugeMetricFamily("pacsbridge_storage_low", "1 while storage is below its watermark (the listener "
                                "refuses C-STORE with 0xA700)", value=int(disk.low))


def init_app(app: Flask) -> None:
    registry = CollectorRegistry()
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if folder:  # the counters go to files every process writes; the scrape sums them
        from prometheus_client import values
        from prometheus_client.multiprocess import MultiProcessCollector

        if values.ValueClass.__name__ != "MmapedValue":
            log.warning("PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported: /metrics "
                        "counts this process only")
        MultiProcessCollector(registry, path=folder)
        own: CollectorRegistry | None = None
    else:
        own = registry
        if "gunicorn" in sys.modules:
            log.warning("under gunicorn without PROMETHEUS_MULTIPROC_DIR: /metrics counts the requests of the "
                        "worker that answers it only (run gunicorn with -c python:pacsbridge.api.gunicorn_conf)")
    requests = Counter("pacsbridge_api_requests_total", "HTTP requests answered", ["method", "route", "status"],
                       registry=own)
    latency = Histogram("pacsbridge_api_request_seconds", "Time to answer an HTTP request", ["method", "route"],
                        registry=own)
    registry.register(JobsCollector(app))
    registry.register(QuarantineCollector(app))
    registry.register(DiskCollector(app))
    app.extensions["pacsbridge_metrics"] = registry

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        requests.labels(request.method, route, str(response.status_code)).inc()
        started = g.get("started")
        if started is not None:
            latency.labels(request.method, route).observe(time.perf_counter() - started)
        return response

    # before authenticate(), so a refused request is still timed
    app.before_request_funcs.setdefault(None, []).insert(0, app.before_request_funcs[None].pop())
