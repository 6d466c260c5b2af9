"""Waiting instead of polling in pynetdicom's two reactor loops, per association.

pynetdicom 3.0 runs two polling loops per association: the DUL thread
(``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` whenever it
had nothing to do, and the association thread (``Association._run_reactor``)
sleeps a hard-coded 1 ms before each look at its queues. Both add latency to
every instance (the response waits for the next poll) and burn CPU while the
handler is busy (fsync): ~35 % of a receiver's samples.

:func:`install` (called from ``EVT_CONN_OPEN``, before the association's
threads start) replaces both loops of *that* association with copies that
wait instead:

- the DUL thread blocks in ``select()`` on the association socket and one
  end of a socket pair; the other end is written when a primitive is queued
  for sending (``to_provider_queue.put``) or the DUL is told to stop;
- the association thread blocks on a :class:`threading.Event` set when a
  DIMSE message is complete (``dimse.msg_queue.put``), when the DUL hands an
  ACSE primitive up (``to_user_queue.put``: release, abort) and when the DUL
  thread ends.

Both waits are capped (:data:`WAIT_CAP` seconds), so a wake-up we do not
signal (ARTIM timer, network idle timeout, a flag set directly) is seen as
late as that, never missed. Everything else in the loops is pynetdicom's code,
step for step.

Only for the pynetdicom versions of :data:`~pacsbridge.shared.dicom.compat.SUPPORTED` (another
one is said once at warning level and keeps stock behaviour, as do TLS sockets and
``PACSBRIDGE_REACTOR=poll``); :func:`install` returns whether it patched.

Who pauses the association reactor (pynetdicom's ``send_*``/``release()``:
close ``_reactor_checkpoint`` and wait for ``_is_paused``; the send gate of :mod:`.store`:
wait until the reactor blocked on the checkpoint) meets the same checkpoint,
looked at in the same place in the loop as stock. The reactor counts as paused
while it waits for a wake-up (nothing between that wait and the checkpoint
touches a queue); :func:`wake` makes it reach the checkpoint at once.

Listener: :func:`install` from ``EVT_CONN_OPEN`` (acceptor: fired before the
threads start). Our requests (``shared.dicom.dimse.associate``):
:func:`install_on_request` (requestor: ``EVT_CONN_OPEN`` fires in the running
DUL thread).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from typing import Any

from pacsbridge.shared.core.config import initial_settings

from . import check, fallback, supported
from .reads import deadline_reads, largest_pdu

__all__ = ["install", "install_on_request", "wake", "enabled", "tune", "quiet", "on_conn_open", "RUN_LOOP_DELAY",
           "WAIT_CAP"]

log = logging.getLogger(__name__)
_ASSOC_LOG = logging.getLogger("pynetdicom.association")  # where pynetdicom logs these
_DUL_LOG = logging.getLogger("pynetdicom.dul")

#: Longest wait (seconds) before the loops look again without being woken.
WAIT_CAP = 0.005


#: Seconds between pynetdicom's polls where its stock loops run (its default is 0.001): each
#: millisecond it sleeps is paid once per instance when the peer waits for every response.
RUN_LOOP_DELAY = initial_settings().run_loop_delay  # PACSBRIDGE_RUN_LOOP_DELAY


def tune(assoc: Any) -> None:
    """Shorter polling, and no Nagle delay on the association's socket.

    A C-STORE goes out as several PDUs; with Nagle's algorithm the last small
    one waits for the peer's delayed ACK, tens of milliseconds per instance.
    Used by the listener and by our own (SCU) associations alike.
    """
    if check("poll delay", assoc.dul, "_run_loop_delay"):
        assoc.dul._run_loop_delay = RUN_LOOP_DELAY
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP, or already closed
            pass


def quiet(assoc: Any) -> None:
    """Unbind pynetdicom's standard logging handlers from this association when nothing they log
    would be shown (the ``pynetdicom`` logger not enabled for INFO, as in our services).

    They describe every message whatever the log level: for a C-STORE request they copy
    the whole received data set (``getvalue()``) to say it is "Present", and format the
    command set again; for a response ~0.4 ms of the DUL thread. Unbinding is per
    association (public ``get_handlers`` / ``unbind``), unlike
    ``_config.LOG_HANDLER_LEVEL``, which would change every association of the process.
    With ``-vv`` (pynetdicom at DEBUG) they stay, and log as before.
    """
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return
    from pynetdicom import evt

    for event in (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT):
        try:
            for handler, _ in list(assoc.get_handlers(event)):
                if getattr(handler, "__module__", "") == "pynetdicom._handlers":
                    assoc.unbind(event, handler)
        except Exception as exc:  # another pynetdicom: keep its handlers
            fallback("quiet associations", f"cannot unbind pynetdicom's logging handlers: {exc}")
            return


def on_conn_open(event: Any) -> None:
    """EVT_CONN_OPEN handler applying :func:`tune`."""
    tune(event.assoc)


def enabled() -> bool:
    """True unless ``PACSBRIDGE_REACTOR=poll`` or the installed pynetdicom is not one we follow (then
    said once, :func:`~pacsbridge.shared.dicom.compat.fallback`)."""
    if initial_settings().reactor == "poll":  # PACSBRIDGE_REACTOR
        return False
    if not supported():
        fallback("waiting reactor")
        return False
    return True


def _wrap_put(q: queue.Queue, after: Any) -> None:
    """Call ``after()`` after every ``q.put`` (an instance attribute, so only this queue)."""
    put = q.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        after()

    q.put = put_and_wake  # type: ignore[method-assign]


def install(assoc: Any) -> bool:
    """Make ``assoc`` (not started yet: call from ``EVT_CONN_OPEN``) wait instead of poll.

    Returns False, leaving the association as it was, when disabled or not applicable.
    """
    if not enabled():
        return False
    dul = assoc.dul
    raw = getattr(dul.socket, "socket", None)
    try:
        import ssl
        if isinstance(raw, ssl.SSLSocket):  # buffered bytes select() cannot see
            return False
    except ImportError:  # pragma: no cover
        pass
    if getattr(dul.socket, "tls_args", None):  # a requestor's socket is wrapped only when it connects
        return False
    if raw is None or dul.is_alive() or assoc.is_alive():
        return False
    if not (check("waiting reactor", dul, "_process_recv_primitive", "_is_transport_event", "artim_timer",
                  "state_machine", "to_provider_queue", "to_user_queue", "event_queue", "_idle_timer",
                  "_kill_thread")
            and check("waiting reactor", assoc, "_dul_ready", "_reactor_checkpoint", "_is_paused", "dimse",
                      "_serve_request", "_kill")):
        return False

    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    assoc_wake = threading.Event()

    def wake_dul() -> None:
        try:
            wake_w.send(b"\0")
        except OSError:  # full (already woken) or closed (DUL gone)
            pass

    _wrap_put(dul.to_provider_queue, wake_dul)
    _wrap_put(dul.to_user_queue, assoc_wake.set)
    _wrap_put(assoc.dimse.msg_queue, assoc_wake.set)

    def kill_dul() -> None:
        dul._kill_thread = True
        wake_dul()

    def stop_dul() -> bool:  # pynetdicom's, plus the wake-up
        if dul.state_machine.current_state == "Sta1":
            kill_dul()
            while dul.is_alive():
                time.sleep(0.0005)
            return True
        return False

    dul.kill_dul = kill_dul
    dul.stop_dul = stop_dul
    deadline_reads(dul.socket, assoc.network_timeout, largest=largest_pdu(assoc))

    from pynetdicom.utils import make_target

    target = make_target(lambda: _run_dul(dul, wake_r, assoc_wake))

    def run() -> None:
        try:
            target()
        finally:
            assoc_wake.set()  # the association reactor checks dul.is_alive()
            for s in (wake_r, wake_w):
                s.close()

    dul.run = run
    assoc._run_reactor = lambda: _run_association(assoc, assoc_wake)
    assoc._pacsbridge_wake = assoc_wake.set
    return True


def wake(assoc: Any) -> None:
    """Wake the association reactor of ``assoc`` now (after closing a checkpoint: it parks at once).

    No-op on an association without the waiting reactor (the stock loop looks every 1 ms anyway).
    """
    fn = getattr(assoc, "_pacsbridge_wake", None)
    if fn is not None:
        fn()


def install_on_request(assoc: Any, prepare: Any = None) -> None:
    """Install on a requestor association from inside ``ApplicationEntity.associate``.

    On the requestor side pynetdicom starts the DUL thread in ``assoc.request()``,
    which then connects and fires ``EVT_CONN_OPEN`` from that thread: too late to
    replace its loop. This wraps ``assoc.request`` (an instance attribute, this
    association only) so that :func:`quiet` and :func:`install` run just before,
    when the socket is set and no thread has started. Call it where the association is created
    and its socket not yet connected (``AE._create_socket``). ``prepare(assoc)``, if given,
    runs after :func:`install` (whether it patched or not) and before the thread starts:
    ``shared.dicom.dimse`` puts its watched deadline reads there (:func:`.requestor.deadline_reads_for`).
    """
    request = assoc.request

    def install_then_request() -> None:
        quiet(assoc)
        install(assoc)
        if prepare is not None:
            prepare(assoc)
        request()

    assoc.request = install_then_request


def _wait_dul(dul: Any, wake_r: socket.socket) -> None:
    """Block until the peer sent something, a primitive was queued, or WAIT_CAP passed."""
    if dul.to_provider_queue.qsize() or dul.event_queue.qsize():
        return
    raw = getattr(dul.socket, "socket", None) if dul.socket is not None else None
    timeout = WAIT_CAP
    try:
        ready, _, _ = select.select([raw, wake_r] if raw is not None else [wake_r], [], [], timeout)
    except (OSError, ValueError):  # socket closed meanwhile: pynetdicom's own checks see to it
        time.sleep(0.0002)
        return
    if wake_r in ready:
        try:
            while wake_r.recv(4096):
                pass
        except OSError:
            pass


def _run_dul(dul: Any, wake_r: socket.socket, assoc_wake: threading.Event) -> None:
    """``DULServiceProvider.run_reactor`` of pynetdicom 3.0 with ``time.sleep`` replaced by :func:`_wait_dul`."""
    from pynetdicom.pdu import A_ABORT_RQ

    dul._idle_timer.start()
    sleep = False
    while True:
        if not dul.assoc._dul_ready.is_set():
            dul.assoc._dul_ready.set()
            sleep = True
        if sleep:
            _wait_dul(dul, wake_r)
        if dul._kill_thread:
            break
        if dul.artim_timer.expired:
            dul.event_queue.put("Evt18")
        try:
            if dul._process_recv_primitive():
                pass
            elif dul._is_transport_event():
                dul._idle_timer.restart()
        except Exception as exc:
            _DUL_LOG.error("Exception in DUL.run(), aborting association")
            _DUL_LOG.exception(exc)
            abort_pdu = A_ABORT_RQ()
            abort_pdu.source = 0x02
            abort_pdu.reason_diagnostic = 0x00
            dul.socket.send(abort_pdu.encode())
            dul.assoc.is_aborted = True
            dul.assoc.is_established = False
            dul.assoc._kill = True
            dul._kill_thread = True
            return
        try:
            event = dul.event_queue.get(block=False)
        except queue.Empty:
            sleep = True
            continue
        dul.state_machine.do_action(event)
        sleep = False


def _run_association(assoc: Any, wake: threading.Event) -> None:
    """``Association._run_reactor`` of pynetdicom 3.0 with its 1 ms sleep replaced by a wait on ``wake``."""
    from pynetdicom import evt

    assoc._is_paused = False
    idle = False
    while not assoc._kill:
        if idle:
            # Counts as paused while waiting, as it is at the checkpoint: from here to the checkpoint's
            # wait nothing touches a queue, so a send_*/release() that closed the checkpoint and saw
            # _is_paused may go on at once (stock sleeps 1 ms unpaused; with a 5 ms cap they would wait).
            assoc._is_paused = True
            wake.wait(WAIT_CAP)
        # cleared before looking, so a put after this point sets it again for the next wait
        wake.clear()

        # A send_*() or release() clears the checkpoint and then waits for _is_paused. If it
        # cleared it just after our wait() returned, it saw _is_paused still True and went on:
        # looking at the queue now would take the response it waits for (a 30 s hang, seen here
        # about once in 1,000 associations). So unpause first, then make sure the checkpoint is
        # still open; if it closed meanwhile, wait there again. (Stock pynetdicom has the same
        # window.)
        while True:
            assoc._is_paused = True
            assoc._reactor_checkpoint.wait()
            assoc._is_paused = False
            if assoc._reactor_checkpoint.is_set():
                break

        context_id, msg = assoc.dimse.get_msg(block=False)
        idle = not msg
        if msg:
            assoc._serve_request(msg, context_id)

        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            _ASSOC_LOG.info("Association Released")
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return

        if assoc.acse.is_aborted():
            log_msg = "Association Aborted"
            if assoc.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            _ASSOC_LOG.info(log_msg)
            assoc.dul.receive_pdu(wait=False)
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return

        if not assoc.dul.is_alive():
            assoc.kill()
            return

        if assoc.dul.idle_timer_expired():
            _ASSOC_LOG.error("Network timeout reached")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return
