"""Received data sets in memory up to a bound, on disk beyond it; a full disk is a status, not an abort.

pynetdicom gathers a C-STORE's data set in a ``BytesIO`` (all of it in memory: a 315 MB
multi-frame instance peaked a receiver at 1.3 GB), or, with ``STORE_RECV_CHUNKED_DATASET``,
writes it to a temporary file itself, where a full disk raises inside its reader and the
association is aborted instead of answered.

:func:`install` (per association, before it starts) swaps the data set buffer of each C-STORE
request, once its command set is decoded, for a :class:`Spool`: a ``BytesIO`` that keeps the
data set in memory up to ``limit`` bytes (``PACSBRIDGE_SPOOL_ABOVE``), then writes it, behind
the preamble and the file meta, to a temporary file in storage's ``.incoming`` folder, so a
receiver's memory no longer grows with the instance. A write that fails (disk full or
read-only) is remembered, the partial file removed, and the rest of the data set read and
dropped: the handler answers 0xA700 and the association goes on.

The swap wraps ``DIMSEServiceProvider.receive_primitive`` of the association (an instance
attribute; pynetdicom's code runs unchanged) and reads the message's ``command_set`` and
``data_set``: pynetdicom 3.0's attributes, checked by :func:`install`, which leaves any other
version alone (then everything stays in memory, as before).

Data set fragments no spool takes (sent before any command, after a command that is not a C-STORE
request, or after one whose file meta cannot be packed), and a command still incomplete, stay in
pynetdicom's ``BytesIO``; past :func:`in_memory_bound` bytes the association is aborted as for an
invalid PDU (Evt19), or a peer could grow a receiver without end. An association that ends with a data set
half received, or with a complete one never handled, has its spooled files removed when its thread ends.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any, Callable

from pacsbridge.shared.dicom.filemeta import PREAMBLE, encode_file_meta

__all__ = ["Spool", "install", "in_memory_bound"]

log = logging.getLogger(__name__)

#: ``CommandField`` of a C-STORE request
C_STORE_RQ = 0x0001
#: Smallest bound on a data set held in memory that no spool takes (see :func:`in_memory_bound`).
IN_MEMORY_FLOOR = 16 << 20


def in_memory_bound(limit: int) -> int:
    """Bytes of data set fragments kept in memory when no spool takes them: ``limit``
    (``PACSBRIDGE_SPOOL_ABOVE``), at least :data:`IN_MEMORY_FLOOR` (a C-STORE whose file meta our
    packer cannot write is still stored, through pydicom, as before)."""
    return max(limit, IN_MEMORY_FLOOR)


class _Drop(io.BytesIO):
    """Where the rest of a refused message's data goes: nowhere."""

    def write(self, data: Any) -> int:  # type: ignore[override]
        return len(data)


