"""``/healthz`` and ``/metrics``: no token needed.

``/healthz`` checks three things and reports each (``ok``, ``seconds``, ``error``):

- ``database``: ``SELECT 1`` on the index. Required.
- ``broker``: a connection to the Celery broker (2 s timeout). Required: without
  it jobs are accepted but wait.
- ``listener``: a TCP connection to the DICOM listener (``PACSBRIDGE_LISTENER_HOST``,
  ``0.0.0.0`` meaning this machine, and ``_PORT``; 2 s). Reported only: the API
  works without it.
- ``disk``: the storage's free space against ``PACSBRIDGE_DISK_MIN_FREE`` (``free_bytes``,
  ``min_free_bytes``, ``low``); ``ok`` is false below it, when the listener refuses C-STORE with
  0xA700. Reported only: reading and jobs that only read go on.

200 with ``"status": "ok"`` when every required check passed, else 503 with
``"status": "failing"``; the body lists every check either way.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pacsbridge.shared.index.conquest import ping

from .auth import requires
from .contract import operation
from .models import Health, answer
from .state import state

__all__ = ["bp"]

bp = Blueprint("health", __name__)

TIMEOUT = 2.0


def _timed(check: Callable[[], Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        check()
        return {"ok": True, "seconds": round(time.perf_counter() - t0, 4)}
    except Exception as exc:
        return {"ok": False, "seconds": round(time.perf_counter() - t0, 4),
                "error": (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]}


def _broker() -> None:
    with state().celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=TIMEOUT)


def _listener() -> None:
    settings = state().settings
    host = settings.listener_host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    with socket.create_connection((host, settings.listener_port), timeout=TIMEOUT):
        pass


def _disk() -> dict[str, Any]:
    """The watermark check: ``ok`` false below it, with the figures either way."""
    guard = state().ctx.storage.guard
    figures: dict[str, Any] = {}

    def look() -> None:
        disk = guard.state(fresh=True)
        figures.update(disk.as_dict())
        if disk.low:
            raise RuntimeError(disk.message())

    check = _timed(look)
    return {**check, **figures, "required": False}


@bp.get("/healthz")
@requires("public")
@operation("Health of database, broker, listener and the storage's free space", "health",
           {200: ("database and broker answer", Health), 503: ("the database or the broker does not answer", Health)},
           errors=())
def healthz() -> tuple[dict[str, Any], int]:
    checks = {
        "database": _timed(lambda: ping(state().jobs.engine)),
        "broker": _timed(_broker),
        "listener": _timed(_listener),
    }
    checks["listener"]["required"] = False
    checks["disk"] = _disk()
    ok = checks["database"]["ok"] and checks["broker"]["ok"]
    return answer(Health, {"status": "ok" if ok else "failing", "checks": checks}), 200 if ok else 503


@bp.get("/metrics")
@requires("public")
@operation("Prometheus metrics (of every API process: multiprocess mode under gunicorn)", "health",
           {200: ("Prometheus text format", ("text/plain", {"type": "string"}))}, errors=())
def metrics() -> Response:
    registry = current_app.extensions["pacsbridge_metrics"]
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
