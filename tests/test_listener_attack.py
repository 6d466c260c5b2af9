"""Attacks on the listener's promises (per-PDU deadlines, per-address slots, spooling), against the
real listener process. Each test here reproduced a defect of main when it was written.

Attackers connect from 127.0.0.2 (the loopback network answers on all of 127/8); the broker is a
throwaway SQLite file (no Redis state touched), and no worker runs.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from .helpers import make_instance
from .test_listener_stall import _stack

ATTACKER = "127.0.0.2"


def _associate(port: int, ae_title: str = "SENDER", source: str = ATTACKER) -> object:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="PACSBRIDGE", bind_address=(source, 0))


def _pdu(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of ``(context id, message control header, bytes)`` PDVs."""
    body = b"".join(struct.pack(">LBB", len(data) + 2, cid, header) + data for cid, header, data in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def _command(**elements: object) -> bytes:
    """A command set, implicit VR little endian, with its group length."""
    from pydicom import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    cmd = Dataset()
    for keyword, value in elements.items():
        setattr(cmd, keyword, value)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, cmd)
    encoded = fp.getvalue()
    return struct.pack("<HHLL", 0, 0, 4, len(encoded)) + encoded


def _context(assoc: object, abstract: str) -> int:
    return next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == abstract)  # type: ignore[attr-defined]


