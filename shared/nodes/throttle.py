"""Per-node limits honoured by every worker on every host: state lives in the database.

* :class:`NodeSlots` -- at most ``node.max_associations`` associations with a
  node at once. Each open association holds a *lease* (a row of
  ``pacsbridge_node_leases``: node, slot number, holder, expiry). A lease is
  renewed by a background thread while held and expires
  :data:`LEASE_SECONDS` after its holder stops renewing it (a ``kill -9``ed
  worker), so a dead worker never blocks a node for good. Taking a slot is
  one conditional ``UPDATE`` (an expired lease) or one ``INSERT`` (a free slot
  number; the primary key refuses a second holder), atomic on SQLite and
  PostgreSQL alike.
* :class:`RateLimiter` -- at most ``node.max_rate`` instances per second.
  The node's row of ``pacsbridge_node_rates`` holds the time at which the
  next instance may go; :meth:`RateLimiter.wait` books ``n`` instances by
  pushing that time forward in one ``UPDATE`` and sleeps until its turn.
* :func:`in_window` / :func:`seconds_until_window` -- the node's move window
  (``HH:MM-HH:MM`` local time, may wrap midnight).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Iterator

from sqlalchemy import and_, case, delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from pacsbridge.shared.core.config import initial_settings
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.core.schema import node_leases_table, node_rates_table

__all__ = ["NodeSlots", "RateLimiter", "in_window", "seconds_until_window", "LEASE_SECONDS",
           "SlotTimeout"]

log = logging.getLogger(__name__)

#: A lease not renewed for this long is free again (its holder died). Renewed every third of it.
LEASE_SECONDS = initial_settings().lease_seconds  # PACSBRIDGE_LEASE_SECONDS
#: How often a waiting :meth:`NodeSlots.acquire` looks for a free slot.
POLL_SECONDS = 0.2


def worker_id() -> str:
    """This process, as ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"



class SlotTimeout(TimeoutError):
    """No association slot of the node became free in time."""


