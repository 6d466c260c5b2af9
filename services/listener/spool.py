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

The swap is made by ``shared.dicom.compat.acceptor.divert_data_sets`` (it wraps pynetdicom's
``DIMSEServiceProvider.receive_primitive`` of the association), which leaves a pynetdicom it does
not follow alone (then everything stays in memory, as before).

Data set fragments no spool takes (sent before any command, after a command that is not a C-STORE
request, or after one whose file meta cannot be packed), and a command still incomplete, stay in
pynetdicom's ``BytesIO``; past :func:`in_memory_bound` bytes the association is aborted as for an
invalid PDU (Evt19), or a peer could grow a receiver without end. An association that ends with a data set
half received, or with a complete one never handled, has its spooled files removed when its thread ends.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable

from pacsbridge.shared.dicom.compat.acceptor import divert_data_sets
from pacsbridge.shared.dicom.filemeta import PREAMBLE, encode_file_meta

__all__ = ["Spool", "install", "in_memory_bound"]

#: Smallest bound on a data set held in memory that no spool takes (see :func:`in_memory_bound`).
IN_MEMORY_FLOOR = 16 << 20


def in_memory_bound(limit: int) -> int:
    """Bytes of data set fragments kept in memory when no spool takes them: ``limit``
    (``PACSBRIDGE_SPOOL_ABOVE``), at least :data:`IN_MEMORY_FLOOR` (a C-STORE whose file meta our
    packer cannot write is still stored, through pydicom, as before)."""
    return max(limit, IN_MEMORY_FLOOR)


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
    where pynetdicom is not the version the compatibility layer follows (said once).
    """

    def divert(command: Any, syntax: str) -> Spool:
        # a command our packer cannot write raises: that data set stays in memory, as before, up to the bound
        head = PREAMBLE + encode_file_meta(command.AffectedSOPClassUID, command.AffectedSOPInstanceUID, syntax)
        return Spool(limit, temp_file, head)

    return divert_data_sets(assoc, divert, in_memory_bound(limit), lambda spool: spool.discard())
