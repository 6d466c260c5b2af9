"""The arrival journal and the reconciler that reads it (shared/index/journal.py, services/listener/server.py).

The reconciler's periodic pass must cost what arrived since the last pass, not what storage holds:
these tests make the storage walk and the whole-index read raise, and check that what the journal
names is found (a large tree with 10 instances missing, a broker outage, a process killed at each
point of the store path), that segments rotate and settled ones go, and that the checkpoint
outlives the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import redis as redis_client

from pacsbridge.shared.index.conquest import Index
from pacsbridge.shared.index import journal
from pacsbridge.shared.index.journal import JOURNAL, Checkpoint, JournalWriter, pending, segments, unheld
from pacsbridge.shared.index.storage import Storage

from .helpers import make_instance
from .servers import ThrowawayRedis
from .test_listener import Stack, indexed_sops, storescu


@pytest.fixture
def broker():
    server = ThrowawayRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def no_walk(monkeypatch):
    """The periodic pass may read neither the whole storage nor the whole index."""
    def refuse(*_a, **_k):
        raise AssertionError("the reconciler's periodic pass walked the storage or read every ObjectFile")

    monkeypatch.setattr(Storage, "walk", refuse)
    monkeypatch.setattr(Storage, "iter_files", refuse)
    monkeypatch.setattr(Storage, "walk_changed", refuse)
    monkeypatch.setattr(Index, "object_files", refuse)


def walked(root: Path) -> None:
    """A storage whose first full walk is done (as the reconciler records it)."""
    cp = Checkpoint(root, durable=False).load()
    cp.walked_at = time.time()
    cp.save()


def queued(server: ThrowawayRedis) -> list[bytes]:
    client = redis_client.Redis(port=server.port)
    try:
        return list(client.lrange("pacsbridge", 0, -1))
    finally:
        client.close()


def reconcile(ctx, server, min_age: float = 0.0) -> int:
    from pacsbridge.listener.server import reconcile_once

    return reconcile_once(ctx.settings.with_(broker_url=server.url), min_age=min_age)


def _bulk_index(ctx, rows: list[tuple[str, str]]) -> None:
    images = ctx.index.tables["Image"]
    key = ctx.index.schema["Image"].key.column
    with ctx.index.engine.begin() as conn:
        for i in range(0, len(rows), 5000):
            conn.execute(images.insert(), [{key: sop, "ObjectFile": rel, "DeviceName": "MAG0"}
                                           for sop, rel in rows[i:i + 5000]])


def test_fifty_thousand_files_ten_missing_the_pass_reads_only_the_journal(ctx, broker, no_walk):
    root = ctx.storage.root
    t0 = time.monotonic()
    rows = []
    for p in range(50):
        for s in range(10):
            folder = root / f"P{p:03d}" / f"1.2.3.{p}" / f"1.2.3.{p}.{s}"
            folder.mkdir(parents=True)
            for i in range(100):
                sop = f"1.2.3.{p}.{s}.{i}"
                os.close(os.open(folder / f"{sop}.dcm", os.O_CREAT | os.O_WRONLY, 0o644))
                rows.append((sop, f"P{p:03d}/1.2.3.{p}/1.2.3.{p}.{s}/{sop}.dcm"))
    assert len(rows) == 50_000
    missing = rows[-10:]
    _bulk_index(ctx, rows[:-10])
    walked(root)
    # the last 1,000 arrivals are in the journal (those before were settled long ago)
    writer = JournalWriter(root, durable=False)
    for sop, rel in rows[-1000:]:
        writer.record(rel, sop)
    writer.close()
    setup = time.monotonic() - t0

    t0 = time.monotonic()
    assert reconcile(ctx, broker) == 10
    took = time.monotonic() - t0
    body = b"".join(queued(broker))
    assert all(rel.encode() in body for _, rel in missing)
    assert not any(rel.encode() in body for _, rel in rows[-1000:-10])
    print(f"pass {took:.3f} s, setup {setup:.1f} s")
    assert took < 2.0, f"pass took {took:.2f} s (setup {setup:.1f} s)"
    # still not indexed: queued again, and the checkpoint stopped at the first of them
    assert reconcile(ctx, broker) == 10
    (name,) = segments(root)
    lines, end = pending(root, Checkpoint(root).load())[name]
    assert [line.relpath for line in lines] == [rel for _, rel in missing]
    # indexed now: settled, and the segment (no writer holds it) is deleted
    _bulk_index(ctx, missing)
    assert reconcile(ctx, broker) == 0
    assert segments(root) == [] and Checkpoint(root).load().offsets == {}


def test_an_old_storage_is_walked_once_then_only_the_journal_is_read(ctx, broker, tmp_path, monkeypatch):
    """A deployment from before the journal: no checkpoint, so the first pass walks (and queues what
    is missing); the walk is recorded and never made again."""
    ds = make_instance(tmp_path / "a.dcm", PatientID="OLD")
    ctx.storage.store(tmp_path / "a.dcm", ds)  # stored without a journal (the old listener)
    assert reconcile(ctx, broker) == 1
    assert Checkpoint(ctx.storage.root).load().walked_at is not None
    monkeypatch.setattr(Storage, "walk", lambda *_: pytest.fail("walked again"))
    monkeypatch.setattr(Storage, "iter_files", lambda *_: pytest.fail("walked again"))
    assert reconcile(ctx, broker) == 0  # no journal line names it: rebuild --missing is the walk on request


def test_rotation_deletion_and_the_checkpoint_across_restarts(ctx, broker, no_walk):
    root = ctx.storage.root
    walked(root)
    writer = JournalWriter(root, durable=True, segment_bytes=4096)
    for i in range(120):  # ~40 bytes a line
        writer.record(f"R/x/{i:04d}.dcm", f"9.9.{i}")
    names = segments(root)
    assert len(names) >= 2  # rotated by size
    for i in range(0, 120, 2):  # half of them stored for real (the others never came)
        path = root / "R" / "x" / f"{i:04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    _bulk_index(ctx, [(f"9.9.{i}", f"R/x/{i:04d}.dcm") for i in range(0, 120, 2)])
    assert reconcile(ctx, broker) == 0  # every line settled: indexed, or a file that never came
    # the retired segments are gone; the open one (its writer holds it) stays, read to its end
    left = segments(root)
    assert left == names[-1:]
    cp = Checkpoint(root).load()
    assert cp.offsets[left[0]] == pending(root, Checkpoint(root))[left[0]][1]
    # a restarted reconciler (a new process: the checkpoint comes from disk) reads nothing old
    writer.record("R/x/late.dcm", "9.9.999")
    (root / "R" / "x" / "late.dcm").write_bytes(b"")
    lines = [e for es, _ in pending(root, Checkpoint(root).load()).values() for e in es]
    assert [e.relpath for e in lines] == ["R/x/late.dcm"]
    assert reconcile(ctx, broker) == 1
    assert reconcile(ctx, broker, min_age=3600) == 0  # too young to count as missed: waits
    writer.close()  # the writer stops: once settled, its last segment goes too
    _bulk_index(ctx, [("9.9.999", "R/x/late.dcm")])
    assert reconcile(ctx, broker) == 0 and segments(root) == []
    # rotation by time
    writer = JournalWriter(root, durable=False, rotate_seconds=0.0)
    for i in range(3):
        writer.record(f"T/{i}.dcm", f"8.8.{i}")
        time.sleep(0.01)
    assert len(segments(root)) == 3
    writer.close()


_STORE_SCRIPT = """
import sys, pydicom
from pacsbridge.shared.index.storage import Storage
storage = Storage(sys.argv[1], fsync=True).enable_journal()
storage.ensure()
result = storage.store(sys.argv[2], pydicom.dcmread(sys.argv[2], stop_before_pixels=True))
print("acknowledged", result.relpath, flush=True)
"""


@pytest.mark.parametrize("point, acknowledged, found", [
    ("before-journal", False, False),  # nothing written: nothing to find
    ("after-journal", False, False),  # a line, no file: dropped after the minimum age
    ("after-link", False, True),  # the file is there (not acknowledged): found and indexed
    ("after-sync", False, True),
    ("", True, True),  # no crash
])
def test_kill_9_at_each_point_of_the_store_path(ctx, broker, no_walk, tmp_path, point, acknowledged, found):
    """Either the instance was acknowledged and the next pass finds it, or it never was."""
    root = ctx.storage.root
    walked(root)
    ds = make_instance(tmp_path / "k.dcm", PatientID="KILL")
    env = {**os.environ, "PB_TEST_JOURNAL_FAULT": point}
    proc = subprocess.run([sys.executable, "-c", _STORE_SCRIPT, str(root), str(tmp_path / "k.dcm")], env=env,
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert ("acknowledged" in proc.stdout) == acknowledged, proc.stderr
    assert proc.returncode == (0 if not point else -9), proc.stderr
    rel = ctx.storage.path_for(ds)
    assert reconcile(ctx, broker) == int(found)
    assert (rel.encode() in b"".join(queued(broker))) == found
    if found:
        assert (root / rel).is_file()
        assert pydicom.dcmread(root / rel).SOPInstanceUID == ds.SOPInstanceUID  # complete
    else:
        assert segments(root) == []  # a line that named nothing is dropped with its dead writer's segment
    if found and not acknowledged:  # the sender sends it again: stored once
        again = Storage(root, fsync=False).enable_journal().store(tmp_path / "k.dcm", ds)
        assert again.action == "duplicate"


def test_instances_stored_while_the_broker_is_down_are_found_by_the_journal(tmp_path, broker):
    """No walk is ever made here (the checkpoint says storage was walked): the reconciler finds
    the instances the receivers could not queue in the journal alone."""
    stack = Stack(tmp_path, broker_url=broker.url)
    walked(stack.settings.storage)
    try:
        stack.start("listener")
        broker.stop()
        files = [make_instance(tmp_path / "in" / f"{i}.dcm", PatientID="DOWN") for i in range(8)]
        proc = storescu(stack.port, *sorted((tmp_path / "in").iterdir()))
        assert proc.returncode == 0, proc.stderr  # stored and acknowledged while the broker is down
        root = stack.settings.storage
        lines = [e for es, _ in pending(root, Checkpoint(root)).values() for e in es]
        assert sorted(e.sop for e in lines) == sorted(d.SOPInstanceUID for d in files)
        time.sleep(3)
        broker.start()  # empty: what the receivers tried to queue is gone
        stack.start("worker", "--concurrency", "1")
        assert indexed_sops(stack.settings, 8, timeout=90) == {d.SOPInstanceUID for d in files}
        deadline = time.monotonic() + 30  # the journal settles: nothing left after the checkpoint
        while time.monotonic() < deadline and any(es for es, _ in pending(root, Checkpoint(root).load()).values()):
            time.sleep(0.5)
        assert not any(es for es, _ in pending(root, Checkpoint(root).load()).values())
        assert (root / JOURNAL).is_dir() and not any(p.startswith(JOURNAL) for p in Storage(root).walk())
    finally:
        stack.close()


def test_a_torn_line_is_skipped_and_its_segment_still_settles(ctx, broker, no_walk):
    """A power loss can leave half a line: it is logged once, counts as settled, and does not keep its
    segment for ever."""
    root = ctx.storage.root
    walked(root)
    writer = JournalWriter(root, durable=False)
    writer.record("A/1.dcm", "7.7.1")
    seg, _ = writer.record("A/2.dcm", "7.7.2")
    with open(seg.path, "r+b") as fh:  # a line cut short, then the end of the data
        fh.seek(seg.offset)
        fh.write(b'["A/3.d\n')
    seg.offset += 8
    writer.close()
    lines = [e for es, _ in pending(root, Checkpoint(root)).values() for e in es]
    assert [e.relpath for e in lines] == ["A/1.dcm", "A/2.dcm", ""]
    assert reconcile(ctx, broker) == 0  # no file came for 1 and 2: dropped; the torn line: settled
    assert segments(root) == []


def test_a_c_get_retrieve_journals_its_stores_and_an_import_does_not(ctx, tmp_path):
    """C-GET instances are indexed only when the association ends: a worker killed before that leaves
    them to the journal. The context's own storage (import, repack) stays unjournaled."""
    from pacsbridge.shared.dicom.node import Node
    from pacsbridge.shared.nodes.sources import GetDownloader

    downloader = GetDownloader(Node(name="pacs", ae_title="PACS", host="127.0.0.1", port=104), "PACSBRIDGE", ctx)
    assert downloader.storage.journal is not None and ctx.storage.journal is None
    ds = make_instance(tmp_path / "g.dcm", PatientID="GET")
    rel = downloader.storage.store(tmp_path / "g.dcm", ds).relpath
    lines = [e for es, _ in pending(ctx.storage.root, Checkpoint(ctx.storage.root)).values() for e in es]
    assert [(e.relpath, e.sop) for e in lines] == [(rel, ds.SOPInstanceUID)]
    ctx.storage.store(tmp_path / "g.dcm", make_instance(PatientID="IMPORT"))
    assert len([e for es, _ in pending(ctx.storage.root, Checkpoint(ctx.storage.root)).values() for e in es]) == 1


