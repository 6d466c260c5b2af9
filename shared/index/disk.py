"""The storage's free-space watermark (``PACSBRIDGE_DISK_MIN_FREE``).

Below the watermark storage takes nothing more: the listener answers 0xA700 (out of resources), a
retrieve job stops with a clear error, and ``/healthz`` and the metrics say so. It is checked before
the disk is full, so that what is being received, the index's own growth (the database often shares
the disk) and the journal still fit, and a full disk never becomes a half-written file or a refused
``COMMIT``.

The check is a ``statvfs`` of the storage root, remembered for :data:`CHECK_SECONDS` or until this
process has written half of what was left above the watermark, whichever comes first: a lookup of
the clock per instance, a ``statvfs`` per second while there is room, and one every few instances
near the watermark, so a fast sender cannot run past it on a stale answer. (Other processes' writes
are seen at the next ``statvfs``: within a second.)

The value is bytes (``2G``, ``500M``, ``1048576``; ``K``/``M``/``G``/``T`` are powers of 1024) or a
percent of the file system's size (``5%``); ``0`` turns the check off.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import NamedTuple

from pacsbridge.shared.core.errors import ConfigError, StorageError

__all__ = ["DiskGuard", "DiskLow", "DiskState", "parse_min_free", "CHECK_SECONDS"]

#: How long a ``statvfs`` answer is reused.
CHECK_SECONDS = 1.0

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_VALUE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(%|[KMGT]i?B?|B)?\s*$", re.IGNORECASE)


class DiskLow(StorageError):
    """Storage is below its free-space watermark: nothing more is written until space is freed."""


def parse_min_free(text: str) -> tuple[float, bool]:
    """``(value, is_percent)`` of a watermark: ``"5%"`` is ``(5.0, True)``, ``"2G"`` ``(2147483648, False)``.

    Raises
    ------
    ConfigError
        Not a number with an optional unit, or a percent above 100.
    """
    m = _VALUE.match(str(text))
    if m is None:
        raise ConfigError(f"{text!r}: expected bytes (2G, 500M, 1048576) or a percent (5%)")
    number, unit = float(m.group(1)), (m.group(2) or "").upper()
    if unit == "%":
        if number > 100:
            raise ConfigError(f"{text!r}: a percent is at most 100")
        return number, True
    return float(int(number * _UNITS[unit.rstrip("B").rstrip("I")])), False


class DiskState(NamedTuple):
    """One look at the storage's file system."""

    free: int  #: bytes an unprivileged writer may still use (``f_bavail``)
    total: int  #: size of the file system
    min_free: int  #: the watermark in bytes (0: off)

    @property
    def low(self) -> bool:
        return self.min_free > 0 and self.free < self.min_free

    def message(self) -> str:
        return (f"storage has {_human(self.free)} free, below its watermark of {_human(self.min_free)} "
                "(PACSBRIDGE_DISK_MIN_FREE): free space or raise the disk before more is stored")

    def as_dict(self) -> dict[str, int | bool]:
        return {"free_bytes": self.free, "total_bytes": self.total, "min_free_bytes": self.min_free, "low": self.low}


class DiskGuard:
    """The watermark of one storage root, checked at most every :data:`CHECK_SECONDS`.

    Parameters
    ----------
    root : Path
        The storage root (any path on its file system).
    min_free : str
        ``PACSBRIDGE_DISK_MIN_FREE``: bytes or a percent, ``0`` for off.
    """

    def __init__(self, root: Path | str, min_free: str, interval: float = CHECK_SECONDS) -> None:
        self.root = Path(root)
        self.value, self.percent = parse_min_free(min_free)
        self.interval = interval
        self._state: DiskState | None = None
        self._at = 0.0
        self._spent = 0  # bytes this process wrote since the last statvfs
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.value > 0

    def state(self, fresh: bool = False) -> DiskState:
        """The file system's free space and the watermark (a remembered answer unless ``fresh``).

        Raises OSError when the root cannot be looked at (missing, unreadable)."""
        now = time.monotonic()
        with self._lock:
            if not fresh and self._state is not None and now - self._at < self.interval \
                    and (self._spent == 0 or self._spent * 2 < self._state.free - self._state.min_free):
                return self._state
        st = os.statvfs(_existing(self.root))
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        min_free = int(total * self.value / 100) if self.percent else int(self.value)
        state = DiskState(free, total, min_free)
        with self._lock:
            self._state, self._at, self._spent = state, now, 0
        return state

    def spent(self, size: int) -> None:
        """Count bytes just written (:meth:`state` looks again once they reach half the room left)."""
        if size > 0:
            with self._lock:
                self._spent += size

    def require(self) -> None:
        """Raise :class:`DiskLow` below the watermark (nothing when off).

        Raises
        ------
        DiskLow
            Free space is below the watermark; the message says how much is free and the watermark.
        """
        if not self.enabled:
            return
        try:
            state = self.state()
        except OSError:  # the write that follows reports the real problem
            return
        if state.low:
            raise DiskLow(state.message())


def _existing(path: Path) -> Path:
    """``path``, or its nearest folder that exists (a root not made yet is made on that file system)."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover
