"""The DIMSE client side: associate with a node, C-ECHO, C-FIND (pynetdicom as SCU).

Every association is opened by :func:`associate`, which turns pynetdicom's
quiet failures (an association object that is simply not established) into
a :class:`~pacsbridge.shared.core.errors.DimseError` that says what happened:
refused (with the peer's result, source and reason), aborted, timed out or
unreachable. The maximum PDU we accept is unlimited (``0``): pynetdicom
reads large PDUs much faster (docs/performance.md, "pynetdicom as a C-STORE SCP").

Every association has deadlines: the TCP connection (at most 10 s), the
ACSE and DIMSE answers, and every PDU read (``compat.requestor.deadline_reads_for``): a peer
that sends part of a PDU and then holds the connection (half an
A-ASSOCIATE-AC) is dropped once ``timeout`` passes, which pynetdicom alone
never does (its ``recv`` blocks for as long as the peer keeps the
connection). ``cancel`` (a :class:`threading.Event`) and ``deadline`` (seconds
for the whole association) interrupt an association waiting on the network
(:func:`interrupt`).

Callers that must respect a node's limits wrap :func:`associate` in
:class:`~pacsbridge.shared.nodes.throttle.NodeSlots` (the retrieve and push jobs do).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # (made at import time)
    StudyRootQueryRetrieveInformationModelFind, Verification)

from pacsbridge.shared.core.errors import DimseError
from pacsbridge.shared.dicom.compat.requestor import AE as _AE, stop
from pacsbridge.shared.dicom.query import Query

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from pacsbridge.shared.dicom.node import Node

__all__ = ["associate", "interrupt", "echo", "find", "find_all", "FindResult", "to_json_value",
           "STATUS_SUCCESS", "PENDING", "describe_status", "lost"]

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
#: C-FIND / C-MOVE / C-GET pending statuses.
PENDING = (0xFF00, 0xFF01)
#: C-FIND / C-MOVE cancelled (matching or sub-operations terminated by a C-CANCEL).
STATUS_CANCEL = 0xFE00


def describe_status(status: int) -> str:
    """A DIMSE status as ``0xC000 (Failure)`` text."""
    if status == STATUS_SUCCESS:
        kind = "Success"
    elif status in PENDING:
        kind = "Pending"
    elif status == STATUS_CANCEL:
        kind = "Cancel"
    elif status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        kind = "Warning"
    else:
        kind = "Failure"
    return f"0x{status:04X} ({kind})"


def _where(node: "Node") -> str:
    return f"node {node.name!r} ({node.ae_title}@{node.host}:{node.port})"


#: pynetdicom's names of the PDU types (PS3.8 9.3), for messages about a PDU cut short.
PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
             0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
#: How long after an interrupt (cancel, deadline) we wait for pynetdicom to close before closing the socket.
ABORT_GRACE = 0.5


class _Net:
    """What happened on one association's connection, for deadlines and for error messages.

    ``connect_error``: why the TCP connection failed (pynetdicom logs it and drops it);
    ``pdu``: type and length of the PDU being read; ``stalled``: ``(type, got, length, seconds)``
    of a PDU the peer stopped sending midway; ``peer_aborted``: an A-ABORT came from the peer;
    ``interrupted``: why :func:`interrupt` cut the association (``"cancelled"``, ``"deadline"``).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.connect_error: OSError | None = None
        self.pdu: tuple[int, int] | None = None
        self.stalled: tuple[int, int, int, float] | None = None
        self.peer_aborted = False
        self.interrupted = ""
        self.raw: socket.socket | None = None

    def stall_text(self) -> str:
        if self.stalled is None:
            return ""
        kind, got, length, seconds = self.stalled
        name = PDU_NAMES.get(kind, f"PDU of type 0x{kind:02X}") if kind else "PDU"
        if not length:
            return f"sent {got} of the 6 header bytes of a {name} and then nothing for {seconds:g} s"
        return f"sent only {got} of the {length} bytes of its {name} and then nothing for {seconds:g} s"


