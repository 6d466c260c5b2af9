"""Hand stored files to the workers in batches, surviving a broker outage.

The listener must keep storing when Redis is down: :class:`Batcher` keeps
paths in memory and retries with backoff; what a crash loses from memory
the reconciler finds again (stored but not indexed).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

__all__ = ["Batcher"]

log = logging.getLogger(__name__)


class Batcher:
    """Collect stored paths and send them as ``index_files`` tasks.

    Parameters
    ----------
    send : callable
        ``send(paths)``: publish one task; raises when the broker is unreachable.
    max_batch : int
        Paths per task.
    interval : float
        Longest wait before a partial batch is sent.
    """

    def __init__(self, send: Callable[[list[Any]], Any], max_batch: int = 100, interval: float = 0.2) -> None:
        self.send = send
        self.max_batch = max_batch
        self.interval = interval
        self._pending: list[Any] = []
        self._cond = threading.Condition()
        self._stop = False
        self._failing_since: float | None = None
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="pacsbridge-batcher", daemon=True)
        self._thread.start()

    def add(self, path: Any) -> None:
        with self._cond:
            self._pending.append(path)
            if len(self._pending) >= self.max_batch:
                self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def _run(self) -> None:
        backoff = self.interval
        while True:
            with self._cond:
                if not self._pending and not self._stop:
                    self._cond.wait(self.interval)
                if self._stop and not self._pending:
                    return
                batch = self._pending[: self.max_batch]
            if not batch:
                continue
            try:
                self.send(batch)
            except Exception as exc:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.error("broker unreachable, %d stored instances wait for indexing: %s",
                              self.pending(), exc)
                if self._stop:
                    return  # files are stored; the reconciler will find them
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if self._failing_since is not None:
                log.warning("broker back after %.0f s", time.monotonic() - self._failing_since)
                self._failing_since = None
            backoff = self.interval
            with self._cond:
                del self._pending[: len(batch)]
                self.sent += len(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is pending (for up to ``timeout`` seconds) and stop."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
