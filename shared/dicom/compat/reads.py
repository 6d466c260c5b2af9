"""The one replacement of pynetdicom's ``AssociationSocket.recv``: larger reads, a deadline per PDU read, bounds.

Used by the listener (through :func:`.reactor.install` or :func:`bounded_reads`) and by our own
associations (:func:`.requestor.deadline_reads_for`), which add a :class:`Watch` to learn what
the peer sent before it stalled.

pynetdicom reads a PDU in two calls (``DULServiceProvider._read_pdu_data``: the 6-byte header,
then the length it announces, even 0) and each blocks until it has every byte; a ``TimeoutError``
or ``OSError`` from either closes the connection (Evt17). :func:`deadline_reads` takes a read of 6
bytes for a header, and the read that follows it, of the length it announced, for its body.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from typing import Any, Protocol

from . import check

__all__ = ["deadline_reads", "bounded_reads", "largest_pdu", "Watch", "RECV_CHUNK", "RECV_TICK", "PDU_FLOOR",
           "MAX_PDVS"]

#: Bytes per ``recv()`` (pynetdicom reads 4096).
RECV_CHUNK = 32768
#: Longest a blocked ``recv()`` waits in the kernel before the deadline of its read is looked at.
RECV_TICK = 1.0
#: The largest PDU read when we announced a smaller maximum (an A-ASSOCIATE-RQ with many contexts
#: may exceed a small one; the maximum binds only P-DATA).
PDU_FLOOR = 1 << 20
#: Most PDVs a P-DATA-TF may carry: senders put one or two in a PDU, and pynetdicom decodes each into
#: Python objects (a 4 MiB PDU of one-byte PDVs: 600,000 of them, 134 MB and 2.4 s of CPU).
MAX_PDVS = 1024


class Watch(Protocol):
    """What a caller may learn from the reads (``shared.dicom.dimse``'s ``_Net``).

    ``pdu``: type and length of the last PDU header read; ``peer_aborted``: that header was an
    A-ABORT; ``stalled``: ``(type, got, length, seconds)`` of the read that missed its deadline
    (``length`` 0: the header itself).
    """

    pdu: tuple[int, int] | None
    peer_aborted: bool
    stalled: tuple[int, int, int, float] | None


def largest_pdu(assoc: Any) -> int | None:
    """The largest PDU body ``assoc`` accepts from its peer: the maximum we announced (at least
    :data:`PDU_FLOOR`), or None when we announced none (0, unlimited)."""
    ours = assoc.acceptor if getattr(assoc, "is_acceptor", False) else assoc.requestor
    announced = getattr(ours, "maximum_length", 0) or 0
    return max(int(announced), PDU_FLOOR) if announced else None


def _too_many_pdvs(body: bytearray, most: int) -> bool:
    """Whether the PDV items of a P-DATA-TF body number more than ``most`` (walks at most that many)."""
    pos, end = 0, len(body)
    for _ in range(most):
        if pos + 4 > end:
            return False
        pos += 4 + struct.unpack_from(">L", body, pos)[0]
    return pos + 4 <= end


def _set_timeouts(raw: socket.socket, receive: float, send: float) -> bool:
    """``SO_RCVTIMEO`` / ``SO_SNDTIMEO``: once the socket is blocking, a blocked ``recv()`` / ``send()``
    returns ``EAGAIN`` after that long (a ``BlockingIOError``), at no cost while data flows (unlike
    ``settimeout()``, which adds a ``poll()`` before every call). A requestor's socket still has its
    connection timeout when this runs; pynetdicom makes it blocking once connected, and the options hold."""

    def timeval(seconds: float) -> bytes:
        whole = int(seconds)
        return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))

    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(receive))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(send))
    except OSError:  # closed meanwhile
        return False
    return True


def _is_tls(assoc_socket: Any) -> bool:
    if getattr(assoc_socket, "tls_args", None):  # a requestor's socket is wrapped only when it connects
        return True
    try:
        import ssl
    except ImportError:  # pragma: no cover
        return False
    return isinstance(getattr(assoc_socket, "socket", None), ssl.SSLSocket)


def deadline_reads(assoc_socket: Any, timeout: float | None = None, *, largest: int | None = None,
                   max_pdvs: int | None = MAX_PDVS, tick: float = RECV_TICK, watch: Watch | None = None) -> bool:
    """Replace ``assoc_socket.recv`` (pynetdicom's ``AssociationSocket``) with ours; False, changing
    nothing, on a TLS socket (an ``SSLSocket`` buffers what the kernel's timeouts cannot see).

    Same contract as pynetdicom's: blocks until ``nr_bytes`` are read, returns what came before the
    peer closed, lets socket errors out. Differences:

    - :data:`RECV_CHUNK` bytes per ``recv()`` (stock: 4096; 128 calls, bytes objects and appends for
      each 512 kB instance, the largest single item in a profile of the no-op SCP). Larger chunks, or
      one buffer of the PDU's size, were tried and cost more (glibc then returns and re-faults the big
      buffers: ``madvise`` per instance).
    - With ``timeout`` (the association's network timeout), a PDU must be read whole within that time
      of its first byte (its header, then its body: one deadline for both), and a header must come
      within that time of the read's start, whatever the peer drips, else :class:`TimeoutError`
      (pynetdicom: connection closed). A deadline per read let a dripped PDU last twice the timeout.
      Stock blocks for ever once a PDU has begun. The wait is the kernel's
      (``SO_RCVTIMEO`` of ``min(tick, timeout)``), so nothing is added while data flows; a ``send()``
      to a peer that stopped reading fails after ``timeout`` likewise (``SO_SNDTIMEO``).
    - A read longer than ``largest`` bytes (a PDU bigger than the maximum we announced; pynetdicom
      would gather it whole in memory, up to the 4 GB a header can claim) fails at once with
      ``EMSGSIZE``, which closes the connection; so does a P-DATA-TF of more than ``max_pdvs`` PDVs.
    - ``watch`` (if given) learns each header read and, on a missed deadline, what had come.
    """
    if _is_tls(assoc_socket):
        return False
    raw = getattr(assoc_socket, "socket", None)
    bounded = bool(timeout) and isinstance(raw, socket.socket) and _set_timeouts(raw, min(tick, timeout), timeout)  # type: ignore[arg-type, type-var]
    limit = float(timeout or 0)
    # the header just read: the next read is its body when it asks for the length that header announced
    header: list[tuple[int, int] | None] = [None]
    # when the first byte of the PDU being read came (the body's deadline counts from it)
    first_byte: list[float | None] = [None]

    def recv(nr_bytes: int) -> bytearray:
        body_of = header[0] if header[0] is not None and header[0][1] == nr_bytes else None
        if largest is not None and nr_bytes > largest:
            raise OSError(errno.EMSGSIZE, f"a PDU of {nr_bytes} bytes, larger than the {largest} we accept")
        out = read(nr_bytes, body_of, first_byte[0] if body_of is not None else None)
        header[0] = None
        if body_of is None:
            if nr_bytes == 6 and len(out) == 6:
                kind, _, length = struct.unpack(">BBL", out)
                header[0] = (kind, length)
                if watch is not None:
                    watch.pdu = (kind, length)
                    if kind == 0x07:
                        watch.peer_aborted = True
        elif max_pdvs is not None and body_of[0] == 0x04 and _too_many_pdvs(out, max_pdvs):
            raise OSError(errno.EMSGSIZE, f"a P-DATA-TF of more than {max_pdvs} PDVs")
        return out

    def read(nr_bytes: int, body_of: tuple[int, int] | None, pdu_began: float | None) -> bytearray:
        sock = assoc_socket.socket
        out = bytearray()
        start = pdu_began if pdu_began is not None else time.monotonic()
        deadline = start + limit if bounded else None
        first_byte[0] = None
        while len(out) < nr_bytes:
            try:
                data = sock.recv(min(RECV_CHUNK, nr_bytes - len(out)))
            except BlockingIOError:  # SO_RCVTIMEO: nothing came for a tick
                data = None
            if data == b"":  # the peer closed: what we have (pynetdicom's callers check the length)
                return out
            if data:
                if first_byte[0] is None:
                    first_byte[0] = time.monotonic()
                out += data
            # also after data: a peer dripping bytes faster than a tick never lets recv() time out
            if deadline is not None and len(out) < nr_bytes and time.monotonic() >= deadline:
                if watch is not None:
                    kind, length = (body_of[0], nr_bytes) if body_of is not None else (out[0] if out else 0, 0)
                    watch.stalled = (kind, len(out), length, limit)
                raise TimeoutError(f"no complete PDU data within {limit:g} s ({len(out)} of {nr_bytes} bytes)")
        return out

    assoc_socket.recv = recv
    return True


def bounded_reads(assoc: Any) -> None:
    """Give ``assoc`` (an acceptor whose reactor stays pynetdicom's own) the reads of :func:`deadline_reads`:
    its network timeout per PDU read, no PDU larger than we accept, no P-DATA of too many PDVs."""
    if check("deadline reads", assoc, "dul", "network_timeout"):
        deadline_reads(assoc.dul.socket, assoc.network_timeout, largest=largest_pdu(assoc))
