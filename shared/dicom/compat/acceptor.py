"""The listener's uses of pynetdicom internals: its connection handler, a rejection, the data-set hook.

- :func:`handler_class`: pynetdicom's ``RequestHandler.handle`` (copied), with a callback when the
  connection's association thread ends, whatever the way (release, abort, timeout, error), and
  :func:`closed_before_request` bound.
- :func:`closed_before_request`: a connection closed before its A-ASSOCIATE-RQ (Sta2): pynetdicom's
  DUL stops (AA-5) but tells the association thread nothing, which then waits the whole ACSE timeout.
- :func:`reject`: an A-ASSOCIATE-RJ from ``EVT_REQUESTED`` (``assoc.acse.send_reject``).
- :func:`divert_data_sets`: the data set of each C-STORE request into a buffer of the caller's
  (``services/listener/spool.py``) once its command set is decoded, by wrapping
  ``DIMSEServiceProvider.receive_primitive`` of one association (an instance attribute;
  pynetdicom's code runs unchanged).
"""

from __future__ import annotations

import io
import logging
import weakref
from typing import Any, Callable

from . import check, fallback, supported, version

__all__ = ["handler_class", "closed_before_request", "reject", "divert_data_sets", "C_STORE_RQ"]

log = logging.getLogger(__name__)

#: ``CommandField`` of a C-STORE request
C_STORE_RQ = 0x0001


def closed_before_request(event: Any) -> None:
    """EVT_CONN_CLOSE of an accepted connection: closed before its A-ASSOCIATE-RQ (Sta2), pynetdicom's
    DUL stops (AA-5) but tells the association thread nothing, which then waits the whole ACSE
    timeout for the request, holding the connection's per-address slot: two port checks locked
    their address out for 30 s. ``None`` is what that wait returns on a timeout, so the thread
    ends at once, as it would then."""
    dul = getattr(event.assoc, "dul", None)
    if not check("closed before request", dul, "state_machine", "to_user_queue"):
        return
    if event.assoc.is_acceptor and dul.state_machine.current_state == "Sta2":  # type: ignore[union-attr]
        dul.to_user_queue.put(None)  # type: ignore[union-attr]


def handler_class(on_end: Callable[[str], None] | None = None) -> Any:
    """A ``RequestHandler`` for ``server_class``: pynetdicom's ``handle``, plus ``on_end(address)`` once the
    connection's association thread ends, or at once when it could not start."""
    from pynetdicom import evt
    from pynetdicom.transport import RequestHandler

    if not hasattr(RequestHandler, "_create_association"):
        # pynetdicom's own handle(), which tells nobody when the association ends: the slot is given back
        # as soon as the association thread started (the per-address limit then counts connections being
        # set up only; never a slot that stays taken)
        fallback("connection handler", f"pynetdicom {version()} has no RequestHandler._create_association; "
                                       "the per-address association limit is not enforced")

        class Stock(RequestHandler):
            def handle(self) -> None:
                try:
                    super().handle()
                finally:
                    if on_end is not None:
                        on_end(self.client_address[0])

        return Stock

    # used on any release that has _create_association (this copy only adds the callback): without it,
    # per-address slots would never be given back

    class Handler(RequestHandler):
        def handle(self) -> None:
            address = self.client_address[0]
            try:
                assoc = self._create_association()
                run = assoc.run

                def run_then_release() -> None:
                    try:
                        run()
                    finally:
                        if on_end is not None:
                            on_end(address)

                assoc.run = run_then_release  # type: ignore[method-assign]
                assoc.bind(evt.EVT_CONN_CLOSE, closed_before_request)
                evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
                assoc.start()
            except BaseException:
                if on_end is not None:
                    on_end(address)
                raise

    return Handler


def reject(assoc: Any, result: int, source: int, reason: int) -> None:
    """Send an A-ASSOCIATE-RJ (from ``EVT_REQUESTED``); the caller then kills the association."""
    assoc.acse.send_reject(result, source, reason)