class NodeSlots:
    """At most ``node.max_associations`` concurrent associations per node, across all workers.

    ``holder`` names the caller (``host:pid`` and the job) in the lease rows.
    Use ``with slots.acquire(): ...`` around each association.
    """

    def __init__(self, engine: Engine, node: Node, holder: str) -> None:
        self.engine = engine
        self.node = node
        self.holder = holder[:100]

    def _try(self, token: str, now: float) -> int | None:
        """Take one free or expired slot; its number, or None."""
        t = node_leases_table
        expires = now + LEASE_SECONDS
        limit = max(1, self.node.max_associations)
        with self.engine.begin() as conn:
            held = {r.slot: r.expires_at for r in conn.execute(
                select(t.c.slot, t.c.expires_at).where(t.c.node == self.node.name))}
        for slot in range(limit):
            if slot in held and held[slot] >= now:
                continue
            with self.engine.begin() as conn:
                if slot in held:
                    done = conn.execute(update(t).where(and_(
                        t.c.node == self.node.name, t.c.slot == slot, t.c.expires_at < now))
                        .values(holder=token, acquired_at=now, expires_at=expires))
                    if done.rowcount == 1:
                        return slot
                    continue
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(t).values(node=self.node.name, slot=slot, holder=token,
                                                  acquired_at=now, expires_at=expires))
                return slot
            except IntegrityError:
                continue
        return None

    def _renew(self, slot: int, token: str) -> bool:
        t = node_leases_table
        with self.engine.begin() as conn:
            done = conn.execute(update(t).where(and_(
                t.c.node == self.node.name, t.c.slot == slot, t.c.holder == token))
                .values(expires_at=time.time() + LEASE_SECONDS))
            return done.rowcount == 1

    def _release(self, slot: int, token: str) -> None:
        t = node_leases_table
        with self.engine.begin() as conn:
            conn.execute(delete(t).where(and_(
                t.c.node == self.node.name, t.c.slot == slot, t.c.holder == token)))

    @contextmanager
    def acquire(self, timeout: float | None = None,
                cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold one association slot of the node for the ``with`` block.

        Waits (polling) for a free slot; ``timeout`` None waits for ever.

        Raises
        ------
        SlotTimeout
            No slot came free within ``timeout`` seconds (or ``cancel`` was set).
        """
        token = f"{self.holder}#{uuid.uuid4().hex[:12]}"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slot = self._try(token, time.time())
            if slot is not None:
                break
            if cancel is not None and cancel.is_set():
                raise SlotTimeout(f"node {self.node.name!r}: cancelled while waiting for an "
                                  "association slot")
            if deadline is not None and time.monotonic() >= deadline:
                raise SlotTimeout(f"node {self.node.name!r}: all {self.node.max_associations} "
                                  f"association slot(s) stayed busy for {timeout:g} s")
            time.sleep(POLL_SECONDS)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(LEASE_SECONDS / 3):
                try:
                    if not self._renew(slot, token):
                        log.warning("node %s: lease of slot %d was lost", self.node.name, slot)
                        return
                except Exception:  # database blip: try again at the next beat
                    log.warning("node %s: lease renewal failed", self.node.name, exc_info=True)

        renewer = threading.Thread(target=renew, name=f"lease-{self.node.name}-{slot}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            try:
                self._release(slot, token)
            except Exception:  # it expires by itself
                log.warning("node %s: lease release failed", self.node.name, exc_info=True)

    def held(self) -> int:
        """How many unexpired leases the node has now (all holders)."""
        t = node_leases_table
        with self.engine.connect() as conn:
            rows = conn.execute(select(t.c.slot).where(and_(
                t.c.node == self.node.name, t.c.expires_at >= time.time())))
            return len(rows.all())


class RateLimiter:
    """At most ``node.max_rate`` instances per second per node, across all workers (0 = unlimited)."""

    def __init__(self, engine: Engine, node: Node) -> None:
        self.engine = engine
        self.node = node

    def reserve(self, n: int = 1) -> float:
        """Book ``n`` instances; the wall-clock time at which they may start."""
        rate = self.node.max_rate
        if rate <= 0 or n <= 0:
            return time.time()
        t = node_rates_table
        cost = n / rate
        for _ in range(3):
            now = time.time()
            with self.engine.begin() as conn:
                done = conn.execute(update(t).where(t.c.node == self.node.name).values(
                    next_at=case((t.c.next_at < now, now), else_=t.c.next_at) + cost))
                if done.rowcount == 1:
                    # the row stays locked by our UPDATE until commit: this read is our booking
                    booked = conn.execute(select(t.c.next_at).where(t.c.node == self.node.name)).scalar_one()
                    return float(booked) - cost
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(t).values(node=self.node.name, next_at=now + cost))
                return now
            except IntegrityError:  # another worker created the row first: book again
                continue
        raise RuntimeError("rate limiter row could not be booked")  # pragma: no cover

    def wait(self, n: int = 1, cancel: threading.Event | None = None) -> None:
        """Sleep until ``n`` more instances may be sent (returns at once if unlimited)."""
        start = self.reserve(n)
        delay = start - time.time()
        if delay > 0:
            if cancel is not None:
                cancel.wait(delay)
            else:
                time.sleep(delay)


def _window(node: Node) -> tuple[int, int] | None:
    if not node.move_window:
        return None
    lo, _, hi = node.move_window.partition("-")
    h1, m1 = (int(x) for x in lo.split(":"))
    h2, m2 = (int(x) for x in hi.split(":"))
    return h1 * 60 + m1, h2 * 60 + m2


def in_window(node: Node, now: datetime | None = None) -> bool:
    """True when moves from ``node`` are allowed at ``now`` (local time; no window: always).

    ``20:00-06:00`` wraps midnight; the start minute is inside, the end minute is not;
    equal start and end means the whole day.
    """
    window = _window(node)
    if window is None:
        return True
    now = now or datetime.now()
    start, end = window
    minute = now.hour * 60 + now.minute
    if start == end:
        return True
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def seconds_until_window(node: Node, now: datetime | None = None) -> float:
    """Seconds from ``now`` until the window opens (0 when inside it)."""
    now = now or datetime.now()
    if in_window(node, now):
        return 0.0
    window = _window(node)
    assert window is not None
    start = now.replace(hour=window[0] // 60, minute=window[0] % 60, second=0, microsecond=0)
    if start <= now:
        start += timedelta(days=1)
    return (start - now).total_seconds()