def test_leftovers_of_a_crash_in_the_journal_folder_are_removed_when_old(tmp_path):
    from pacsbridge.shared.index.journal import clean_leftovers

    folder = tmp_path / JOURNAL
    folder.mkdir()
    old, new = folder / ".seg-1-2-x.log.tmp", folder / ".checkpoint.json.7.tmp"
    old.write_bytes(b"\0" * 10)
    new.write_text("{")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert clean_leftovers(tmp_path) == 1
    assert not old.exists() and new.exists()


def test_a_receiver_killed_after_the_link_the_reconciler_indexes_what_it_left(tmp_path, broker):
    """The listener itself: each receiver kills itself (SIGKILL) right after linking an instance into
    place, before the folder's fsync and the answer. The sender gets no success; the parent starts
    another receiver; the reconciler finds the instance in the journal (never by a walk) and it is
    indexed."""
    stack = Stack(tmp_path, broker_url=broker.url, PB_TEST_JOURNAL_FAULT="after-link")
    walked(stack.settings.storage)
    try:
        stack.start("listener")
        stack.start("worker", "--concurrency", "1")
        ds = make_instance(tmp_path / "in" / "k.dcm", PatientID="KILLED")
        proc = storescu(stack.port, tmp_path / "in" / "k.dcm")
        assert "Success" not in proc.stdout + proc.stderr or proc.returncode != 0
        assert indexed_sops(stack.settings, 1, timeout=60) == {ds.SOPInstanceUID}
        assert "exited (code -9)" in "".join(p.read_text() for p in stack.logs.iterdir())
    finally:
        stack.close()


