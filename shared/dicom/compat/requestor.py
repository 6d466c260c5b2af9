"""Our associations as requestor (``shared.dicom.dimse``): the AE socket override, deadline reads, interrupting.

``ApplicationEntity._create_socket`` is the one point of ``ApplicationEntity.associate`` that sees
the new association before ``assoc.request()`` starts its DUL thread (``EVT_CONN_OPEN`` fires later,
inside that running thread). :class:`AE` overrides it to

- swap the TCP socket for a :class:`Socket`, which remembers why ``connect()`` failed (pynetdicom
  keeps only a log line);
- install the waiting reactors (:func:`.reactor.install_on_request`) and, just before the request,
  :func:`deadline_reads_for`: every PDU read has ``net.timeout`` seconds, and ``net`` learns what the
  peer sent before it stalled.

``net`` is the caller's record of the connection (``shared.dicom.dimse._Net``): it must have
``timeout``, ``connect_error``, ``raw`` and the attributes of :class:`.reads.Watch`.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from pynetdicom import AE as _PublicAE

from . import check, fallback
from .reactor import install_on_request
from .reads import deadline_reads

__all__ = ["AE", "Socket", "deadline_reads_for", "stop", "RECV_SLICE"]

#: A blocked ``recv()`` of our associations returns after this long (SO_RCVTIMEO) to look at the PDU's deadline.
RECV_SLICE = 0.5


class Socket(socket.socket):
    """Our TCP socket to a node: remembers why ``connect()`` failed (pynetdicom keeps only a log line)."""

    net: Any = None

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            if self.net is not None:
                self.net.connect_error = exc
            raise


def deadline_reads_for(assoc: Any, net: Any) -> None:
    """:func:`.reads.deadline_reads` on ``assoc``'s socket: ``net.timeout`` per PDU read, looked at every
    :data:`RECV_SLICE`, ``net`` watching. No size or PDV bound: we announce no maximum PDU (0,
    ``shared.dicom.dimse``: pynetdicom reads large PDUs much faster), and what we asked a node for
    is ours to read."""
    deadline_reads(assoc.dul.socket, net.timeout, max_pdvs=None, tick=RECV_SLICE, watch=net)


class AE(_PublicAE):
    """An AE whose associations get the waiting reactors of :mod:`.reactor` (unless ``PACSBRIDGE_REACTOR=poll``)
    and deadlines on their reads (:func:`deadline_reads_for`); see the module docstring."""

    def __init__(self, *args: Any, net: Any, on_create: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._net = net
        self._on_create = on_create
        self._ours = check("requestor deadlines", self, "_create_socket")

    def _create_socket(self, assoc: Any, *args: Any, **kwargs: Any) -> Any:
        sock = super()._create_socket(assoc, *args, **kwargs)
        net = self._net
        assoc._pacsbridge_net = net
        if self._ours:
            raw = getattr(sock, "socket", None)
            if type(raw) is socket.socket and not getattr(sock, "tls_args", None):
                timeout = raw.gettimeout()
                ours = Socket(raw.family, raw.type, raw.proto, fileno=raw.detach())
                ours.settimeout(timeout)
                ours.net = net
                sock.socket = ours
                net.raw = ours
            install_on_request(assoc, prepare=lambda a: deadline_reads_for(a, net))
        if self._on_create is not None:
            self._on_create(assoc)
        return sock


def stop(assoc: Any, raw: socket.socket | None, grace: float) -> None:
    """After an abort: wait up to ``grace`` seconds for the DUL thread to end, shut the socket down (``raw``,
    or the association's), which ends a ``connect()`` or a blocked read, and wake a request waiting for
    its answer with no answer (pynetdicom's own signal: ``(None, None)`` on the DIMSE queue)."""
    dul = getattr(assoc, "dul", None)
    deadline = time.monotonic() + grace
    while grace and dul is not None and dul.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if raw is None:
        raw = getattr(getattr(dul, "socket", None), "socket", None)
    if raw is not None:
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:  # not connected (yet, or any more)
            pass
    try:
        assoc.dimse.msg_queue.put((None, None))
    except Exception as exc:  # another pynetdicom
        fallback("interrupting a request", f"no DIMSE queue to wake: {exc!r}")
