"""Stalled, idle and flooding peers against the real listener (issue 14, item 1).

Attackers connect from 127.0.0.2 / 127.0.0.3 (the loopback network answers on all of 127/8); the
normal sender is DCMTK's storescu from 127.0.0.1. No worker runs: only what the listener accepts
and answers is looked at, and the broker is a throwaway SQLite file (no Redis state touched).
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from .helpers import make_instance
from .test_listener import Stack, storescu


def _stack(tmp_path, **env: str) -> Stack:
    env = {"PACSBRIDGE_ALLOWED_PEERS": "*", "PACSBRIDGE_LISTENER_HOST": "0.0.0.0", **env}
    return Stack(tmp_path, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}", **env)


def _connect(port: int, source: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST at close: no TIME_WAIT pile
    return s


def _half_p_data(port: int, source: str) -> tuple[object, socket.socket]:
    """An established association whose peer sends the first bytes of a P-DATA-TF PDU, then stops."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="STALLER")
    ae.add_requested_context(CTImageStorage)
    ae.network_timeout = 300  # the staller itself never gives up first
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSBRIDGE", bind_address=(source, 0))
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 10)  # 10 of the 1,000 bytes promised
    return assoc, raw


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the listener closes ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, socket.timeout):
        return False


@pytest.mark.slow
def test_a_flooding_address_cannot_take_every_slot(tmp_path):
    """80 connections stalled mid-PDU and 100 idle ones from two addresses, one association stalled
    mid P-DATA: a normal store from a third address still succeeds at once (the timeouts are long
    here, so it is the per-address bound that lets it through, not the timeouts)."""
    stack = _stack(tmp_path, PACSBRIDGE_NETWORK_TIMEOUT="60", PACSBRIDGE_ACSE_TIMEOUT="60",
                   PACSBRIDGE_MAX_ASSOCIATIONS_PER_PEER="4")
    held: list[socket.socket] = []
    try:
        stack.start("listener")
        assoc, _ = _half_p_data(stack.port, "127.0.0.2")
        for _ in range(80):
            s = _connect(stack.port, "127.0.0.2")
            s.sendall(b"\x01")  # one byte of an A-ASSOCIATE-RQ
            held.append(s)
        held += [_connect(stack.port, "127.0.0.3") for _ in range(100)]
        time.sleep(1)
        ds = make_instance(tmp_path / "normal.dcm", PatientID="NORMAL")
        started = time.monotonic()
        proc = storescu(stack.port, tmp_path / "normal.dcm")
        assert proc.returncode == 0, proc.stderr
        assert time.monotonic() - started < 10
        stored = [p for p in stack.settings.storage.rglob("*.dcm") if ".incoming" not in p.parts]
        assert len(stored) == 1
        # the surplus connections of each flooding address were closed at once
        closed = sum(_closed_by_peer(s, 0.05) for s in held)
        assert closed >= 180 - 2 * 4 - 1
        log = "".join(p.read_text() for p in stack.logs.iterdir())
        assert "127.0.0.2 already holds 4 connections" in log
        assoc.abort()
        assert ds.SOPInstanceUID
    finally:
        for s in held:
            s.close()
        stack.close()


@pytest.mark.slow
@pytest.mark.parametrize("what, reactor", [("one byte of a PDU", "wait"), ("half a P-DATA", "wait"),
                                           ("half a P-DATA", "poll"), ("idle", "wait")])
def test_a_stalled_connection_is_dropped_after_its_timeout(tmp_path, what, reactor):
    """Whatever the state of the PDU read, and with pynetdicom's own reactor too (PACSBRIDGE_REACTOR=poll)."""
    stack = _stack(tmp_path, PACSBRIDGE_NETWORK_TIMEOUT="3", PACSBRIDGE_ACSE_TIMEOUT="3",
                   PACSBRIDGE_REACTOR=reactor)
    try:
        stack.start("listener")
        assoc = None
        if what == "half a P-DATA":
            assoc, sock = _half_p_data(stack.port, "127.0.0.2")
        else:
            sock = _connect(stack.port, "127.0.0.2")
            if what == "one byte of a PDU":
                sock.sendall(b"\x01")
        started = time.monotonic()
        if assoc is not None:  # pynetdicom's own DUL thread reads this socket: watch it end instead
            deadline = started + 15
            while time.monotonic() < deadline and not assoc.is_aborted and assoc.is_alive():
                time.sleep(0.1)
            gone = assoc.is_aborted or not assoc.is_alive()
        else:
            gone = _closed_by_peer(sock, 15)
            sock.close()
        assert gone, f"{what}: still open after 15 s"
        assert time.monotonic() - started < 12
        # and the listener goes on
        make_instance(tmp_path / "after.dcm")
        assert storescu(stack.port, tmp_path / "after.dcm").returncode == 0
    finally:
        stack.close()


def test_peer_slots_are_shared_bounded_and_cleared_with_a_dead_receiver():
    from pacsbridge.listener.slots import PeerSlots

    slots = PeerSlots(2, limit=3)
    a, b = PeerSlots.__new__(PeerSlots), PeerSlots.__new__(PeerSlots)
    a.__dict__.update(slots.__dict__, row=0)
    b.__dict__.update(slots.__dict__, row=1)  # two receivers over one table
    assert a.acquire("10.0.0.1") == 0 and b.acquire("10.0.0.1") == 0 and b.acquire("::ffff:10.0.0.1") == 0
    assert a.acquire("10.0.0.1") == 3  # the IPv4-mapped form is the same peer
    assert a.acquire("10.0.0.2") == 0  # another address is not affected
    b.release("10.0.0.1")
    assert a.acquire("10.0.0.1") == 0
    slots.clear(1)  # receiver 1 died with its connection
    assert slots.held("10.0.0.1") == 2 and slots.held("10.0.0.2") == 1
    # receiver 0 serves three connections, receiver 1 none: 0 leaves a new one to 1 once 1 serves
    assert not a.others_less_busy() and not b.others_less_busy()  # 1 is still starting
    b.mark_serving()
    assert a.others_less_busy() and not b.others_less_busy()
    slots.clear(1)  # died again: not waited for
    assert not a.others_less_busy()


def test_a_pdu_larger_than_we_accept_closes_the_connection_before_it_is_read(tmp_path):
    stack = _stack(tmp_path, PACSBRIDGE_NETWORK_TIMEOUT="60")
    try:
        stack.start("listener")
        sock = _connect(stack.port, "127.0.0.2")
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0) + b"\x00" * 1000)  # "4 GB of A-ASSOCIATE-RQ"
        assert _closed_by_peer(sock, 5)
        sock.close()
        make_instance(tmp_path / "after.dcm")
        assert storescu(stack.port, tmp_path / "after.dcm").returncode == 0
    finally:
        stack.close()