def test_a_backlog_is_read_over_several_passes(ctx, broker, no_walk, monkeypatch):
    """At most MAX_LINES lines a pass: memory stays bounded, and segments the pass did not reach keep
    their place in the checkpoint."""
    from pacsbridge.shared.index import journal

    root = ctx.storage.root
    walked(root)
    writer = JournalWriter(root, durable=False, segment_bytes=1024)
    for i in range(100):
        writer.record(f"B/{i:03d}.dcm", f"6.6.{i}")
    writer.close()
    for i in (5, 55, 95):  # three of them are stored and not indexed
        (root / "B").mkdir(exist_ok=True)
        (root / "B" / f"{i:03d}.dcm").write_bytes(b"")
    monkeypatch.setattr(journal, "MAX_LINES", 30)
    counts = []
    for _ in range(6):
        counts.append(reconcile(ctx, broker))
        if sum(len(es) for es, _ in pending(root, Checkpoint(root).load()).values()) <= 3:
            break
    assert sum(counts) >= 3 and counts[0] == 1  # each pass reads 30 lines: the backlog goes by
    left = [e.relpath for es, _ in pending(root, Checkpoint(root).load()).values() for e in es]
    assert "B/005.dcm" in left and "B/095.dcm" in left  # still pending (stored, not indexed)
    _bulk_index(ctx, [(f"6.6.{i}", f"B/{i:03d}.dcm") for i in (5, 55, 95)])
    for _ in range(6):
        reconcile(ctx, broker)
    assert segments(root) == []