class _Drop(io.BytesIO):
    """Where the rest of a refused message's data goes: nowhere."""

    def write(self, data: Any) -> int:  # type: ignore[override]
        return len(data)


def divert_data_sets(assoc: Any, divert: Callable[[Any, str], io.BytesIO | None], bound: int,
                     discard: Callable[[Any], None]) -> bool:
    """Hand the data set of each C-STORE request received on ``assoc`` to a buffer of the caller's.

    Call before the association starts (``EVT_CONN_OPEN``). Once a C-STORE request's command set is
    decoded, ``divert(command_set, transfer_syntax)`` returns the buffer that takes its data set from
    then on (what came before is written to it first), or None to keep it in pynetdicom's
    ``BytesIO``; an exception from it (ValueError, AttributeError, KeyError, UnicodeError: a command
    it cannot use) counts as None. Bytes no buffer of the caller takes (a data set sent before any
    command, after a command that is not a C-STORE request, or kept) and a command still
    incomplete are bounded: past ``bound`` bytes the association is aborted as for an invalid PDU
    (Evt19), or a peer could grow a receiver without end. When the association's thread ends,
    ``discard(buffer)`` is called for each diverted buffer never handed to a handler (the data set
    half received, complete requests not handled).

    Returns False, changing nothing (said once), where pynetdicom is not the version this follows.
    """
    dimse: Any = getattr(assoc, "dimse", None)
    if not supported():
        fallback("data set spool")
        return False
    if not check("data set spool", dimse, "receive_primitive", "msg_queue", "message", "dul") \
            or not check("data set spool", assoc, "_accepted_cx", "run"):
        return False
    receive = dimse.receive_primitive
    diverted: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def refuse(msg: Any, held: int) -> None:
        log.warning("association from %s aborted: %d bytes of command or data set that no C-STORE "
                    "request announced", getattr(assoc.requestor, "address", "?"), held)
        msg.data_set = _Drop()
        msg.encoded_command_set = _Drop()
        dimse.dul.event_queue.put("Evt19")  # as pynetdicom does for an invalid message: A-ABORT, close

    def held(msg: Any) -> int:
        """Bytes of ``msg`` in memory: its command so far and its data set."""
        return sum(b.tell() for b in (msg.data_set, getattr(msg, "encoded_command_set", None)) if b is not None)

    def receive_and_divert(primitive: Any) -> None:
        receive(primitive)
        msg = dimse.message  # a message still being received
        if msg is None or isinstance(msg.data_set, _Drop) or msg.data_set in diverted:
            return
        command = getattr(msg, "command_set", None)
        if command is None or getattr(command, "CommandField", None) != C_STORE_RQ \
                or getattr(command, "CommandDataSetType", 0x0101) == 0x0101:
            if held(msg) > bound:
                refuse(msg, held(msg))
            return
        try:
            syntax = assoc._accepted_cx[msg.context_id].transfer_syntax[0]
            buffer = divert(command, syntax)
        except (ValueError, AttributeError, KeyError, UnicodeError):
            buffer = None
        if buffer is None:  # this one stays in memory, as before, up to the bound
            if held(msg) > bound:
                refuse(msg, held(msg))
            return
        with msg.data_set.getbuffer() as received:  # the fragments of this PDU already read
            buffer.write(received)
        diverted.add(buffer)
        msg.data_set = buffer

    run = assoc.run

    def run_then_discard() -> None:
        try:
            run()
        finally:
            pending = [getattr(dimse.message, "data_set", None)]
            with dimse.msg_queue.mutex:
                pending += [getattr(item[1], "DataSet", None) for item in dimse.msg_queue.queue
                            if isinstance(item, tuple) and len(item) == 2]
            for data_set in pending:
                if data_set is not None and data_set in diverted:
                    discard(data_set)

    dimse.receive_primitive = receive_and_divert
    assoc.run = run_then_discard
    return True
