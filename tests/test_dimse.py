"""The DIMSE client against a real Orthanc, and the per-node throttles on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

from pacsbridge.shared.dicom import dimse
from pacsbridge.shared.nodes import throttle
from pacsbridge.shared.core.db import make_engine
from pacsbridge.shared.core.schema import node_leases_table
from pacsbridge.shared.core.errors import DimseError
from pacsbridge.shared.jobs.store import JobStore
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.dicom.query import Query
from pacsbridge.shared.nodes.sources import DimseSearcher

from .helpers import TEST_FILES, make_instance
from .orthanc import Orthanc, free_port

US = "PBTEST"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc that cuts every C-FIND answer at 3, holding 8 studies of patient LIM on 8 days."""
    root = tmp_path_factory.mktemp("dimse")
    files = [TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm"]
    for i in range(8):
        files.append(root / "in" / f"{i}.dcm")
        make_instance(files[-1], PatientID="LIM", StudyDate=f"2024011{i}")
    with Orthanc(root / "o", modalities={"us": (US, "127.0.0.1", free_port())},
                 extra_config={"LimitFindResults": 3}) as o:
        o.upload(files)
        yield o


def node_of(pacs: Orthanc, **kw: object) -> Node:
    return Node(name="pacs", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port, **kw)  # type: ignore[arg-type]


def test_echo_and_find(pacs):
    node = node_of(pacs)
    assert 0 < dimse.echo(node, US) < 10
    found = dimse.find(node, Query(level="study", PatientID="1CT1"), US)
    assert len(found) == 1
    assert found[0]["PatientID"] == "1CT1" and found[0]["ModalitiesInStudy"] == "CT"
    assert found[0]["NumberOfStudyRelatedInstances"] == 1
    series = dimse.find(node, Query(level="series", StudyInstanceUID=(found[0]["StudyInstanceUID"],)), US)
    assert [s["Modality"] for s in series] == ["CT"]


def test_refused_calling_ae_and_unreachable_port(pacs):
    with pytest.raises(DimseError, match="calling AE 'NOBODY'"):
        dimse.find(node_of(pacs), Query(level="study", PatientID="1CT1"), "NOBODY")
    with pytest.raises(DimseError, match="unreachable"):
        dimse.echo(Node(name="gone", ae_title="GONE", host="127.0.0.1", port=free_port()), US, timeout=3)
    with pytest.raises(DimseError, match="unreachable"):  # a name that does not resolve: no OSError escapes
        dimse.echo(Node(name="nowhere", ae_title="X", host="no-such-host.invalid", port=104), US, timeout=3)


@pytest.mark.parametrize("reactor", ["wait", "poll"])
def test_our_associations_get_the_waiting_reactors(pacs, monkeypatch, reactor):
    """dimse.associate installs shared.reactor before the requestor's threads start (EVT_CONN_OPEN fires in
    the running DUL thread: too late); PACSBRIDGE_REACTOR=poll keeps pynetdicom's loops. Either way requests,
    a pause by pynetdicom's own send_* and the release behave, and both threads end."""
    monkeypatch.setenv("PACSBRIDGE_REACTOR", reactor)
    node = node_of(pacs)
    with dimse.associate(node, US) as assoc:
        assert hasattr(assoc, "_pacsbridge_wake") == (reactor == "wait")
        assert ("_run_reactor" in vars(assoc)) == (reactor == "wait")
        # each send_c_echo closes the checkpoint and waits for _is_paused. pynetdicom's own loop (poll)
        # keeps the race the next test replays: its reactor, past the checkpoint but not yet unpaused, can
        # take a send's response and drop it, and the send waits out its DIMSE timeout (CI, once in 20
        # round trips under load). The waiting reactor closes it, so it is held to 20; poll to 2.
        for _ in range(20 if reactor == "wait" else 2):
            assert assoc.send_c_echo().Status == 0
        t0 = time.monotonic()
        assert assoc.send_c_echo().Status == 0
        assert time.monotonic() - t0 < 1.0
    assert assoc.is_released
    for _ in range(100):
        if not assoc.dul.is_alive() and not assoc.is_alive():
            break
        time.sleep(0.02)
    assert not assoc.dul.is_alive() and not assoc.is_alive()
    found = dimse.find(node, Query(level="study", PatientID="1CT1"), US)
    assert len(found) == 1


class _ClosingCheckpoint(threading.Event):
    """A reactor checkpoint that a send_*() closes just after the reactor passed it (the race's window)."""

    def __init__(self, on_close) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.set()
        self.passes = 0
        self.entered = 0  # calls of wait(), counted before it blocks
        self.on_close = on_close

    def wait(self, timeout=None):  # type: ignore[no-untyped-def]
        self.entered += 1
        ok = super().wait(timeout)
        self.passes += 1
        if self.passes == 1:
            # the reactor is past wait() but has not unpaused yet: the requestor closes the checkpoint
            # now, sees _is_paused still True, sends, and its response is queued at once
            self.clear()
            self.on_close()
        return ok


def test_the_waiting_reactor_never_takes_a_response_meant_for_a_send(monkeypatch):
    """Deterministic replay of a hang seen once in ~1,000 associations: the association reactor must
    not look at the DIMSE queue while a send_*() holds the checkpoint closed."""
    import queue as queue_mod
    from types import SimpleNamespace

    from pacsbridge.shared.dicom.compat import reactor

    msgs: queue_mod.Queue = queue_mod.Queue()
    taken_while_closed = []
    checkpoint = _ClosingCheckpoint(lambda: msgs.put((1, "C-ECHO-RSP")))

    def get_msg(block: bool = False):  # type: ignore[no-untyped-def]
        if not checkpoint.is_set():
            taken_while_closed.append(True)
        try:
            return msgs.get_nowait()
        except queue_mod.Empty:
            return None, None

    assoc = SimpleNamespace(_kill=False, _is_paused=False, _reactor_checkpoint=checkpoint,
                            dimse=SimpleNamespace(get_msg=get_msg), is_established=True,
                            acse=SimpleNamespace(is_release_requested=lambda: False, is_aborted=lambda *a: False),
                            dul=SimpleNamespace(is_alive=lambda: True, idle_timer_expired=lambda: False),
                            _serve_request=lambda msg, cx: taken_while_closed.append(msg))
    wake = threading.Event()
    thread = threading.Thread(target=reactor._run_association, args=(assoc, wake), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while checkpoint.entered < 2 and time.monotonic() < deadline:  # until it sits at the closed checkpoint
        time.sleep(0.001)
    assert checkpoint.entered == 2 and checkpoint.passes == 1
    assert assoc._is_paused
    assert msgs.get_nowait() == (1, "C-ECHO-RSP")  # the requestor gets its response
    assoc._kill = True
    checkpoint.set()
    thread.join(2)
    assert not thread.is_alive()
    assert taken_while_closed == []


def test_truncated_find_is_split_by_date(pacs):
    node = node_of(pacs)
    cut = dimse.find_all(node, Query(level="study", PatientID="LIM"), US)
    assert len(cut) == 3 and cut.truncated          # what a plain C-FIND would lose
    searcher = DimseSearcher(node, US)
    studies = searcher.studies(Query(level="study", PatientID="LIM"))
    assert len({s["StudyInstanceUID"] for s in studies}) == 8
    assert searcher.splits > 0
    # a bounded range is split within its bounds
    part = searcher.studies(Query(level="study", PatientID="LIM", min_study_date=datetime(2024, 1, 12).date(),
                                  max_study_date=datetime(2024, 1, 17).date()))
    assert sorted(s["StudyDate"] for s in part) == [f"2024011{i}" for i in range(2, 8)]


@pytest.fixture
def engine(db_url: str):  # type: ignore[no-untyped-def]
    e = make_engine(db_url)
    JobStore(e).create()
    yield e
    e.dispose()


def test_node_slots_never_exceed_the_limit(engine):
    node = Node(name="n", ae_title="N", host="h", port=1, max_associations=2)
    active, peak, lock = [0], [0], threading.Lock()

    def work(i: int) -> None:
        with throttle.NodeSlots(engine, node, f"t{i}").acquire(timeout=30):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.2)
            with lock:
                active[0] -= 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2
    assert throttle.NodeSlots(engine, node, "x").held() == 0
    with throttle.NodeSlots(engine, node, "a").acquire(), throttle.NodeSlots(engine, node, "b").acquire():
        with pytest.raises(throttle.SlotTimeout, match="busy"):
            with throttle.NodeSlots(engine, node, "c").acquire(timeout=0.5):
                pass


def test_lease_of_a_killed_holder_expires(engine, db_url, monkeypatch):
    monkeypatch.setattr(throttle, "LEASE_SECONDS", 1.0)
    code = ("import os, time, sys\nos.environ['PACSBRIDGE_LEASE_SECONDS'] = '3'\n"
            "from pacsbridge.shared.nodes import throttle\nfrom pacsbridge.shared.core.db import make_engine\n"
            "from pacsbridge.shared.dicom.node import Node\n"
            "n = Node(name='n', ae_title='N', host='h', port=1, max_associations=1)\n"
            "with throttle.NodeSlots(make_engine(sys.argv[1]), n, 'doomed').acquire():\n"
            "    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, db_url], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    node = Node(name="n", ae_title="N", host="h", port=1, max_associations=1)

    def expiry() -> float:
        with engine.begin() as conn:
            return float(conn.execute(select(node_leases_table.c.expires_at)
                                      .where(node_leases_table.c.node == "n")).scalar_one())

    # a live holder keeps renewing its lease (3 s, renewed every second): seen renewed twice, its slot is busy
    seen = [expiry()]
    deadline = time.monotonic() + 30
    while len(seen) < 3 and time.monotonic() < deadline:
        if expiry() > seen[-1]:
            seen.append(expiry())
        time.sleep(0.05)
    assert len(seen) == 3, seen
    with pytest.raises(throttle.SlotTimeout):
        with throttle.NodeSlots(engine, node, "me").acquire(timeout=0.5):
            pass
    proc.kill()
    proc.wait()
    start = time.monotonic()
    with throttle.NodeSlots(engine, node, "me").acquire(timeout=10):
        assert time.monotonic() - start < 10


def test_rate_limiter_books_instances_in_turn(engine):
    node = Node(name="r", ae_title="R", host="h", port=1, max_rate=10.0)
    limiter = throttle.RateLimiter(engine, node)
    starts = [limiter.reserve(5) for _ in range(4)]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(g >= 0.5 - 1e-6 for g in gaps), gaps           # 5 instances at 10/s = 0.5 s each
    other = throttle.RateLimiter(engine, node)                 # another worker shares the same clock
    assert other.reserve(1) >= starts[-1] + 0.5 - 1e-6
    free = throttle.RateLimiter(engine, Node(name="f", ae_title="F", host="h", port=1))
    t0 = time.time()
    free.wait(1000)
    assert time.time() - t0 < 1                                # 0 = unlimited


def test_move_window():
    night = Node(name="w", ae_title="W", host="h", port=1, move_window="20:00-06:00")
    day = Node(name="d", ae_title="D", host="h", port=1, move_window="08:30-17:00")
    assert throttle.in_window(night, datetime(2024, 1, 1, 23, 0))
    assert throttle.in_window(night, datetime(2024, 1, 1, 5, 59))
    assert not throttle.in_window(night, datetime(2024, 1, 1, 6, 0))
    assert throttle.seconds_until_window(night, datetime(2024, 1, 1, 19, 0)) == 3600
    assert throttle.seconds_until_window(day, datetime(2024, 1, 1, 17, 30)) == 15 * 3600
    assert throttle.seconds_until_window(day, datetime(2024, 1, 1, 9, 0)) == 0
    assert throttle.in_window(Node(name="a", ae_title="A", host="h", port=1))


def test_larger_reads_keep_pynetdicoms_recv_contract():
    """shared/dicom/compat/reads.py's 32 kB reads: exactly nr_bytes across many chunks, what came before a close."""
    import socket
    from types import SimpleNamespace

    from pacsbridge.shared.dicom.compat import reads

    a, b = socket.socketpair()
    try:
        holder = SimpleNamespace(socket=a)
        reads.deadline_reads(holder)
        payload = bytes(range(256)) * 1000  # 256,000 bytes: 8 chunks
        sender = threading.Thread(target=lambda: (b.sendall(payload + b"NEXT"), b.sendall(b"tail")))
        sender.start()
        got = holder.recv(len(payload))
        assert isinstance(got, bytearray) and got == payload
        assert holder.recv(4) == b"NEXT"  # nothing read past what was asked for
        sender.join()
        b.close()
        assert holder.recv(100) == b"tail"  # the peer closed: what came, no exception
    finally:
        a.close()


# -- deadlines and cancel on our own associations (issue 14, items 7 and 20) --------------------------------
def _timed(fn, limit: float):  # type: ignore[no-untyped-def]
    """Run ``fn`` in a thread; (seconds, exception or result), or fail when it takes longer than ``limit``."""
    out: list = []

    def run() -> None:
        t0 = time.monotonic()
        try:
            out.append((time.monotonic(), fn()))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out.append((time.monotonic(), exc))
        out[-1] = (out[-1][0] - t0, out[-1][1])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"still blocked after {limit} s"
    return out[0]


@pytest.mark.parametrize("reactor", ["wait", "poll"])
def test_half_an_associate_ac_fails_within_the_deadline(monkeypatch, reactor):
    """A node that sends the first bytes of an A-ASSOCIATE-AC and then holds the connection: the echo
    ends with a clear error after its timeout, whichever reactor runs (pynetdicom's recv had no deadline
    once a PDU had started to arrive)."""
    from .servers import HalfAssociatePeer

    monkeypatch.setenv("PACSBRIDGE_REACTOR", reactor)
    with HalfAssociatePeer() as peer:
        node = Node(name="half", ae_title="HALF", host="127.0.0.1", port=peer.port)
        seconds, exc = _timed(lambda: dimse.echo(node, US, timeout=2), 15)
        assert isinstance(exc, DimseError), exc
        assert peer.connections == 1
        assert 1.5 < seconds < 4, seconds
        assert "12 of the 190 bytes of its A-ASSOCIATE-AC" in str(exc), str(exc)


def test_cancel_interrupts_an_association_waiting_on_the_network():
    """``associate(cancel=...)``: setting the event ends a wait for a stalled peer at once."""
    from .servers import HalfAssociatePeer

    with HalfAssociatePeer() as peer:
        node = Node(name="half", ae_title="HALF", host="127.0.0.1", port=peer.port)
        cancel = threading.Event()
        threading.Timer(0.5, cancel.set).start()

        def attempt() -> None:
            with dimse.associate(node, US, timeout=30, cancel=cancel):
                pass

        seconds, exc = _timed(attempt, 40)
        assert isinstance(exc, DimseError) and "cancelled" in str(exc), exc
        assert seconds < 2.5, seconds


def test_connection_failures_say_what_happened():
    """Refused, timed out and a name that does not resolve are told apart (a closed port is not a timeout)."""
    from .servers import FullBacklog

    closed = Node(name="closed", ae_title="X", host="127.0.0.1", port=free_port())
    seconds, exc = _timed(lambda: dimse.echo(closed, US, timeout=3), 10)
    assert isinstance(exc, DimseError) and "connection refused" in str(exc), exc
    assert "within" not in str(exc) and seconds < 1.5
    full = FullBacklog()
    try:
        seconds, exc = _timed(lambda: dimse.echo(Node(name="full", ae_title="X", host="127.0.0.1",
                                                      port=full.port), US, timeout=1.5), 10)
    finally:
        full.close()
    assert isinstance(exc, DimseError) and "no TCP connection within 1.5 s" in str(exc), exc
    assert 1.2 < seconds < 3
    seconds, exc = _timed(lambda: dimse.echo(Node(name="nowhere", ae_title="X", host="no-such-host.invalid",
                                                  port=104), US, timeout=3), 10)
    assert isinstance(exc, DimseError) and "does not resolve" in str(exc), exc


def test_deadline_reads_keep_pynetdicoms_recv_contract_and_give_up_on_a_stalled_pdu():
    """Our associations' reads (compat.requestor.deadline_reads_for): exactly nr_bytes across chunks, nothing
    past it, what came before a close,
    and a TimeoutError (pynetdicom: connection closed) when a PDU stops arriving for longer than the timeout."""
    import socket
    import struct
    from types import SimpleNamespace

    from pacsbridge.shared.dicom.compat.requestor import deadline_reads_for

    a, b = socket.socketpair()
    try:
        holder = SimpleNamespace(socket=a, tls_args=None)
        net = dimse._Net(1.0)
        deadline_reads_for(SimpleNamespace(dul=SimpleNamespace(socket=holder)), net)
        payload = bytes(range(256)) * 1000
        sender = threading.Thread(target=lambda: (b.sendall(payload + b"NEXT"), b.sendall(b"tail")))
        sender.start()
        got = holder.recv(len(payload))
        assert isinstance(got, bytearray) and got == payload
        assert holder.recv(4) == b"NEXT"
        sender.join()
        assert holder.recv(4) == b"tail"
        b.sendall(struct.pack(">BBI", 0x04, 0, 500) + b"x" * 100)  # a P-DATA-TF announcing 500 bytes, 100 sent
        assert holder.recv(6) == struct.pack(">BBI", 0x04, 0, 500) and net.pdu == (0x04, 500)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            holder.recv(500)
        assert 0.9 < time.monotonic() - t0 < 2.0
        assert net.stalled == (0x04, 100, 500, 1.0)
        assert "100 of the 500 bytes of its P-DATA-TF" in net.stall_text()
        b.sendall(b"end")
        b.close()
        assert holder.recv(100) == b"end"  # the peer closed: what came, no exception
    finally:
        a.close()
