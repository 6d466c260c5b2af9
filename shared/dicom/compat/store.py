"""Sending on our own associations with pynetdicom's reactor parked: the send gate, the fast C-STORE sender.

pynetdicom pauses its association reactor before a ``send_*`` by clearing
``Association._reactor_checkpoint`` and waiting for ``_is_paused``; but the reactor sets
``_is_paused`` just *before* it waits, so it can pass the checkpoint while the sender already
believes it paused, then take the C-STORE response off the queue itself ("Received unexpected
C-STORE service message", pynetdicom issues #435/#875): the sender waits for the DIMSE timeout
and the association is aborted. Seen about once in 15 pushes of 200 instances here, with fast
answers. :class:`Gate` replaces the checkpoint with one that counts the times the reactor blocks
on it, and :meth:`Gate.park` waits for the next one.

:class:`FastStore` sends a stored file as one socket write (the framing is
:mod:`pacsbridge.shared.dicom.sender`'s, the PDUs pynetdicom's ``DIMSEMessage.encode_msg`` would
make) and takes the response from pynetdicom's DIMSE queue (``assoc.dimse.get_msg``), so
association state, timeouts and aborts stay pynetdicom's. It needs the reactor parked, so that
nothing else writes to the socket or takes the response, as ``send_c_store`` itself does.

:class:`ParkedSends` is "park the reactor, send, release" for a run of requests on one
association: the one place push's senders (threads and processes) do it.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, TypeVar

from pydicom.dataset import Dataset

from pacsbridge.shared.dicom.sender import SendFailed, command_set, dataset_offset, pdus, send_all

from . import fallback, supported
from .reactor import wake

__all__ = ["Gate", "FastStore", "ParkedSends"]

T = TypeVar("T")


class Gate(threading.Event):
    """A reactor checkpoint that says when pynetdicom's reactor is really parked (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._assoc: Any = None
        self.set()
        self._parks = 0
        self._counted = threading.Condition()

    def wait(self, timeout: float | None = None) -> bool:
        if super().wait(0):
            return True
        with self._counted:
            self._parks += 1
            self._counted.notify_all()
        return super().wait(timeout)

    @classmethod
    def install(cls, assoc: Any) -> "Gate | None":
        """Put a gate in place of ``assoc``'s checkpoint; None (said once) on a pynetdicom we do not follow."""
        if not supported():
            fallback("send gate")
            return None
        if not isinstance(getattr(assoc, "_reactor_checkpoint", None), threading.Event):
            fallback("send gate", "the association has no _reactor_checkpoint event")
            return None
        gate = cls()
        gate._assoc = assoc
        assoc._reactor_checkpoint = gate
        return gate

    def park(self, timeout: float = 2.0, limit: float = 60.0) -> None:
        """Stop the reactor before a request (the gate is open on entry; ``send_c_store`` opens it again).

        Returns once the reactor blocked after the gate closed; or once its thread has ended (it ends
        with its association: checked every ``timeout`` seconds); or after ``limit`` seconds in all.
        (It gave up after ``timeout`` alone: on a machine whose CPUs were busy for seconds the reactor
        thread could be still on its way to the gate then, pass it, take the response the request would
        wait for, and the association ended in its network timeout: a push ended ``partial``.)
        """
        with self._counted:
            seen = self._parks
            self.clear()
            wake(self._assoc)  # the waiting reactor would look again only after up to 5 ms
            end = time.monotonic() + limit
            while not self._counted.wait_for(lambda: self._parks > seen, timeout):
                alive = getattr(self._assoc, "is_alive", None)
                if not callable(alive) or not alive() or time.monotonic() >= end:
                    return


