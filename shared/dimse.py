"""The DIMSE client side: associate with a node, C-ECHO, C-FIND (pynetdicom as SCU).

Every association is opened by :func:`associate`, which turns pynetdicom's
quiet failures (an association object that is simply not established) into
a :class:`~pacsbridge.shared.errors.DimseError` that says what happened:
refused (with the peer's result, source and reason), aborted, timed out or
unreachable. The maximum PDU we accept is unlimited (``0``): pynetdicom
reads large PDUs much faster (see ``notes/pynetdicom-speed.md``).

Callers that must respect a node's limits wrap :func:`associate` in
:class:`~pacsbridge.shared.throttle.NodeSlots` (the retrieve and push jobs do).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from .errors import DimseError
from .reactor import install_on_request
from .query import Query

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from .jobs import Node

__all__ = ["associate", "echo", "find", "find_all", "FindResult", "to_json_value",
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


class _AE(AE):
    """An AE whose associations get the waiting reactors of :mod:`.reactor` (unless ``PACSBRIDGE_REACTOR=poll``).

    ``_create_socket`` is the one point of ``ApplicationEntity.associate``
    that sees the new association before ``assoc.request()`` starts its DUL
    thread (``EVT_CONN_OPEN`` fires later, inside that running thread).
    """

    def _create_socket(self, assoc: Any, *args: Any, **kwargs: Any) -> Any:
        sock = super()._create_socket(assoc, *args, **kwargs)
        install_on_request(assoc)
        return sock


@contextmanager
def associate(node: "Node", calling_ae: str, contexts: Sequence[PresentationContext] | None = None, *,
              timeout: float = 30.0, ext_neg: Any = None,
              evt_handlers: Any = None) -> Iterator["Association"]:
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
        ACSE, DIMSE and network timeout, seconds.
    ext_neg, evt_handlers
        Passed to :meth:`pynetdicom.ae.ApplicationEntity.associate` (SCP/SCU
        role selection for C-GET, EVT_C_STORE handlers ...).

    Raises
    ------
    DimseError
        The node refused the association (result, source and reason are
        named), aborted it, did not answer in time, or could not be reached.
    """
    ae = _AE(ae_title=calling_ae)
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
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, max_pdu=0,
                             ext_neg=ext_neg, evt_handlers=handlers)
    except (OSError, ValueError) as exc:  # a host name that does not resolve, a bad address
        raise DimseError(f"{_where(node)} is unreachable: {exc}") from None
    if not assoc.is_established:
        where = _where(node)
        if assoc.is_rejected:
            rsp = assoc.acceptor.primitive
            detail = (f"{rsp.result_str}, source: {rsp.source_str}, reason: {rsp.reason_str}"
                      if rsp is not None else "no reason given")
            message = (f"{where} rejected the association from calling AE {calling_ae!r}: {detail} "
                       f"(is {calling_ae!r} configured on the node?)")
        elif not connected:
            message = f"{where} is unreachable: no TCP connection within {ae.connection_timeout:g} s"
        elif assoc.is_aborted:
            message = (f"{where} aborted the association request from calling AE {calling_ae!r} "
                       "(wrong called AE title, or no acceptable presentation context)")
        else:
            message = f"{where} did not accept the association within {timeout:g} s"
        assoc.kill()
        raise DimseError(message)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.kill()


def lost(node: "Node", assoc: "Association", what: str, timeout: float) -> DimseError:
    """The error for a request that got no final answer (aborted, dropped or timed out)."""
    calling = assoc.requestor.ae_title
    deadline = time.monotonic() + 2.0  # an abort may be flagged a moment after the empty answer
    while assoc.is_established and not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    if assoc.is_aborted:
        return DimseError(f"{_where(node)} aborted the association during {what} from calling AE "
                          f"{calling!r} (is {calling!r} allowed to do this on the node?)")
    if not assoc.is_established:
        return DimseError(f"{_where(node)}: the connection was lost during {what}")
    return DimseError(f"{_where(node)}: no answer to {what} within {timeout:g} s")


def echo(node: "Node", calling_ae: str, timeout: float = 10.0) -> float:
    """C-ECHO the node; the round trip (association included) in seconds.

    Raises
    ------
    DimseError
        The association failed, or the echo got no answer or a failure status.
    """
    start = time.perf_counter()
    with associate(node, calling_ae, [build_context(Verification)], timeout=timeout) as assoc:
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
