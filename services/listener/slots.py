"""Connections per peer address, counted across every receiver process.

The receivers share one listening socket, so whichever process the kernel hands a
connection to must know how many the same address already holds in the others.
:class:`PeerSlots` is a table in shared memory (``multiprocessing.Array``, made by the
parent before the receivers are spawned and passed to them): one row per receiver
process, each row a few ``(address, count)`` entries, under one lock. A receiver
only ever changes its own row; the parent clears the row of a receiver that died
(``kill -9`` cannot leak slots for ever), before it spawns the next one.

A connection takes a slot when it is accepted (``verify_request``) and gives it back
when its association ends, whatever the way (release, abort, timeout, error), so an
address holding ``limit`` connections gets further ones closed at once, and the
other peers keep the receivers' association slots (``PACSBRIDGE_MAX_ASSOCIATIONS``
per process) for themselves.

The same rows say how many connections each receiver serves: a receiver lets a less
busy one accept a new connection first (:meth:`PeerSlots.others_less_busy`), so that
associations spread over the processes instead of sharing one's GIL.
"""

from __future__ import annotations

import ipaddress
import multiprocessing
from typing import Any

__all__ = ["PeerSlots", "ENTRIES"]

#: Distinct addresses one receiver process can hold connections of at once.
ENTRIES = 256
_FIELDS = 3  # address (high 64 bits, low 64 bits), count


def _key(address: str) -> tuple[int, int]:
    """128 bits of the address (IPv4 mapped into IPv6, so one form per peer), as two signed int64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        ip = ipaddress.ip_address("::")
    value = int(ip) if ip.version == 6 else int(ipaddress.IPv6Address(f"::ffff:{ip}"))
    high, low = value >> 64, value & (2**64 - 1)
    signed = lambda v: v - 2**64 if v >= 2**63 else v  # noqa: E731  (ctypes int64 is signed)
    return signed(high), signed(low)


class PeerSlots:
    """Counts of open connections per address, for ``processes`` receivers.

    Parameters
    ----------
    processes : int
        Receiver processes (rows of the table).
    limit : int
        Connections one address may hold across all of them (0: no limit).
    context : multiprocessing context, optional
        The context the receivers are started with (``spawn``).
    """

    def __init__(self, processes: int, limit: int, context: Any = None) -> None:
        ctx = context or multiprocessing.get_context()
        self.processes = max(1, processes)
        self.limit = limit
        self.table = ctx.Array("q", self.processes * ENTRIES * _FIELDS)  # zeroed, with its own lock
        # 1 for a receiver whose server loop runs (set by it, cleared with its row when it died)
        self.serving = ctx.Array("b", self.processes, lock=False)  # one writer per entry, read under the table's lock
        self.row = 0

    def for_process(self, row: int) -> "PeerSlots":
        """This table as seen by receiver ``row`` (set in the child before it serves)."""
        self.row = row
        return self

    def _entries(self, row: int) -> range:
        start = row * ENTRIES * _FIELDS
        return range(start, start + ENTRIES * _FIELDS, _FIELDS)

    def held(self, address: str) -> int:
        """Connections ``address`` holds in all receivers."""
        high, low = _key(address)
        with self.table.get_lock():
            t: Any = self.table.get_obj()  # a ctypes array of c_longlong
            return sum(t[i + 2] for i in range(0, len(t), _FIELDS) if t[i + 2] and t[i] == high and t[i + 1] == low)

    def acquire(self, address: str) -> int:
        """Take a slot for a connection from ``address``. Returns 0 when taken, else how many the
        address holds already (the limit reached, or this receiver's row is full)."""
        high, low = _key(address)
        with self.table.get_lock():
            t: Any = self.table.get_obj()  # a ctypes array of c_longlong
            total: int = 0
            if self.limit:
                for i in range(0, len(t), _FIELDS):
                    if t[i + 2] and t[i] == high and t[i + 1] == low:
                        total += t[i + 2]
                if total >= self.limit:
                    return total
            free = None
            for i in self._entries(self.row):
                if t[i + 2] and t[i] == high and t[i + 1] == low:
                    t[i + 2] += 1
                    return 0
                if free is None and not t[i + 2]:
                    free = i
            if free is None:
                return max(total, 1)
            t[free], t[free + 1], t[free + 2] = high, low, 1
            return 0

    def release(self, address: str) -> None:
        """Give back a slot taken by :meth:`acquire` in this receiver."""
        high, low = _key(address)
        with self.table.get_lock():
            t: Any = self.table.get_obj()  # a ctypes array of c_longlong
            for i in self._entries(self.row):
                if t[i + 2] and t[i] == high and t[i + 1] == low:
                    t[i + 2] -= 1
                    return

    def mark_serving(self) -> None:
        """This receiver's server loop starts: it takes its share of new connections from now on."""
        self.serving[self.row] = 1

    def others_less_busy(self) -> bool:
        """Whether another serving receiver holds fewer connections than this one (the sum of each row;
        one still starting, or dead and not yet replaced, is not waited for)."""
        size = ENTRIES * _FIELDS
        with self.table.get_lock():
            t: Any = self.table.get_obj()  # a ctypes array of c_longlong
            totals = [sum(t[r * size + 2:(r + 1) * size:_FIELDS]) for r in range(self.processes)]
            serving = self.serving[:]
        mine = totals[self.row]
        return any(n < mine for r, n in enumerate(totals) if r != self.row and serving[r])

    def clear(self, row: int) -> None:
        """Forget every slot of receiver ``row`` (it died: its connections died with it)."""
        with self.table.get_lock():
            self.serving[row] = 0
            t = self.table.get_obj()
            for i in self._entries(row):
                t[i + 2] = 0
