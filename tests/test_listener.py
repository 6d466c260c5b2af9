"""The listener process with real peers: DCMTK storescu / echoscu, a real Redis and a real worker."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacsbridge.shared.core.config import Settings
from pacsbridge.shared.index.context import open_context
from pacsbridge.shared.index.storage import OWN_FOLDERS

from .helpers import TEST_FILES, make_instance
from .servers import ThrowawayRedis

PB = [sys.executable, "-m", "pacsbridge.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


class Stack:
    """A listener (2 processes) and a worker as separate processes, like compose runs them."""

    def __init__(self, tmp_path: Path, database_url: str | None = None, broker_url: str | None = None,
                 **env_extra: str) -> None:
        self.port = free_port()
        # the broker: our own redis-server unless given one (never a database of the machine's Redis)
        self.redis = None if broker_url else ThrowawayRedis()
        if self.redis is not None:
            self.redis.start()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
        self.env.update({
            "PACSBRIDGE_STORAGE": str(tmp_path / "data"),
            "PACSBRIDGE_DATABASE_URL": database_url or f"sqlite:///{tmp_path / 'idx.db'}",
            "PACSBRIDGE_BROKER_URL": broker_url or self.redis.url,
            "PACSBRIDGE_ALLOWED_PEERS": "SENDER,LOCAL@127.0.0.1",
            "PACSBRIDGE_LISTENER_PORT": str(self.port), "PACSBRIDGE_LISTENER_PROCESSES": "2", "TCP_NODELAY": "1",
            "PACSBRIDGE_RECONCILE_MIN_AGE": "0", "PACSBRIDGE_RECONCILE_SECONDS": "2",
        })
        self.env.update(env_extra)
        self.logs = tmp_path / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.settings = Settings(database_url=self.env["PACSBRIDGE_DATABASE_URL"], storage=tmp_path / "data")
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *extra: str) -> subprocess.Popen:
        cmd = "listener" if name.startswith("listener") else "worker"
        log = open(self.logs / f"{name}-{len(self.procs)}.log", "w")
        proc = subprocess.Popen(PB + [cmd, *extra], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        if cmd == "listener":
            wait_port(self.port)
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # the receivers too: one still dying holds the shared listening socket, so a listener started
        # at once on the same port could not bind it while a probe connection still succeeded (CI, once)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.05)

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        if self.redis is not None:
            self.redis.stop()


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    s.start("listener")
    s.start("worker", "--concurrency", "1")
    yield s
    s.close()


def indexed_sops(settings: Settings, expect: int, timeout: float = 60.0) -> set[str]:
    ctx = open_context(settings)
    deadline = time.monotonic() + timeout
    sops: set[str] = set()
    while time.monotonic() < deadline:
        if ctx.index.exists():
            sops = {r[0] for r in ctx.index.run_sql("select SOPInstanc from DICOMImages")[1]}
            if len(sops) >= expect:
                break
        time.sleep(0.3)
    ctx.index.engine.dispose()
    return sops


def storescu(port: int, *files: Path, aet: str = "SENDER", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", *extra, "-aet", aet, "-aec", "PACSBRIDGE", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TCP_NODELAY": "1"})


def test_storescu_one_and_several_associations(stack, tmp_path):
    files = [make_instance(tmp_path / "in" / f"{i}.dcm", rows=64, PatientID=f"P{i % 3}") for i in range(30)]
    procs = [subprocess.Popen(["storescu", "-aet", "SENDER", "-aec", "PACSBRIDGE", "127.0.0.1", str(stack.port),
                               *[str(tmp_path / "in" / f"{i}.dcm") for i in range(k, 30, 3)]],
                              env={**os.environ, "TCP_NODELAY": "1"}) for k in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    sops = indexed_sops(stack.settings, 30)
    assert sops == {ds.SOPInstanceUID for ds in files}
    # stored byte for byte as sent
    ctx = open_context(stack.settings)
    for ds in files[:5]:
        (obj,), = ctx.index.run_sql(f"select ObjectFile from DICOMImages where SOPInstanc='{ds.SOPInstanceUID}'")[1]
        sent = (tmp_path / "in" / f"{files.index(ds)}.dcm").read_bytes()
        assert ctx.storage.absolute(obj).read_bytes()[-len(ds.PixelData):] == sent[-len(ds.PixelData):]


@pytest.mark.parametrize("name, option", [("MR_small_RLE.dcm", "-xr"), ("JPEG2000.dcm", "-xw"),
                                          ("MR_small_jpeg_ls_lossless.dcm", "-xt"), ("CT_small.dcm", "-xe")])
def test_compressed_files_are_stored_as_sent(stack, name, option):
    import pydicom

    proc = storescu(stack.port, TEST_FILES / name, extra=(option,))
    assert proc.returncode == 0, proc.stderr
    ds = pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True)
    assert indexed_sops(stack.settings, 1) == {ds.SOPInstanceUID}
    stored = next((stack.settings.storage).rglob("*.dcm"))
    got = pydicom.dcmread(stored)
    assert got.file_meta.TransferSyntaxUID == pydicom.dcmread(TEST_FILES / name).file_meta.TransferSyntaxUID
    assert got.PixelData == pydicom.dcmread(TEST_FILES / name).PixelData


def test_strangers_are_rejected(stack):
    proc = storescu(stack.port, TEST_FILES / "CT_small.dcm", aet="STRANGER")
    assert proc.returncode != 0 and "Calling AE Title Not Recognized" in proc.stderr
    assert subprocess.run(["echoscu", "-aet", "SENDER", "-aec", "WRONGCALLED", "127.0.0.1", str(stack.port)],
                          capture_output=True).returncode != 0
    assert subprocess.run(["echoscu", "-aet", "SENDER", "-aec", "PACSBRIDGE", "127.0.0.1", str(stack.port)],
                          capture_output=True).returncode == 0
    assert not list(stack.settings.storage.rglob("*.dcm"))


def test_hostile_patient_id_is_stored_inside_root(stack, tmp_path):
    ds = make_instance(tmp_path / "x.dcm", PatientID="../../x")
    assert storescu(stack.port, tmp_path / "x.dcm").returncode == 0
    assert indexed_sops(stack.settings, 1) == {ds.SOPInstanceUID}
    root = stack.settings.storage.resolve()
    stored = [p for p in root.rglob("*.dcm")]
    assert len(stored) == 1 and root in stored[0].resolve().parents
    assert not (tmp_path / "x").exists() and not (root.parent.parent / "x").exists()


def test_unwritable_storage_answers_out_of_resources(stack, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ds = make_instance(tmp_path / "a.dcm", PatientID="BLOCKED")
    (stack.settings.storage / "BLOCKED").write_bytes(b"")  # the patient folder cannot be created
    ae = AE(ae_title="LOCAL")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", stack.port, ae_title="PACSBRIDGE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    ok = assoc.send_c_store(make_instance(PatientID="FINE"))  # the association goes on
    assoc.release()
    assert status.Status == 0xA700 and ok.Status == 0x0000
    leftovers = [p for p in stack.settings.storage.rglob("*") if p.is_file() and p.name != "BLOCKED"]
    assert all(".incoming" not in p.parts for p in leftovers)


def test_kill_9_mid_association_leaves_no_partial_file(stack, tmp_path):
    files = [make_instance(tmp_path / "big" / f"{i}.dcm", rows=512) for i in range(40)]
    sender = subprocess.Popen(["storescu", "-aet", "SENDER", "-aec", "PACSBRIDGE", "127.0.0.1", str(stack.port),
                               *[str(tmp_path / "big" / f"{i}.dcm") for i in range(40)]],
                              env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    root = stack.settings.storage
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(list(root.rglob("*.dcm"))) < 3:
        time.sleep(0.02)
    stack.stop("listener", signal.SIGKILL)
    sender.wait(timeout=60)
    # every file under a real name is complete (a truncated one would fail read_header)
    from pacsbridge.shared.index.records import read_header

    for p in _stored_files(root):
        read_header(p.read_bytes(), str(p))
    # restart and resend everything: all arrive, nothing twice
    stack.start("listener")
    proc = storescu(stack.port, *[tmp_path / "big" / f"{i}.dcm" for i in range(40)])
    assert proc.returncode == 0, proc.stderr
    assert indexed_sops(stack.settings, 40) == {ds.SOPInstanceUID for ds in files}
    # a partial file may remain only in .incoming (removed by the reconciler after an hour)
    assert len(_stored_files(root)) == 40


@pytest.mark.parametrize("callback", ["record", "explode"])
def test_after_store_callback_and_metrics(tmp_path, callback):
    import urllib.request

    out = tmp_path / "calls.txt"
    metrics = free_port()
    stack = Stack(tmp_path, PACSBRIDGE_AFTER_STORE=f"tests.callback_probe:{callback}",
                  PB_TEST_CALLBACK_FILE=str(out), PACSBRIDGE_LISTENER_METRICS_PORT=str(metrics))
    try:
        stack.start("listener")
        stack.start("worker", "--concurrency", "1")
        files = [make_instance(tmp_path / "in" / f"{i}.dcm", PatientID="CB") for i in range(3)]
        assert storescu(stack.port, *sorted((tmp_path / "in").iterdir())).returncode == 0
        assert len(indexed_sops(stack.settings, 3)) == 3
        if callback == "record":
            lines = out.read_text().splitlines()
            assert sorted(line.split("\t")[2] for line in lines) == sorted(d.SOPInstanceUID for d in files)
            assert all(line.split("\t")[1] == "CB" and line.endswith("\tSENDER") for line in lines)
        else:
            assert not out.exists()
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        stored = [l for l in text.splitlines() if l.startswith('pacsbridge_listener_instances_total{status="stored"}')]
        assert stored and float(stored[0].split()[-1]) == 3.0
    finally:
        stack.close()


def test_peer_addresses_are_checked(tmp_path):
    stack = Stack(tmp_path, PACSBRIDGE_ALLOWED_PEERS="SENDER@10.9.9.9,LOCAL@127.0.0.0/8")
    try:
        stack.start("listener")
        # SENDER is known, but not from this address: aborted
        proc = storescu(stack.port, TEST_FILES / "CT_small.dcm", aet="SENDER")
        assert proc.returncode != 0
        # LOCAL from 127.0.0.1: accepted
        assert subprocess.run(["echoscu", "-aet", "LOCAL", "-aec", "PACSBRIDGE", "127.0.0.1", str(stack.port)],
                              capture_output=True).returncode == 0
        assert not [p for p in stack.settings.storage.rglob("*.dcm") if ".incoming" not in p.parts]
        log = "".join(p.read_text() for p in stack.logs.iterdir())
        assert "calling AE 'SENDER' from 127.0.0.1 is not an allowed peer" in log
    finally:
        stack.close()
    stack = Stack(tmp_path / "2", PACSBRIDGE_ALLOWED_PEERS="SENDER@10.9.9.9")
    try:
        stack.start("listener")
        proc = subprocess.run(["echoscu", "-aet", "SENDER", "-aec", "PACSBRIDGE", "127.0.0.1", str(stack.port)],
                              capture_output=True, text=True)
        assert proc.returncode != 0
        log = "".join(p.read_text() for p in stack.logs.iterdir())
        assert "127.0.0.1 is not the address of an allowed peer" in log
    finally:
        stack.close()


def test_calling_ae_association_and_arrival_are_recorded(stack, tmp_path):
    before = time.time()
    files = [make_instance(tmp_path / "in" / f"{i}.dcm") for i in range(4)]
    assert storescu(stack.port, *sorted((tmp_path / "in").iterdir())).returncode == 0
    assert len(indexed_sops(stack.settings, 4)) == 4
    ctx = open_context(stack.settings)
    deadline = time.monotonic() + 30
    rows = []
    while time.monotonic() < deadline and len(rows) < 4:
        rows = ctx.index.run_sql("select sop_uid, calling_ae, association, arrived_at, series_uid "
                                 "from pacsbridge_arrivals")[1]
        time.sleep(0.2)
    assert {r[0] for r in rows} == {d.SOPInstanceUID for d in files}
    assert {r[1] for r in rows} == {"SENDER"}
    assert len({r[2] for r in rows}) == 1 and len(rows[0][2]) == 32  # one association
    assert all(before <= r[3] <= time.time() for r in rows)
    assert {r[4] for r in rows} == {d.SeriesInstanceUID for d in files}


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MB file system (tmpfs) for the storage: it fills up, and it can be made read-only."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _send_all(port: int, datasets: list) -> list[int]:
    """C-STORE each data set in one association; the statuses (-1: no response).

    Sent through our own ``dimse.associate`` (the waiting reactor): stock pynetdicom's
    association reactor can take a C-STORE response meant for ``send_c_store`` ("Received
    unexpected C-STORE service message", then a 30 s DIMSE timeout: this test's old flake).
    """
    from pynetdicom import build_context
    from pynetdicom.sop_class import CTImageStorage

    from pacsbridge.shared.dicom import dimse
    from pacsbridge.shared.dicom.node import Node

    node = Node(name="listener", ae_title="PACSBRIDGE", host="127.0.0.1", port=port)
    statuses = []
    with dimse.associate(node, "LOCAL", [build_context(CTImageStorage)]) as assoc:
        assert "_run_reactor" in vars(assoc)  # the waiting reactor is in place
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    return statuses


def _stored_files(root: Path) -> list[Path]:
    """Instances under their real names (not storage's own folders: .incoming, .quarantine, .journal)."""
    return [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in OWN_FOLDERS]


def test_full_storage_answers_out_of_resources_and_keeps_what_it_has(tmp_path, small_fs):
    stack = Stack(tmp_path, PACSBRIDGE_STORAGE=str(small_fs / "data"))
    stack.settings = stack.settings.with_(storage=small_fs / "data")
    try:
        stack.start("listener")
        stack.start("worker", "--concurrency", "1")
        datasets = [make_instance(rows=256, PatientID="FULL") for _ in range(30)]  # 128 kB each, 3.8 MB
        statuses = _send_all(stack.port, datasets)
        assert statuses.count(0x0000) >= 5 and statuses.count(0xA700) >= 5, statuses
        assert set(statuses) <= {0x0000, 0xA700}
        stored = _stored_files(small_fs / "data")
        ok = [d for d, s in zip(datasets, statuses) if s == 0]
        assert len(stored) == len(ok)  # no partial file under a real name
        from pacsbridge.shared.index.records import read_header

        for p in stored:
            read_header(p.read_bytes(), str(p))  # complete
        assert indexed_sops(stack.settings, len(ok)) == {d.SOPInstanceUID for d in ok}
    finally:
        stack.close()


def test_below_the_watermark_answers_out_of_resources_before_the_disk_is_full(tmp_path, small_fs):
    """PACSBRIDGE_DISK_MIN_FREE=1M on a 2 MB file system: instances are stored until less than 1 MB is free,
    then refused with 0xA700 and a reason, while the disk still has room (nothing half-written, no ENOSPC)."""
    stack = Stack(tmp_path, PACSBRIDGE_STORAGE=str(small_fs / "data"), PACSBRIDGE_DISK_MIN_FREE="1M",
                  PACSBRIDGE_LISTENER_PROCESSES="1")
    stack.settings = stack.settings.with_(storage=small_fs / "data")
    try:
        stack.start("listener")
        datasets = [make_instance(rows=256, PatientID="WATER") for _ in range(20)]  # 128 kB each, 2.5 MB
        statuses = _send_all(stack.port, datasets)
        first_refusal = statuses.index(0xA700)
        assert first_refusal >= 3 and set(statuses[first_refusal:]) == {0xA700}, statuses
        st = os.statvfs(small_fs)
        assert st.f_bavail * st.f_frsize >= 512 << 10  # refused with room left: not a full disk
        stored = _stored_files(small_fs / "data")
        assert len(stored) == first_refusal and all(read_header_ok(p) for p in stored)
        log = "".join(p.read_text() for p in stack.logs.glob("listener-*.log"))
        assert "below its watermark" in log and log.count("refusing C-STORE (0xA700)") == 1  # said once
    finally:
        stack.close()


def test_read_only_storage_answers_out_of_resources(tmp_path, small_fs):
    stack = Stack(tmp_path, PACSBRIDGE_STORAGE=str(small_fs / "data"))
    stack.settings = stack.settings.with_(storage=small_fs / "data")
    try:
        stack.start("listener")
        first = make_instance(PatientID="RO")
        assert _send_all(stack.port, [first]) == [0x0000]
        subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
        statuses = _send_all(stack.port, [make_instance(PatientID="RO"), make_instance(PatientID="NEW")])
        assert statuses == [0xA700, 0xA700]
        stored = _stored_files(small_fs / "data")
        assert len(stored) == 1 and read_header_ok(stored[0])
    finally:
        stack.close()


def read_header_ok(path: Path) -> bool:
    from pacsbridge.shared.index.records import read_header

    return bool(read_header(path.read_bytes(), str(path)).sop_instance_uid)


def test_chunked_mode_stores_and_indexes(tmp_path):
    """PACSBRIDGE_CHUNKED=1: every data set is spooled to .incoming as it arrives and linked into place."""
    stack = Stack(tmp_path, PACSBRIDGE_CHUNKED="1")
    try:
        stack.start("listener")
        stack.start("worker", "--concurrency", "1")
        files = [make_instance(tmp_path / "in" / f"{i}.dcm", rows=64) for i in range(5)]
        assert storescu(stack.port, *sorted((tmp_path / "in").iterdir())).returncode == 0
        assert indexed_sops(stack.settings, 5) == {d.SOPInstanceUID for d in files}
        root = stack.settings.storage
        stored = _stored_files(root)
        assert len(stored) == 5
        for p in stored:
            assert read_header_ok(p)
        deadline = time.monotonic() + 20  # the last association's thread may still be ending
        while list((root / ".incoming").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in (root / ".incoming").iterdir()] == []
    finally:
        stack.close()


def test_configured_nodes_may_store_from_their_own_address(tmp_path):
    """A PACS registered as a node sends C-MOVE sub-operations as its own AE: allowed, from its host."""
    from pacsbridge.listener.peers import parse_peers, with_nodes
    from pacsbridge.shared.jobs.store import JobStore
    from pacsbridge.shared.dicom.node import Node

    peers = with_nodes(parse_peers("SENDER"), [("PACS", "127.0.0.1"), ("GHOST", "no-such-host.invalid")])
    assert peers.allows("PACS", "127.0.0.1") and not peers.allows("PACS", "10.0.0.9")
    assert not peers.allows("GHOST", "127.0.0.1") and peers.allows("SENDER", "10.0.0.9")

    stack = Stack(tmp_path, PACSBRIDGE_ALLOWED_PEERS="SENDER", PACSBRIDGE_PEERS_REFRESH_SECONDS="0.3")
    ctx = open_context(stack.settings)
    ctx.index.create()
    stack.start("listener")
    stack.start("worker", "--concurrency", "1")
    try:
        make_instance(tmp_path / "a.dcm")
        assert storescu(stack.port, tmp_path / "a.dcm", aet="NEWPACS").returncode != 0  # not yet a node
        JobStore(ctx.index.engine).add_node(Node.from_dict(
            {"name": "newpacs", "ae_title": "NEWPACS", "host": "127.0.0.1", "port": 104}))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            proc = storescu(stack.port, tmp_path / "a.dcm", aet="NEWPACS")
            if proc.returncode == 0:
                break
            time.sleep(0.3)
        assert proc.returncode == 0, proc.stderr
        assert len(indexed_sops(stack.settings, 1)) == 1
    finally:
        stack.close()
        ctx.index.engine.dispose()


# -- the waiting reactors (shared/dicom/compat/reactor.py) ----------------------------------------------
@pytest.mark.parametrize("reactor", ["wait", "poll"])
def test_short_associations_interleaved_with_a_long_one_lose_nothing(tmp_path, reactor):
    """Many small associations come and go while a long one runs, in both reactor modes: every instance
    arrives once, per patient counts are exact."""
    s = Stack(tmp_path, PACSBRIDGE_REACTOR=reactor)
    try:
        s.start("listener")
        s.start("worker", "--concurrency", "1")
        long_files = [make_instance(tmp_path / "long" / f"{i}.dcm", rows=128, PatientID="LONG") for i in range(80)]
        short = [[make_instance(tmp_path / "short" / f"{k}-{i}.dcm", rows=16, PatientID=f"S{k}") for i in range(2)]
                 for k in range(16)]
        env = {**os.environ, "TCP_NODELAY": "1"}
        base = ["storescu", "-aet", "SENDER", "-aec", "PACSBRIDGE", "127.0.0.1", str(s.port)]
        long_proc = subprocess.Popen(base + [str(tmp_path / "long" / f"{i}.dcm") for i in range(80)], env=env)
        rcs = []
        for k in range(0, 16, 4):  # 4 short associations at a time, next to the long one
            procs = [subprocess.Popen(base + [str(tmp_path / "short" / f"{j}-{i}.dcm") for i in range(2)], env=env)
                     for j in range(k, k + 4)]
            rcs += [p.wait(timeout=120) for p in procs]
        assert rcs == [0] * 16
        assert long_proc.wait(timeout=120) == 0
        expected = {ds.SOPInstanceUID for ds in long_files} | {ds.SOPInstanceUID for b in short for ds in b}
        assert indexed_sops(s.settings, len(expected)) == expected
        ctx = open_context(s.settings)
        counts = dict(ctx.index.run_sql("select ImagePat, count(*) from DICOMImages group by ImagePat")[1])
        ctx.index.engine.dispose()
        assert counts == {"LONG": 80, **{f"S{k}": 2 for k in range(16)}}
        assert len(_stored_files(s.settings.storage)) == len(expected)
    finally:
        s.close()


def test_peer_gone_mid_transfer_leaves_nothing_partial_and_the_receiver_goes_on(stack, tmp_path):
    """A sender killed mid-instance (connection dropped inside a PDU) and one that sends A-ABORT
    mid-association: nothing partial under a real name, and the listener keeps serving."""
    import threading

    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from pacsbridge.shared.index.records import read_header

    files = [make_instance(tmp_path / "big" / f"{i}.dcm", rows=512) for i in range(60)]
    sender = subprocess.Popen(["storescu", "-aet", "SENDER", "-aec", "PACSBRIDGE", "127.0.0.1", str(stack.port),
                               *[str(tmp_path / "big" / f"{i}.dcm") for i in range(60)]],
                              env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    root = stack.settings.storage
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(_stored_files(root)) < 3:
        time.sleep(0.01)
    sender.kill()
    sender.wait()
    # A-ABORT from a pynetdicom SCU while it is sending
    ae = AE(ae_title="LOCAL")
    ae.add_requested_context(CTImageStorage)
    # a send_c_store cut by our own abort waits dimse_timeout for a response that cannot come
    # (stock pynetdicom client): 5 s, not the default 30, per run
    ae.dimse_timeout = 5
    assoc = ae.associate("127.0.0.1", stack.port, ae_title="PACSBRIDGE")
    assert assoc.is_established
    big = [make_instance(rows=512) for _ in range(20)]
    threading.Timer(0.2, assoc.abort).start()
    for ds in big:
        if not assoc.is_established:
            break
        assoc.send_c_store(ds)
    time.sleep(0.5)
    for p in _stored_files(root):
        read_header(p.read_bytes(), str(p))  # complete, or it raises
    # the receivers are still fine: everything resent arrives, once
    proc = storescu(stack.port, *[tmp_path / "big" / f"{i}.dcm" for i in range(60)])
    assert proc.returncode == 0, proc.stderr
    # indexed_sops returns at 60 of any: the aborted association's instances count too, so wait for these 60
    expected = {ds.SOPInstanceUID for ds in files}
    deadline = time.monotonic() + 60
    while not expected <= (got := indexed_sops(stack.settings, 60)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert expected <= got
    sops = [read_header(p.read_bytes(), str(p)).sop_instance_uid for p in _stored_files(root)]
    assert len(sops) == len(set(sops))


@pytest.mark.parametrize("level, described", [(logging.WARNING, 0), (logging.INFO, 3)])
def test_pynetdicom_describes_received_stores_only_where_its_log_shows_it(tmp_path, monkeypatch, level, described):
    """pynetdicom's standard handlers copy every received data set and format its command set
    whatever the log level; the listener's associations, and ours as requestor (``dimse.associate``,
    used by push and retrieve), drop them unless pynetdicom logs at INFO (``-vv``), where they log
    as before. The instances are stored either way."""
    from pynetdicom import _handlers

    from pacsbridge.listener.handlers import StoreHandlers
    from pacsbridge.listener.peers import parse_peers
    from pacsbridge.listener.server import make_ae
    from pacsbridge.shared.index.storage import Storage

    calls: list[str] = []
    for name in ("_recv_c_store_rq", "_send_c_store_rq"):  # the listener's side, the sender's side
        real = getattr(_handlers, name)
        monkeypatch.setattr(_handlers, name, lambda event, name=name, real=real: calls.append(name) or real(event))
    logger = logging.getLogger("pynetdicom")
    old = logger.level
    logger.setLevel(level)
    storage = Storage(tmp_path / "storage", fsync=False)
    storage.ensure()
    peers = parse_peers("*")
    port = free_port()
    server = make_ae(Settings(), peers).start_server(
        ("127.0.0.1", port), block=False, evt_handlers=StoreHandlers(storage, None, peers).handlers())
    try:
        statuses = _send_all(port, [make_instance(PatientID=f"Q{i}") for i in range(3)])
    finally:
        server.shutdown()
        logger.setLevel(old)
    assert statuses == [0, 0, 0]
    assert len(_stored_files(storage.root)) == 3
    assert calls.count("_recv_c_store_rq") == described
    assert calls.count("_send_c_store_rq") == described


def _serving_pids(group: int, local_port: int, client_ports: list[int]) -> dict[int, int]:
    """Which process of process group ``group`` holds the server end of each connection from
    127.0.0.1:``client_ports`` to ``local_port`` ({client port: pid}), read from ``/proc``."""
    inodes: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == local_port and remote.startswith("0100007F:"):
            inodes[f"socket:[{inode}]"] = int(remote.split(":")[1], 16)
    found: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != group:
                continue
            for fd in (proc / "fd").iterdir():
                port = inodes.get(os.readlink(fd))
                if port in client_ports:
                    found[port] = int(proc.name)
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return found


def _wait_receivers_serving(parent: int, n: int, timeout: float = 60.0) -> None:
    """Until ``n`` child processes of ``parent`` serve: a receiver has 4 threads once its server loop is
    about to start (the peers thread is the last one started before it), 1 while it imports."""
    deadline = time.monotonic() + timeout
    while True:
        ready = 0
        for proc in Path("/proc").iterdir():
            try:
                status = dict(line.split(":\t", 1) for line in (proc / "status").read_text().splitlines()
                              if ":\t" in line)
                if int(status["PPid"]) == parent and int(status["Threads"]) >= 4:
                    ready += 1
            except (OSError, KeyError, ValueError):  # not a process, or gone meanwhile
                continue
        if ready >= n:
            time.sleep(0.2)  # from starting the peers thread to select()
            return
        assert time.monotonic() < deadline, f"{ready} of {n} receivers serving after {timeout:g} s"
        time.sleep(0.1)


def test_associations_spread_over_the_receivers(tmp_path):
    """Four associations opened one after another and held: four receiver processes serve them, one
    each. Every receiver wakes for a new connection; one already serving leaves it to an idle one
    (when all raced alike, two of the four often shared a process and its GIL)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    stack = Stack(tmp_path, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
                  PACSBRIDGE_LISTENER_PROCESSES="4")
    assocs = []
    try:
        listener = stack.start("listener")
        _wait_receivers_serving(listener.pid, 4)  # the port answers with the first; on a loaded machine
        # the others may still be importing, and a connection is not left waiting for those
        for _ in range(4):
            ae = AE(ae_title="SENDER")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", stack.port, ae_title="PACSBRIDGE")
            assert assoc.is_established
            assocs.append(assoc)
        ports = [a.dul.socket.socket.getsockname()[1] for a in assocs]
        serving = _serving_pids(listener.pid, stack.port, ports)
        assert sorted(serving) == sorted(ports)  # every connection found, in a receiver of the listener
        assert listener.pid not in serving.values()  # the parent accepts nothing itself
        assert len(set(serving.values())) == 4, serving
    finally:
        for assoc in assocs:
            assoc.release()
        stack.close()
