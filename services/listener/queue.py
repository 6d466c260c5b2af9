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

    A batch goes out when it holds ``max_batch`` paths, when its oldest path
    has waited ``interval`` seconds, or at once on :meth:`flush` (the
    listener calls it when an association ends, so the last instances of a
    transfer do not wait for the interval). Large batches while a transfer
    streams, no wait at its end.

    Parameters
    ----------
    send : callable
        ``send(paths)``: publish one task; raises when the broker is unreachable.
    max_batch : int
        Paths per task.
    interval : float
        Longest wait of a path before its (partial) batch is sent.
    """

    def __init__(self, send: Callable[[list[Any]], Any], max_batch: int = 100, interval: float = 0.2) -> None:
        self.send = send
        self.max_batch = max_batch
        self.interval = interval
        self._pending: list[Any] = []
        self._arrived: list[float] = []  # monotonic arrival time of each pending path
        self._flush = False
        self._cond = threading.Condition()
        self._stop = False
        self._failing_since: float | None = None
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="pacsbridge-batcher", daemon=True)
        self._thread.start()

    def add(self, path: Any) -> None:
        with self._cond:
            self._pending.append(path)
            self._arrived.append(time.monotonic())
            if len(self._pending) == 1 or len(self._pending) >= self.max_batch:
                self._cond.notify()  # the interval starts, or the batch is full

    def flush(self) -> None:
        """Send what is pending now (an association ended)."""
        with self._cond:
            if self._pending:
                self._flush = True
                self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def _next_batch(self) -> list[Any] | None:
        """Wait until a batch is due; None when stopped with nothing left."""
        with self._cond:
            while True:
                if self._stop:
                    return self._pending[: self.max_batch] or None
                if self._pending:
                    due = self._arrived[0] + self.interval - time.monotonic()
                    if self._flush or len(self._pending) >= self.max_batch or due <= 0:
                        self._flush = False
                        return self._pending[: self.max_batch]
                    self._cond.wait(due)
                else:
                    self._cond.wait()

    def _run(self) -> None:
        backoff = self.interval
        while True:
            batch = self._next_batch()
            if batch is None:
                return
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
                backoff = min(max(backoff, 0.05) * 2, 10.0)
                continue
            if self._failing_since is not None:
                log.warning("broker back after %.0f s", time.monotonic() - self._failing_since)
                self._failing_since = None
            backoff = self.interval
            with self._cond:
                del self._pending[: len(batch)]
                del self._arrived[: len(batch)]
                if not self._pending:
                    self._flush = False
                self.sent += len(batch)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is pending (for up to ``timeout`` seconds) and stop."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