# -- an operating-system crash: the lines after the segment's last fdatasync are lost ---------------------
_STORE_AND_DIE = """
import os, sys, pydicom
from pacsbridge.shared.index.storage import Storage
storage = Storage(sys.argv[1], fsync=True).enable_journal()
storage.ensure()
for path in sys.argv[2:]:
    result = storage.store(path, pydicom.dcmread(path, stop_before_pixels=True))
    print("acknowledged", result.relpath, flush=True)
os._exit(0)  # no clean retirement of the segment: what a crash leaves
"""


def _store_and_die(root: Path, files: list[Path]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _STORE_AND_DIE, str(root), *map(str, files)], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    return [line.split()[1] for line in proc.stdout.splitlines()]


def _as_if_another_boot(root: Path, name: str) -> str:
    """The segment as the reconciler finds it after a reboot: named with another kernel's boot id."""
    parts = name.split("-")
    assert parts[2] == journal.BOOT, name
    parts[2] = "0" * len(journal.BOOT)
    other = "-".join(parts)
    os.rename(root / JOURNAL / name, root / JOURNAL / other)
    return other


def test_an_os_crash_that_lost_a_segments_last_lines_is_made_good_by_walking_what_changed(ctx, broker, tmp_path,
                                                                                          monkeypatch):
    """Lines are not fdatasynced per instance (the instance is): an operating-system crash can lose the
    last lines of a segment. After the reboot the reconciler sees a segment that nobody holds, that
    was not closed and that another boot wrote: it walks what changed since the segment was made
    (not the whole storage, not the whole index) and queues the acknowledged instances whose lines
    were lost, once; the older unindexed files of the tree are not its business."""
    root = ctx.storage.root
    walked(root)
    old = [make_instance(tmp_path / "old" / f"{i}.dcm", PatientID="OLD") for i in range(20)]
    for i, ds in enumerate(old):  # stored long before (a folder of its own), never indexed, not journaled
        Storage(root, fsync=False).store(tmp_path / "old" / f"{i}.dcm", ds)
    time.sleep(2.5)  # older than the segment (its birth less the 2 s allowed for coarse timestamps)
    files = [tmp_path / "in" / f"{i}.dcm" for i in range(3)]
    for f in files:
        make_instance(f, PatientID="CRASH")
    stored = _store_and_die(root, files)
    assert len(stored) == 3
    [name] = segments(root)
    lines, _ = journal.read_segment(root / JOURNAL / name, 0)
    with open(root / JOURNAL / name, "r+b") as fh:  # the page cache's last two lines never reached the disk
        fh.seek(lines[0].end)
        fh.write(bytes(lines[-1].end - lines[0].end))
    name = _as_if_another_boot(root, name)
    assert journal.lost_tails(root, set()) == [name]

    walks: list[float] = []
    real_walk = Storage.walk_changed

    def counted(self, since):  # type: ignore[no-untyped-def]
        walks.append(since)
        return real_walk(self, since)

    def refuse(*_a, **_k):
        raise AssertionError("the whole storage or the whole index was read")

    monkeypatch.setattr(Storage, "walk_changed", counted)
    monkeypatch.setattr(Storage, "walk", refuse)
    monkeypatch.setattr(Storage, "iter_files", refuse)
    monkeypatch.setattr(Index, "object_files", refuse)
    assert reconcile(ctx, broker) == 3
    sent = b"".join(queued(broker))
    assert all(rel.encode() in sent for rel in stored)
    assert not any(ctx.storage.path_for(ds).encode() in sent for ds in old)
    assert len(walks) == 1 and walks[0] <= journal.born(name)
    assert Checkpoint(root).load().recovered == {name}
    assert reconcile(ctx, broker) == 3  # not indexed yet: queued again, by their lines (the walk wrote them again)
    assert len(walks) == 1  # walked for once