def interrupt(assoc: Any, why: str = "cancelled") -> None:
    """Stop ``assoc`` now, from any thread, whatever it waits for (connect, ACSE, a DIMSE answer).

    An established association is aborted (A-ABORT, if its DUL can still send it); then
    the socket is shut down, which ends a ``connect()`` or a blocked read, and a request
    waiting for its answer is woken with no answer (pynetdicom's own signal). The
    reason is kept for the error message (:func:`lost`, :func:`associate`).
    """
    net = getattr(assoc, "_pacsbridge_net", None)
    if net is not None and not net.interrupted:
        net.interrupted = why
    grace = 0.0
    if assoc.is_established:
        try:
            assoc.abort(block=False)
        except Exception:  # already gone
            log.debug("abort failed", exc_info=True)
        grace = ABORT_GRACE
    stop(assoc, net.raw if net is not None else None, grace)


class _Watch:
    """A thread that calls :func:`interrupt` when ``cancel`` is set or ``deadline`` (monotonic) passes."""

    POLL = 0.1

    def __init__(self, cancel: threading.Event | None, deadline: float | None, grace: float = 0.0) -> None:
        self.cancel, self.deadline, self.grace = cancel, deadline, grace
        self.done = threading.Event()
        self.assoc: Any = None
        self.thread: threading.Thread | None = None

    def start(self, assoc: Any) -> None:
        self.assoc = assoc
        if self.cancel is None and self.deadline is None:
            return
        self.thread = threading.Thread(target=self._run, name="dimse-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.POLL):
            if self.cancel is not None and self.cancel.is_set():
                if self.grace and self.assoc.is_established and self.done.wait(self.grace):
                    return  # the caller ended the association itself (a C-CANCEL was answered)
                interrupt(self.assoc, "cancelled")
                return
            if self.deadline is not None and time.monotonic() > self.deadline:
                interrupt(self.assoc, "deadline")
                return

    def stop(self) -> None:
        self.done.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(5)


def _connect_failure(node: "Node", net: _Net, connection_timeout: float) -> str:
    where = _where(node)
    exc = net.connect_error
    if exc is None or isinstance(exc, (TimeoutError, socket.timeout)):
        return (f"{where} is unreachable: no TCP connection within {connection_timeout:g} s "
                "(the host is down, or a firewall drops the connection)")
    if isinstance(exc, ConnectionRefusedError):
        return (f"{where} is unreachable: connection refused (nothing listens on port {node.port} "
                "of that host, or a firewall rejects the connection)")
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN):
        return f"{where} is unreachable: {exc.strerror or exc} (no route to that host)"
    return f"{where} is unreachable: {exc.strerror or exc}"


def _interrupted_text(net: _Net, deadline: float | None) -> str:
    if net.interrupted == "cancelled":
        return "cancelled"
    what = f"no answer within the {deadline:g} s deadline" if deadline else "deadline passed"
    stall = net.stall_text()
    return f"{what} ({stall})" if stall else what