def _hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def _open_in(pid: int, folder: str) -> list[str]:
    """Paths under ``folder`` that process ``pid`` holds open."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(folder):
            out.append(target)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("before", ["no command", "a C-ECHO command", "a command without end"])
def test_data_that_no_store_command_announced_cannot_grow_a_receiver(tmp_path, before):
    """Data set fragments before any command, or after a command that is not a C-STORE, were gathered
    in memory without bound (only a C-STORE's data set is spooled), and so were command fragments that
    never end: 400 MB grew the receiver by 460 MB.
    Now the association is aborted once such data passes PACSBRIDGE_SPOOL_ABOVE."""
    from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

    stack = _stack(tmp_path, PACSBRIDGE_LISTENER_PROCESSES="1", PACSBRIDGE_SPOOL_ABOVE=str(8 << 20))
    try:
        proc = stack.start("listener")
        make_instance(tmp_path / "warm.dcm")
        from .test_listener import storescu

        assert storescu(stack.port, tmp_path / "warm.dcm").returncode == 0
        before_kb = _hwm_kb(proc.pid)
        assoc = _associate(stack.port)
        assert assoc.is_established
        raw = assoc.dul.socket.socket
        if before == "a C-ECHO command":
            cid = _context(assoc, Verification)
            raw.sendall(_pdu((cid, 0x03, _command(AffectedSOPClassUID=Verification, CommandField=0x0030,
                                                  MessageID=1, CommandDataSetType=0x0000))))
        else:
            cid = _context(assoc, CTImageStorage)
        # a data set fragment, never the last (or a command fragment, never the last)
        chunk = _pdu((cid, 0x01 if before == "a command without end" else 0x00, bytes((4 << 20) - 64)))
        sent = 0
        try:
            for _ in range(50):  # 200 MB
                raw.sendall(chunk)
                sent += len(chunk)
        except OSError:  # closed by the listener: what we want
            pass
        time.sleep(1)
        grown = (_hwm_kb(proc.pid) - before_kb) * 1024
        assoc.abort()
        assert grown < 100 << 20, f"{before}: the receiver grew by {grown >> 20} MB after {sent >> 20} MB"
        # and the listener goes on
        assert storescu(stack.port, tmp_path / "warm.dcm").returncode == 0
    finally:
        stack.close()


@pytest.mark.parametrize("end", ["A-ABORT", "reset"])
def test_a_store_cut_off_mid_data_set_leaves_nothing_in_incoming(tmp_path, end):
    """With every data set spooled (PACSBRIDGE_CHUNKED=1), an association that ends in the middle of
    one left its partial file in .incoming (until the reconciler's hour), so a sender that keeps
    aborting filled the disk."""
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    stack = _stack(tmp_path, PACSBRIDGE_LISTENER_PROCESSES="1", PACSBRIDGE_CHUNKED="1")
    incoming = stack.settings.storage / ".incoming"
    try:
        proc = stack.start("listener")
        assoc = _associate(stack.port)
        assert assoc.is_established
        raw = assoc.dul.socket.socket
        cid = _context(assoc, CTImageStorage)
        ds = make_instance(rows=256)
        raw.sendall(_pdu((cid, 0x03, _command(AffectedSOPClassUID=ds.SOPClassUID, CommandField=0x0001,
                                              MessageID=1, Priority=0, CommandDataSetType=0x0000,
                                              AffectedSOPInstanceUID=ds.SOPInstanceUID)),
                         (cid, 0x00, bytes(20000))))
        raw.sendall(_pdu((cid, 0x00, bytes(20000))))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not list(incoming.iterdir()):
            time.sleep(0.1)
        assert list(incoming.iterdir()), "the data set was not spooled"
        if end == "A-ABORT":
            assoc.abort()
        else:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (list(incoming.iterdir()) or _open_in(proc.pid, str(incoming))):
            time.sleep(0.2)
        assert not list(incoming.iterdir()), f"after {end}: left in .incoming"
        assert not _open_in(proc.pid, str(incoming)), f"after {end}: still open"
    finally:
        stack.close()


@pytest.mark.parametrize("close", ["FIN", "reset", "half an A-ASSOCIATE-RQ, then reset"])
def test_a_connection_closed_before_its_association_request_gives_its_slot_back(tmp_path, close):
    """A connection closed before its A-ASSOCIATE-RQ (a port check, a sender that gave up) kept its
    per-address slot for the whole ACSE timeout (pynetdicom waits that long for the request even
    after the connection closed): two port checks locked their address out for 30 s."""
    stack = _stack(tmp_path, PACSBRIDGE_MAX_ASSOCIATIONS_PER_PEER="2", PACSBRIDGE_ACSE_TIMEOUT="30")
    try:
        stack.start("listener")
        warm = _associate(stack.port)  # the receivers are up
        assert warm.is_established
        warm.release()
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", stack.port), timeout=5, source_address=(ATTACKER, 0))
            if close.startswith("half"):
                s.sendall(b"\x01\x00\x00\x00")
            time.sleep(0.2)  # accepted, its slot taken
            if close == "FIN":
                s.close()
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
        time.sleep(1.5)
        started = time.monotonic()
        assoc = _associate(stack.port)
        assert assoc.is_established, f"after two connections closed ({close}), the address is locked out"
        assoc.release()
        assert time.monotonic() - started < 5
    finally:
        stack.close()


def test_an_ipv4_peer_of_a_dual_stack_listener_is_matched_against_its_ipv4_rule(tmp_path):
    """Listening on "::" (IPv4 and IPv6), an IPv4 peer's address is ``::ffff:a.b.c.d``: it matched no
    IPv4 rule of PACSBRIDGE_ALLOWED_PEERS, and every address-bound peer was refused. Its per-address
    slots are those of the IPv4 form either way (slots.py maps one into the other)."""
    from .test_listener import storescu

    stack = _stack(tmp_path, PACSBRIDGE_LISTENER_HOST="::", PACSBRIDGE_ALLOWED_PEERS="SENDER@127.0.0.1")
    try:
        stack.start("listener")
        make_instance(tmp_path / "one.dcm")
        proc = storescu(stack.port, tmp_path / "one.dcm")
        assert proc.returncode == 0, proc.stderr
        assert storescu(stack.port, tmp_path / "one.dcm", aet="OTHER").returncode != 0  # the title still counts
    finally:
        stack.close()


def _association_rq(calling: str, abstract: str, syntax: str) -> bytes:
    """The A-ASSOCIATE-RQ PDU pynetdicom sends for one presentation context (id 1), as bytes."""
    import threading

    from pynetdicom import AE

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    got: dict[str, bytes] = {}

    def capture() -> None:
        conn, _ = server.accept()
        conn.settimeout(5)
        got["rq"] = conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=capture)
    thread.start()
    ae = AE(ae_title=calling)
    ae.add_requested_context(abstract, syntax)
    ae.acse_timeout = 1
    ae.associate("127.0.0.1", server.getsockname()[1], ae_title="PACSBRIDGE")
    thread.join()
    server.close()
    return got["rq"]


@pytest.mark.slow
def test_a_peer_refused_for_its_address_cannot_store_before_the_abort(tmp_path):
    """A calling AE allowed only from another address was accepted, then aborted from EVT_ACCEPTED;
    pynetdicom only queues an abort asked for inside a handler, so a C-STORE sent as soon as the
    A-ASSOCIATE-AC arrived was sometimes handled, and stored, first (3 in 30 with the receiver busy).
    Such a peer is now rejected before anything is accepted."""
    import subprocess

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    stack = _stack(tmp_path, PACSBRIDGE_ALLOWED_PEERS="SENDER@10.9.9.9,LOCAL@127.0.0.0/8",
                   PACSBRIDGE_LISTENER_PROCESSES="1", PACSBRIDGE_FSYNC="0")
    rq = _association_rq("SENDER", CTImageStorage, ExplicitVRLittleEndian)
    loaders = []
    try:
        stack.start("listener")
        # allowed traffic keeps the receiver busy, as a real one is
        big = [tmp_path / f"load{k}.dcm" for k in range(3)]
        for path in big:
            make_instance(path, rows=1024, PatientID="LOAD")
        loaders = [subprocess.Popen(["storescu", "-aet", "LOCAL", "-aec", "PACSBRIDGE", "127.0.0.1", str(stack.port),
                                     *map(str, big * 30)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for _ in range(2)]
        for i in range(40):
            ds = make_instance(PatientID=f"REFUSED{i}")
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_dataset(fp, ds)
            store = _pdu((1, 0x03, _command(AffectedSOPClassUID=ds.SOPClassUID, CommandField=0x0001, MessageID=1,
                                            Priority=0, CommandDataSetType=0x0000,
                                            AffectedSOPInstanceUID=ds.SOPInstanceUID)),
                         (1, 0x02, fp.getvalue()))
            with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as s:
                s.sendall(rq)
                s.recv(6)  # the answer's PDU header: the C-STORE follows at once, as a sender's does
                try:
                    s.sendall(store)
                    while s.recv(65536):
                        pass
                except OSError:
                    pass
        for proc in loaders:
            proc.kill()
            proc.wait()
        stored = [p for p in stack.settings.storage.rglob("*.dcm") if "REFUSED" in str(p)]
        assert not stored, f"{len(stored)} instances of a refused peer stored"
        log = "".join(p.read_text() for p in stack.logs.iterdir())
        assert "calling AE 'SENDER' from 127.0.0.1 is not an allowed peer" in log
    finally:
        for proc in loaders:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stack.close()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["A-ASSOCIATE-RQ", "P-DATA"])
def test_a_peer_dripping_a_pdu_byte_by_byte_is_dropped_after_the_network_timeout(tmp_path, where):
    """A byte every 0.5 s, less than the kernel's wait of a read (RECV_TICK, 1 s): each recv() returned
    data, and the PDU's deadline was looked at only when one came back empty-handed, so the read
    of a PDU of 1,000 bytes went on for 500 s, holding a receiver's thread and slot."""
    stack = _stack(tmp_path, PACSBRIDGE_NETWORK_TIMEOUT="3", PACSBRIDGE_ACSE_TIMEOUT="3")
    try:
        stack.start("listener")
        assoc = None
        if where == "P-DATA":
            from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

            assoc = _associate(stack.port)
            assert assoc.is_established
            sock = assoc.dul.socket.socket
            pdu = _pdu((_context(assoc, CTImageStorage), 0x00, bytes(994)))
        else:
            sock = socket.create_connection(("127.0.0.1", stack.port), timeout=10, source_address=(ATTACKER, 0))
            pdu = struct.pack(">BBL", 0x01, 0, 1000) + bytes(1000)
        started = time.monotonic()
        closed = None
        for byte in pdu[:30]:  # 15 s
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = time.monotonic() - started
                break
            if assoc is not None and (assoc.is_aborted or not assoc.is_alive()):
                closed = time.monotonic() - started
                break
            time.sleep(0.5)
        if assoc is not None:
            assoc.abort()
        else:
            sock.close()
        assert closed is not None and closed < 8, f"{where} dripped for 15 s: still open"
    finally:
        stack.close()


def test_a_p_data_of_a_million_tiny_pdvs_costs_the_receiver_little(tmp_path):
    """A 4 MiB P-DATA-TF (the largest we accept) made of 600,000 PDVs of one byte: pynetdicom decodes
    each into Python objects, 136 MB and 2.4 s of CPU for that one PDU (8 such connections per address
    at once). A P-DATA with more PDVs than any sender puts in one (MAX_PDVS) now closes the connection
    before it is decoded."""
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    stack = _stack(tmp_path, PACSBRIDGE_LISTENER_PROCESSES="1")
    try:
        proc = stack.start("listener")
        assoc = _associate(stack.port)
        assert assoc.is_established
        before_kb = _hwm_kb(proc.pid)
        pdv = struct.pack(">LBB", 3, _context(assoc, CTImageStorage), 0x00) + b"\x00"
        body = pdv * ((4 << 20) // len(pdv))
        assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, len(body)) + body)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not assoc.is_aborted and assoc.is_alive():
            time.sleep(0.1)
        grown = (_hwm_kb(proc.pid) - before_kb) * 1024
        gone = assoc.is_aborted or not assoc.is_alive()
        assoc.abort()
        assert grown < 40 << 20, f"the receiver grew by {grown >> 20} MB for one 4 MiB PDU"
        assert gone
    finally:
        stack.close()