class FastStore:
    """C-STORE requests from files on one established association with the reactor parked (see the module docstring)."""

    def __init__(self, assoc: Any, sock: socket.socket, timeout: float) -> None:
        self.assoc = assoc
        self.sock = sock
        self.timeout = timeout
        self.max_pdu = int(assoc.dimse.maximum_pdu_size or 0)
        self.contexts = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
                         for cx in assoc.accepted_contexts}
        self.message_id = 0

    @classmethod
    def attach(cls, assoc: Any, timeout: float) -> "FastStore | None":
        """A fast sender for ``assoc``, or ``None`` (said once) when this pynetdicom lacks what it needs:
        then its own ``send_c_store`` applies."""
        if not supported():
            fallback("fast C-STORE sender")
            return None
        try:
            sock = assoc.dul.socket.socket
            dimse = assoc.dimse
            if not isinstance(sock, socket.socket) or not callable(getattr(dimse, "get_msg", None)):
                fallback("fast C-STORE sender", "the association has no plain socket or DIMSE queue")
                return None
            int(dimse.maximum_pdu_size or 0)
            return cls(assoc, sock, timeout)
        except Exception as exc:
            fallback("fast C-STORE sender", f"unexpected association internals: {exc!r}")
            return None

    def can_send(self, sop_class: str, transfer_syntax: str) -> bool:
        return (sop_class, transfer_syntax) in self.contexts

    def store(self, path: str, sop_class: str, sop_instance: str, transfer_syntax: str) -> Dataset | None:
        """Send one stored file as is; the response's status data set, or ``None`` when none came.

        Raises OSError (file unreadable), ValueError (bad file meta, or no
        accepted context) and :class:`SendFailed` (the association was
        aborted: the request may be incomplete on the wire).
        """
        if (sop_class, transfer_syntax) not in self.contexts:
            raise ValueError(f"no accepted presentation context for {sop_class} in {transfer_syntax}")
        with open(path, "rb") as fh:
            data = fh.read()
        return self.store_bytes(data, sop_class, sop_instance, transfer_syntax)

    def store_bytes(self, data: bytes, sop_class: str, sop_instance: str, transfer_syntax: str) -> Dataset | None:
        """:meth:`store` of a Part 10 file in memory (e.g. made on the fly by a project's de-identification)."""
        context_id = self.contexts.get((sop_class, transfer_syntax))
        if context_id is None:
            raise ValueError(f"no accepted presentation context for {sop_class} in {transfer_syntax}")
        try:
            offset = dataset_offset(data)
        except ValueError as exc:
            raise OSError(f"unreadable file meta: {exc}") from None
        self.message_id = self.message_id % 0xFFFF + 1
        msg_id = self.message_id
        buffers = pdus(context_id, command_set(sop_class, sop_instance, msg_id),
                       memoryview(data)[offset:], self.max_pdu)
        try:
            send_all(self.sock, buffers, self.timeout)
        except SendFailed:
            self.assoc.abort()
            raise
        deadline = time.monotonic() + self.timeout
        while True:
            _, rsp = self.assoc.dimse.get_msg(block=True)
            if rsp is None:  # DIMSE timeout, abort or closed connection
                if self.assoc.is_established:
                    self.assoc.abort()
                return None
            if getattr(rsp, "MessageIDBeingRespondedTo", None) == msg_id and hasattr(rsp, "Status"):
                break
            if time.monotonic() > deadline:  # only unrelated messages: give up as pynetdicom would
                self.assoc.abort()
                return None
        status = Dataset()
        status.Status = int(rsp.Status)
        comment = getattr(rsp, "ErrorComment", None)
        if comment:
            status.ErrorComment = comment
        return status


class ParkedSends:
    """Requests on one association with its reactor parked: "park the reactor, send, release", once.

    ::

        with ParkedSends(assoc, timeout) as sends:
            for f in files:
                rsp = sends.send(f.sop_class, f.transfer_syntax, lambda fast: ...)

    ``request(fast)`` makes one request: with ``fast.store`` (a :class:`FastStore`, when this
    association has one and accepted that SOP class in that transfer syntax) or with pynetdicom's
    own ``send_*``. The reactor is parked before it; the fast path leaves it parked for the next
    request (no ~1 ms park per instance), pynetdicom's ``send_*`` needs it running, and leaving the
    block lets it run again (for the release). Without a gate (another pynetdicom, said once),
    requests go out as pynetdicom makes them.
    """

    def __init__(self, assoc: Any, timeout: float, fast: bool = True) -> None:
        self.assoc = assoc
        self.gate = Gate.install(assoc)
        self.fast = FastStore.attach(assoc, timeout) if self.gate is not None and fast else None
        self.parked = False
        self.timeout = timeout

    def send(self, sop_class: str, transfer_syntax: str, request: Callable[["FastStore | None"], T]) -> T:
        """``request(fast)`` with the reactor parked (see the class docstring)."""
        if self.gate is not None and not self.parked:
            self.gate.park(limit=self.timeout)
            self.parked = True
        fast_path = self.fast is not None and self.fast.can_send(sop_class, transfer_syntax)
        try:
            return request(self.fast)
        finally:
            if self.gate is not None and (not fast_path or not self.assoc.is_established):
                self.gate.set()  # also when nothing was sent
                self.parked = False

    def close(self) -> None:
        """Let the reactor run again."""
        if self.gate is not None:
            self.gate.set()
            self.parked = False

    def __enter__(self) -> "ParkedSends":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