@contextmanager
def associate(node: "Node", calling_ae: str, contexts: Sequence[PresentationContext] | None = None, *,
              timeout: float = 30.0, ext_neg: Any = None, evt_handlers: Any = None,
              cancel: threading.Event | None = None, deadline: float | None = None,
              cancel_grace: float = 0.0) -> Iterator["Association"]:
    """An established association with ``node``, released on exit.

    Parameters
    ----------
    node : Node
        The peer (its AE title is the called AE).
    calling_ae : str
        Our AE title (the node must know it).
    contexts : sequence of PresentationContext, optional
        Requested contexts; Verification and Study Root C-FIND by default.
    timeout : float
        ACSE, DIMSE and network timeout, and the longest wait for the rest of a
        PDU the peer started to send, seconds. The TCP connection gets
        ``min(timeout, 10)``.
    ext_neg, evt_handlers
        Passed to :meth:`pynetdicom.ae.ApplicationEntity.associate` (SCP/SCU
        role selection for C-GET, EVT_C_STORE handlers ...).
    cancel : threading.Event, optional
        Once set, the association is interrupted wherever it waits (see
        :func:`interrupt`): the request waiting on it ends without an answer.
    cancel_grace : float
        Once established, the association is interrupted only this many seconds
        after ``cancel`` (the caller first asks the peer to stop: C-CANCEL).
    deadline : float, optional
        Seconds for the whole association, from now (None: only the timeouts
        above); past it the association is interrupted likewise.

    Raises
    ------
    DimseError
        The node refused the association (result, source and reason are
        named), aborted it, did not answer in time, sent part of its answer
        and stalled, could not be reached (refused, timed out, unresolved
        name), or ``cancel`` was set meanwhile.
    """
    where = _where(node)
    if not getattr(node, "has_dimse", True):
        raise DimseError(f"node {node.name!r} speaks DICOMweb only (no AE title, host and port): it cannot be "
                         "used over DIMSE (C-ECHO, C-FIND, C-MOVE, C-GET, C-STORE)")
    if cancel is not None and cancel.is_set():
        raise DimseError(f"{where}: cancelled before the association was requested")
    net = _Net(timeout)
    watch = _Watch(cancel, time.monotonic() + deadline if deadline else None, cancel_grace)
    ae = _AE(ae_title=calling_ae, net=net, on_create=watch.start)
    ae.maximum_pdu_size = 0
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    if contexts is None:
        contexts = [build_context(Verification), build_context(StudyRootQueryRetrieveInformationModelFind)]
    ae.requested_contexts = list(contexts)
    connected: list[bool] = []
    handlers = list(evt_handlers or [])
    handlers.append((evt.EVT_CONN_OPEN, lambda event: connected.append(True)))
    try:
        try:
            assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, max_pdu=0,
                                 ext_neg=ext_neg, evt_handlers=handlers)
        except socket.gaierror as exc:
            raise DimseError(f"{where} is unreachable: the host name {node.host!r} does not resolve "
                             f"({exc.strerror or exc})") from None
        except (OSError, ValueError) as exc:  # a bad address
            raise DimseError(f"{where} is unreachable: {exc}") from None
        if assoc.is_established and net.interrupted:  # cancelled while it was being accepted
            assoc.abort()
        if not assoc.is_established:
            if net.interrupted:
                message = f"{where}: association request {_interrupted_text(net, deadline)}"
            elif assoc.is_rejected:
                rsp = assoc.acceptor.primitive
                detail = (f"{rsp.result_str}, source: {rsp.source_str}, reason: {rsp.reason_str}"
                          if rsp is not None else "no reason given")
                message = (f"{where} rejected the association from calling AE {calling_ae!r}: {detail} "
                           f"(is {calling_ae!r} configured on the node?)")
            elif not connected:
                message = _connect_failure(node, net, ae.connection_timeout)
            elif net.stalled is not None:
                message = f"{where} {net.stall_text()} (its answer to our association request)"
            elif net.peer_aborted:
                message = (f"{where} aborted the association request from calling AE {calling_ae!r} "
                           "(wrong called AE title, or no acceptable presentation context)")
            elif net.pdu is None:
                message = f"{where} did not answer the association request within {timeout:g} s"
            else:
                message = f"{where} closed the connection instead of accepting the association"
            assoc.kill()
            raise DimseError(message)
        try:
            yield assoc
        finally:
            if assoc.is_established and not net.interrupted:
                assoc.release()
            else:
                assoc.kill()
    finally:
        watch.stop()


def lost(node: "Node", assoc: "Association", what: str, timeout: float) -> DimseError:
    """The error for a request that got no final answer (aborted, stalled, dropped, cancelled or timed out)."""
    calling = assoc.requestor.ae_title
    net: _Net | None = getattr(assoc, "_pacsbridge_net", None)
    where = _where(node)
    if net is not None and net.interrupted:
        if net.interrupted == "cancelled":
            return DimseError(f"{where}: {what} cancelled")
        return DimseError(f"{where}: {what}: {_interrupted_text(net, None)}")
    deadline = time.monotonic() + 2.0  # an abort may be flagged a moment after the empty answer
    while assoc.is_established and not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    if net is not None and net.stalled is not None:
        return DimseError(f"{where} {net.stall_text()} during {what}")
    if assoc.is_aborted and (net is None or net.peer_aborted):
        return DimseError(f"{where} aborted the association during {what} from calling AE "
                          f"{calling!r} (is {calling!r} allowed to do this on the node?)")
    if not assoc.is_established and not assoc.is_aborted:
        return DimseError(f"{where}: the connection was lost during {what}")
    return DimseError(f"{where}: no answer to {what} within {timeout:g} s")