def test_a_segment_closed_by_its_writer_or_written_under_this_boot_is_not_walked_for(ctx, broker, tmp_path,
                                                                                      no_walk):
    """A retired segment ends with #closed (its lines fdatasynced first): another boot's is read as it is.
    A segment this boot wrote and nobody closed (a process killed) lost nothing: the page cache holds it."""
    root = ctx.storage.root
    walked(root)
    writer = JournalWriter(root, durable=True)
    writer.record("A/1.dcm", "7.7.1")
    writer.close()
    [closed] = segments(root)
    assert (root / JOURNAL / closed).read_bytes().rstrip(b"\0").endswith(journal.CLOSED)
    _as_if_another_boot(root, closed)
    make_instance(tmp_path / "k.dcm", PatientID="KEPT")
    _store_and_die(root, [tmp_path / "k.dcm"])  # this boot, not closed
    assert journal.lost_tails(root, set()) == []
    assert reconcile(ctx, broker) == 1  # the killed writer's instance, by its line; no walk (no_walk)


def test_writers_with_the_same_pid_on_one_storage_keep_apart(tmp_path):
    """Two listener containers on one storage volume: each receiver may be pid 1 (or 2) in its own pid
    namespace. Made for real with ``unshare --pid``: their segments must differ, both lines be read,
    and neither segment be taken for unheld while its writer lives (the flock)."""
    import shutil

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root for a pid namespace")
    root = tmp_path / "data"
    root.mkdir()
    code = ("import os, sys\nfrom pacsbridge.shared.index.journal import writer_for\n"
            "w = writer_for(sys.argv[1], durable=False)\nw.record(sys.argv[2], sys.argv[3])\n"
            "print(os.getpid(), flush=True)\nsys.stdin.readline()\n")
    writers = []
    try:
        for n in (1, 2):
            proc = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-c", code, str(root),
                                     f"p/{n}.dcm", f"1.2.3.{n}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)
            writers.append(proc)
            assert proc.stdout.readline().strip() == "1"  # the same pid in both
        names = segments(root)
        assert len(names) == 2
        lines = pending(root, Checkpoint(root, durable=False).load())
        assert sorted(e.sop for found, _ in lines.values() for e in found) == ["1.2.3.1", "1.2.3.2"]
        assert not any(unheld(root, name) for name in names)  # both writers alive: neither may be deleted
    finally:
        for proc in writers:
            proc.communicate("\n", timeout=30)
    assert all(unheld(root, name) for name in names)  # gone: settled segments may go now