class Spool(io.BytesIO):
    """A data set buffer: memory up to ``limit`` bytes, then a file (``head`` + data set).

    Parameters
    ----------
    limit : int
        Bytes kept in memory; 0 writes every data set to a file.
    temp_file : callable
        Returns ``(fd, path)`` of a new temporary file (:meth:`Storage.temp_file`).
    head : bytes
        Preamble and file meta, written before the data set when it goes to a file.
    """

    def __init__(self, limit: int, temp_file: Callable[[], tuple[int, str]], head: bytes) -> None:
        super().__init__()
        self.limit = limit
        self.temp_file = temp_file
        self.head = head
        self.fd = -1
        self.path = ""
        self.size = 0  # data set bytes received
        self.error: OSError | None = None

    @property
    def spilled(self) -> bool:
        """The data set went to a file (or failed trying: see :attr:`error`)."""
        return bool(self.path) or self.error is not None

    def write(self, data: Any) -> int:  # type: ignore[override]
        n = len(data)
        self.size += n
        if self.error is not None:  # the rest of a data set that cannot be stored: read and drop
            return n
        if self.fd < 0:
            if self.tell() + n <= self.limit:
                return super().write(data)
            self._spill()
            if self.error is not None:
                return n
        try:
            self._write_all(data)
        except OSError as exc:
            self._fail(exc)
        return n

    def _write_all(self, data: Any) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def _spill(self) -> None:
        try:
            self.fd, self.path = self.temp_file()
            self._write_all(self.head)
            with self.getbuffer() as held:
                self._write_all(held)
        except OSError as exc:
            self._fail(exc)
        self.seek(0)
        self.truncate(0)  # memory back: from here on the file has it

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        self.discard()

    def finish(self) -> str:
        """Close the file of a spilled data set; returns its path (kept)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return self.path

    def discard(self) -> None:
        """Close and remove the file, if any (refused, failed, or moved into place already)."""
        self.finish()
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = ""

    def __del__(self) -> None:  # an association aborted mid data set: no descriptor left open
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass


def install(assoc: Any, limit: int, temp_file: Callable[[], tuple[int, str]]) -> bool:
    """Spool the data sets of C-STORE requests received on ``assoc`` (see the module docstring).

    Call before the association starts (``EVT_CONN_OPEN``). Returns False, changing nothing,
    where pynetdicom is not the 3.0 this follows.
    """
    import pynetdicom

    dimse: Any = getattr(assoc, "dimse", None)
    if not str(pynetdicom.__version__).startswith("3.0.") or not hasattr(dimse, "receive_primitive") \
            or not hasattr(dimse, "msg_queue"):
        return False
    receive = dimse.receive_primitive
    bound = in_memory_bound(limit)

    def refuse(msg: Any, held: int) -> None:
        log.warning("association from %s aborted: %d bytes of command or data set that no C-STORE "
                    "request announced", getattr(assoc.requestor, "address", "?"), held)
        msg.data_set = _Drop()
        msg.encoded_command_set = _Drop()
        dimse.dul.event_queue.put("Evt19")  # as pynetdicom does for an invalid message: A-ABORT, close

    def held(msg: Any) -> int:
        """Bytes of ``msg`` in memory: its command so far and its data set."""
        return sum(b.tell() for b in (msg.data_set, getattr(msg, "encoded_command_set", None)) if b is not None)

    def receive_and_spool(primitive: Any) -> None:
        receive(primitive)
        msg = dimse.message  # a message still being received
        if msg is None or isinstance(msg.data_set, (Spool, _Drop)):
            return
        command = getattr(msg, "command_set", None)
        if command is None or getattr(command, "CommandField", None) != C_STORE_RQ \
                or getattr(command, "CommandDataSetType", 0x0101) == 0x0101:
            if held(msg) > bound:
                refuse(msg, held(msg))
            return
        try:
            syntax = assoc._accepted_cx[msg.context_id].transfer_syntax[0]
            head = PREAMBLE + encode_file_meta(command.AffectedSOPClassUID, command.AffectedSOPInstanceUID, syntax)
        except (ValueError, AttributeError, KeyError, UnicodeError):
            # a command our packer cannot write: this one stays in memory, as before, up to the bound
            if held(msg) > bound:
                refuse(msg, held(msg))
            return
        spool = Spool(limit, temp_file, head)
        with msg.data_set.getbuffer() as received:  # the fragments of this PDU already read
            spool.write(received)
        msg.data_set = spool

    run = assoc.run

    def run_then_discard() -> None:
        try:
            run()
        finally:
            discard_pending(dimse)

    dimse.receive_primitive = receive_and_spool
    assoc.run = run_then_discard
    return True


def discard_pending(dimse: Any) -> None:
    """Remove the spooled files of an association that ended (its DUL thread stopped): the data set
    it was receiving, and complete C-STORE requests it never handled."""
    pending = [getattr(dimse.message, "data_set", None)]
    with dimse.msg_queue.mutex:
        pending += [getattr(item[1], "DataSet", None) for item in dimse.msg_queue.queue
                    if isinstance(item, tuple) and len(item) == 2]
    for data_set in pending:
        if isinstance(data_set, Spool):
            data_set.discard()