def echo(node: "Node", calling_ae: str, timeout: float = 10.0, deadline: float | None = None) -> float:
    """C-ECHO the node; the round trip (association included) in seconds.

    Every step has ``timeout`` seconds; the whole echo ``deadline`` (default:
    ``timeout`` + 2 s), so a node answering each step slowly cannot hold the
    caller (an API request) longer.

    Raises
    ------
    DimseError
        The association failed, or the echo got no answer or a failure status.
    """
    start = time.perf_counter()
    with associate(node, calling_ae, [build_context(Verification)], timeout=timeout,
                   deadline=deadline if deadline is not None else timeout + 2.0) as assoc:
        status = assoc.send_c_echo()
        if not status or "Status" not in status:
            raise lost(node, assoc, "C-ECHO", timeout)
        if status.Status != STATUS_SUCCESS:
            raise DimseError(f"{_where(node)}: C-ECHO answered {describe_status(status.Status)}",
                             int(status.Status))
    return time.perf_counter() - start


def to_json_value(elem: Any) -> Any:
    """A data element's value as JSON: str, int, float, list, or None when empty."""
    value = elem.value
    if value is None or value == "" or value == b"":
        return None
    if elem.VR == "SQ":
        return [{e.keyword: to_json_value(e) for e in item if e.keyword} for item in value]
    if isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, MultiValue):
        return [_scalar(v) for v in value]
    return _scalar(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def _as_dict(ds: Dataset) -> dict[str, Any]:
    return {e.keyword: to_json_value(e) for e in ds if e.keyword and e.keyword != "QueryRetrieveLevel"}


class FindResult(list):  # type: ignore[type-arg]
    """The matches of one C-FIND, with how it ended.

    ``status`` is the final DIMSE status; ``truncated`` is True when the
    answer is known to be incomplete (``max_results`` reached, or the peer
    ended with a cancel or warning status).
    """

    status: int = STATUS_SUCCESS
    truncated: bool = False


def find_all(node: "Node", query: Query, calling_ae: str, level: str | None = None, *,
             timeout: float = 30.0, max_results: int = 0, identifier: Dataset | None = None,
             assoc: "Association | None" = None) -> FindResult:
    """:func:`find`, telling whether the answer was cut (see :class:`FindResult`).

    ``identifier`` replaces ``query.to_dataset(level)``; ``assoc`` re-uses an
    open association (with the Study Root C-FIND context).
    """
    ds = identifier if identifier is not None else query.to_dataset(level)
    if assoc is None:
        with associate(node, calling_ae, timeout=timeout) as own:
            return find_all(node, query, calling_ae, level, timeout=timeout, max_results=max_results,
                            identifier=ds, assoc=own)
    out = FindResult()
    responses = assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind, msg_id=1)
    cancelled = False
    for status, answer in responses:
        if not status or "Status" not in status:
            raise lost(node, assoc, "C-FIND", timeout)
        code = int(status.Status)
        if code in PENDING:
            if answer is not None and not cancelled:
                out.append(_as_dict(answer))
                if max_results and len(out) >= max_results:
                    out.truncated = True
                    cancelled = True
                    assoc.send_c_cancel(1, query_model=StudyRootQueryRetrieveInformationModelFind)
            continue
        out.status = code
        if code == STATUS_CANCEL or (code != STATUS_SUCCESS and 0xB000 <= code <= 0xBFFF):
            out.truncated = True
        elif code != STATUS_SUCCESS:
            comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
            raise DimseError(f"{_where(node)}: C-FIND failed with status {describe_status(code)}"
                             f"{comment}", code)
    if max_results and len(out) > max_results:
        del out[max_results:]
    return out


def find(node: "Node", query: Query, calling_ae: str, level: str | None = None, *,
         timeout: float = 30.0, max_results: int = 0) -> list[dict[str, Any]]:
    """C-FIND (Study Root) at ``level`` (default: the query's); one JSON-ready dict per match.

    ``max_results`` (0: all) stops reading after that many matches (the rest
    are cancelled with C-CANCEL).

    Raises
    ------
    DimseError
        The association failed, the peer answered a failure status (named),
        or the answer stopped midway.
    """
    return list(find_all(node, query, calling_ae, level, timeout=timeout, max_results=max_results))