def test_a_pass_holds_one_chunk_of_lines_at_a_time(ctx, broker, no_walk, monkeypatch):
    """The lines a period wrote (up to MAX_LINES) are settled a chunk at a time (CHUNK_LINES, whole
    segments): the index is asked about one chunk's UIDs at a time, and the result is the same as
    reading them all at once (what is indexed settles, what is stored and not indexed is queued)."""
    from pacsbridge.shared.index.journal import pending_chunks

    root = ctx.storage.root
    walked(root)
    writer = JournalWriter(root, durable=False, segment_bytes=2048)  # about 40 lines a segment
    rows = [(f"6.7.{i}", f"C/{i:04d}.dcm") for i in range(1200)]
    for sop, rel in rows:
        writer.record(rel, sop)
    writer.close()
    per_segment = max(len(es) for es, _ in pending(root, Checkpoint(root).load()).values())
    (root / "C").mkdir()
    for i in (7, 700, 1199):  # stored, not indexed
        (root / "C" / f"{i:04d}.dcm").write_bytes(b"")
    _bulk_index(ctx, [row for i, row in enumerate(rows) if i not in (7, 700, 1199)])
    monkeypatch.setattr(journal, "CHUNK_LINES", 100)
    asked: list[int] = []
    lookup = Index.lookup_sop
    monkeypatch.setattr(Index, "lookup_sop", lambda self, sops: asked.append(len(sops)) or lookup(self, sops))

    assert reconcile(ctx, broker) == 3
    assert len(asked) >= 1200 // (100 + per_segment)  # a chunk at a time, not every line at once
    assert max(asked) < 100 + per_segment and sum(asked) == 1200
    body = b"".join(queued(broker))
    assert all(f"C/{i:04d}.dcm".encode() in body for i in (7, 700, 1199))
    # the checkpoint stops at the first pending line of each segment; settled segments are gone
    left = [e.relpath for es, _ in pending(root, Checkpoint(root).load()).values() for e in es]
    assert left[0] == "C/0007.dcm" and "C/0700.dcm" in left and "C/1199.dcm" in left
    assert len(left) < 3 * per_segment
    # chunks hold whole segments, and the generator's chunks add up to pending()'s lines
    chunks = list(pending_chunks(root, Checkpoint(root).load(), chunk=1))
    assert [e for c in chunks for es, _ in c.values() for e in es] == \
        [e for es, _ in pending(root, Checkpoint(root).load()).values() for e in es]
    assert all(len(c) == 1 for c in chunks)
    _bulk_index(ctx, [rows[i] for i in (7, 700, 1199)])
    assert reconcile(ctx, broker) == 0
    assert segments(root) == []
