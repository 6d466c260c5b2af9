"""The arrival journal: what was stored, durably, without the database or the broker.

Storage is the truth, and until the journal the only way to learn what storage holds but the
index does not was to walk all of it and load every ObjectFile of the index: the reconciler did
that every ``PACSBRIDGE_RECONCILE_SECONDS``, a cost that grew with the archive (1 M files: about
4 s and 380 MB per pass). Now every process that stores instances it must not lose (the listener's
receivers, a C-GET retrieve) appends one line per instance to a journal segment of its own under
``<root>/.journal/``, and the reconciler reads only the lines written since its last pass.

Writing (:class:`JournalWriter`, one per process and storage root)
    A segment is a file of :data:`SEGMENT_BYTES` zero bytes written (and fsynced) when the segment is
    made, under a temporary name, then renamed to ``seg-<ns>-<boot>-<pid>-<random>.log`` (``boot``: the
    running kernel's boot id) and the folder fsynced: its name is durable before it holds a line. A
    line (JSON: ``[relpath, SOPInstanceUID, time]``) is written with ``pwrite`` over the zeros (the
    segment is opened for writing for that moment only: a file held open for writing keeps its file
    system from being remounted read-only) *before* the instance is linked into place (an intent).
    The line is **not** fdatasynced per instance: the instance itself is durable (its data and its
    folder fsynced) before it is acknowledged, and the line only has to outlive what can happen to
    the *process* (``kill -9``, a crash), which the page cache does. What only an operating-system crash
    or a power loss can lose (the last lines of a segment) is found again as below. When a writer
    retires a segment (full, :data:`ROTATE_SECONDS` old, or the process stopping) it fdatasyncs it, writes
    the line ``#closed`` and fdatasyncs again. The writer holds a shared ``flock`` on its open segment.

    (A per-instance fdatasync of the line cost as much as the folder's fsync, one more flush of the
    disk for every instance received: measured 2.3-3.0 ms on a loaded machine, where disks are slow; on a
    quiet machine the ingest benchmark's indexed rate moved less than its noise between invocations.)

Reading (:func:`pending` and :class:`Checkpoint`)
    ``checkpoint.json`` keeps a byte offset per segment: every line before it is *settled* (the
    instance is indexed, recorded in quarantine, or its file never came). A pass reads each
    segment from its offset up to the first zero byte, and its cost follows what arrived since the
    last pass. A segment read to its end that no writer holds (its ``flock`` can be taken: the
    writer rotated, stopped or was killed) is deleted.

Crashes
    The line is written before the link, so a crash of the process anywhere leaves either no line and
    no file (nothing was acknowledged), a line and no file (the reconciler drops the line once it is
    older than the minimum age), or a line and a file (the reconciler queues it). A line torn by a
    power loss is skipped (logged).

    A crash of the operating system (or a power loss) may lose the lines written since a segment's
    last fdatasync, while the instances they named are durable. The reconciler finds such a segment
    (:func:`lost_tails`): no writer holds it, it does not end with ``#closed``, and it was written
    under another boot of the kernel than the one running (or on another host: its boot id is not
    ours). It then walks what changed since the segment was made (:meth:`Storage.walk_changed
    <pacsbridge.shared.index.storage.Storage.walk_changed>`: every folder is listed, only files in
    folders modified since then are looked at, and those linked since then are looked up in the
    index), once per such segment (the checkpoint lists the segments recovered so).

Several listener containers on one storage
    Each writes segments of its own: a name holds the time in nanoseconds, the pid and random
    digits (pids repeat across containers), so two writers never share one. ``flock`` works
    between containers of one host (one kernel) and on NFSv4 (the kernel maps it to a byte-range
    lock there): a reconciler never deletes a segment another container still writes, and
    :class:`PassLock` lets one reconciler pass run at a time, whichever container it is in.

A storage written before the journal has no checkpoint: the reconciler walks it once, then
writes the checkpoint (see ``services/listener/server.py``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, NamedTuple

__all__ = ["JOURNAL", "MAX_LINES", "SEGMENT_BYTES", "ROTATE_SECONDS", "BOOT", "CLOSED", "Checkpoint", "Entry",
           "CHUNK_LINES", "JournalWriter", "PassLock", "born", "clean_leftovers", "fault", "lost_tails", "pending",
           "pending_chunks", "read_segment",
           "segments", "unheld", "writer_for"]

log = logging.getLogger(__name__)

#: Folder (inside the storage root) of the journal; one of storage's own folders.
JOURNAL = ".journal"
#: Size of a segment (zeros written when it is made): about 1,000 to 2,500 lines.
SEGMENT_BYTES = 256 << 10
#: A writer starts a new segment at its first line after this many seconds.
ROTATE_SECONDS = 3600.0
CHECKPOINT = "checkpoint.json"
#: The last line of a segment its writer retired (every line before it was fdatasynced first).
CLOSED = b"#closed\n"
LOCK = "reconcile.lock"
_PREFIX, _SUFFIX = "seg-", ".log"

# Fault points for the crash tests (tests/test_journal.py): the process kills itself (SIGKILL) at
# the named point of the store path. Read once: the hot path pays one comparison.
_FAULT = os.environ.get("PB_TEST_JOURNAL_FAULT", "")


def _boot_id() -> str:
    """The running kernel's boot id (32 hex digits; ``unknown`` where there is none): a segment written
    under another boot may have lost its last lines to the crash that ended that boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip().replace("-", "").lower()
    except OSError:
        return "unknown"
    return boot if boot.isalnum() else "unknown"


#: This kernel's boot id (containers of one host share it, as they share its page cache).
BOOT = _boot_id()


def fault(point: str) -> None:
    """Die here (``kill -9`` of this process) when the crash tests ask for ``point``."""
    if _FAULT == point:
        os.kill(os.getpid(), 9)


class Entry(NamedTuple):
    """One line of a segment."""

    segment: str  #: file name of its segment
    end: int  #: byte offset just past its line
    relpath: str
    sop: str
    at: float  #: when it was written (seconds since the epoch)


class _Segment:
    """An open segment of a writer."""

    def __init__(self, folder: Path, size: int, durable: bool) -> None:
        self.name = f"{_PREFIX}{time.time_ns():020d}-{BOOT}-{os.getpid()}-{uuid.uuid4().hex[:8]}{_SUFFIX}"
        self.path = folder / self.name
        tmp = folder / f".{self.name}.tmp"
        # Held open read-only (the flock, fdatasync): a file held open for writing would make a
        # remount read-only fail (EBUSY); each line opens it for writing for the pwrite alone.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.fd = -1
        try:
            self.fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(self.fd, fcntl.LOCK_SH)  # before its name is public: never deleted under a writer
            if durable:  # real blocks, so that a later fdatasync has data only to write
                zeros = bytes(1 << 16)
                for offset in range(0, size, len(zeros)):
                    os.pwrite(fd, zeros[: size - offset], offset)
                os.fsync(fd)
            else:
                os.ftruncate(fd, size)
            os.rename(tmp, self.path)
            if durable:
                _sync_dir(folder)
        except BaseException:
            if self.fd >= 0:
                os.close(self.fd)
            _unlink(tmp)
            raise
        finally:
            os.close(fd)
        self.size = size
        self.offset = 0  # bytes written (every byte before it is written)
        self.born = time.monotonic()
        self.closed = False


class JournalWriter:
    """The journal of one process on one storage root (see the module docstring).

    Parameters
    ----------
    root : Path
        The storage root; segments go to ``root/.journal``.
    durable : bool
        Make segments durable when made and retired (storage's ``fsync``).
    segment_bytes, rotate_seconds : int, float
        When to start a new segment.
    """

    def __init__(self, root: Path | str, durable: bool = True, segment_bytes: int = SEGMENT_BYTES,
                 rotate_seconds: float = ROTATE_SECONDS) -> None:
        self.folder = Path(root) / JOURNAL
        self.durable = durable
        self.segment_bytes = segment_bytes
        self.rotate_seconds = rotate_seconds
        self._lock = threading.Lock()
        self._segment: _Segment | None = None

    def record(self, relpath: str, sop: str) -> tuple[_Segment, int]:
        """Write the line of one instance (in the page cache: see the module docstring); returns
        ``(segment, offset past the line)``."""
        line = (json.dumps([relpath, sop, round(time.time(), 3)], ensure_ascii=True, separators=(",", ":"))
                + "\n").encode("ascii")
        with self._lock:
            seg = self._segment
            if seg is None or seg.offset + len(line) + len(CLOSED) > seg.size or \
                    time.monotonic() - seg.born > self.rotate_seconds:
                if seg is not None:
                    self._retire(seg)
                    self._segment = None
                self.folder.mkdir(exist_ok=True)
                seg = self._segment = _Segment(self.folder, max(self.segment_bytes, len(line) + len(CLOSED)),
                                               self.durable)
            fd = os.open(seg.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, line, seg.offset)
            finally:
                os.close(fd)
            seg.offset += len(line)
            return seg, seg.offset

    def _retire(self, seg: _Segment) -> None:
        """Close a segment: its lines made durable, then :data:`CLOSED` after them (when there is room;
        a segment without it is only walked for after another boot), then durable too."""
        if self.durable:
            os.fdatasync(seg.fd)
        if seg.offset + len(CLOSED) <= seg.size:
            fd = os.open(seg.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, CLOSED, seg.offset)
            finally:
                os.close(fd)
            seg.offset += len(CLOSED)
            if self.durable:
                os.fdatasync(seg.fd)
        seg.closed = True
        os.close(seg.fd)  # releases the flock: the reconciler may delete it once settled

    def close(self) -> None:
        with self._lock:
            if self._segment is not None:
                self._retire(self._segment)
                self._segment = None


_writers: dict[tuple[str, int], JournalWriter] = {}
_writers_lock = threading.Lock()


def writer_for(root: Path | str, durable: bool = True) -> JournalWriter:
    """The journal writer of this process for ``root`` (a forked child gets its own)."""
    key = (str(Path(root).absolute()), os.getpid())
    with _writers_lock:
        writer = _writers.get(key)
        if writer is None:
            writer = _writers[key] = JournalWriter(root, durable)
        return writer


# -- reading ----------------------------------------------------------------
def segments(root: Path | str) -> list[str]:
    """Names of the segments under ``root/.journal``, oldest first."""
    try:
        names = os.listdir(Path(root) / JOURNAL)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(_PREFIX) and n.endswith(_SUFFIX))


def read_segment(path: Path, start: int) -> tuple[list[Entry], int]:
    """The complete lines of a segment from byte ``start``, and the offset past the last one."""
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read()
    stop = data.find(b"\0")
    if stop >= 0:
        data = data[:stop]
    data = data[: data.rfind(b"\n") + 1]  # a line still being written (or torn) waits
    entries, offset = [], start
    for raw in data.split(b"\n")[:-1]:
        offset += len(raw) + 1
        if raw.startswith(b"#"):  # CLOSED: not an instance
            continue
        try:
            rel, sop, at = json.loads(raw)
            entries.append(Entry(path.name, offset, str(rel), str(sop), float(at)))
        except (ValueError, TypeError):  # torn by a power loss: an entry naming nothing, settled at once
            log.warning("journal %s: unreadable line at byte %d skipped", path.name, offset - len(raw) - 1)
            entries.append(Entry(path.name, offset, "", "", 0.0))
    return entries, offset


#: Most lines one reconciler pass reads (a backlog, say a day with the workers down, is read over
#: several passes, so a pass's time stays bounded).
MAX_LINES = 100_000
#: Lines a pass holds at once (:func:`pending_chunks`): it settles them and lets them go before it
#: reads more, so its memory follows this, not what arrived in a period (up to :data:`MAX_LINES`).
#: A chunk holds whole segments, so it can hold one segment's lines more than this.
CHUNK_LINES = 5_000


def pending(root: Path | str, checkpoint: "Checkpoint",
            limit: int = MAX_LINES) -> dict[str, tuple[list[Entry], int]]:
    """Per segment, oldest first: its lines after the checkpoint, and the offset past the last one
    read (at most ``limit`` lines in all; a segment cut short ends at its last line read).
    :func:`pending_chunks` in one piece (a chunk of ``limit`` lines never splits: no more are read)."""
    out: dict[str, tuple[list[Entry], int]] = {}
    for part in pending_chunks(root, checkpoint, limit, chunk=limit):
        out.update(part)
    return out


def pending_chunks(root: Path | str, checkpoint: "Checkpoint", limit: int = MAX_LINES,
                   chunk: int = CHUNK_LINES) -> Iterator[dict[str, tuple[list[Entry], int]]]:
    """:func:`pending`, a few segments at a time: each dict holds whole segments (the first one
    whatever its size, then segments while the chunk holds fewer than ``chunk`` lines), at most
    ``limit`` lines in all, oldest first. Segments are read as the chunks are asked for: what the
    caller lets go of before asking for the next chunk is not held while later ones are read (the
    generator holds one segment's lines ahead)."""
    out: dict[str, tuple[list[Entry], int]] = {}
    held = 0
    left = limit
    for name in segments(root):
        if left <= 0:
            break
        try:
            lines, end = read_segment(Path(root) / JOURNAL / name, checkpoint.offsets.get(name, 0))
        except FileNotFoundError:
            continue
        if len(lines) > left:
            lines = lines[:left]
            end = lines[-1].end
        left -= len(lines)
        if out and held + len(lines) > chunk:
            yield out
            out, held = {}, 0
        out[name] = (lines, end)
        held += len(lines)
    if out:
        yield out


def unheld(root: Path | str, name: str) -> bool:
    """True when no writer holds segment ``name`` (its writer rotated, stopped or died)."""
    try:
        fd = os.open(Path(root) / JOURNAL / name, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    finally:
        os.close(fd)  # the lock goes with it


def born(name: str) -> float:
    """When segment ``name`` was made (seconds since the epoch), from its name."""
    try:
        return int(name[len(_PREFIX):].split("-", 1)[0]) / 1e9
    except ValueError:
        return 0.0


def _boot_of(name: str) -> str:
    parts = name[len(_PREFIX):-len(_SUFFIX)].split("-")
    return parts[1] if len(parts) == 4 else "unknown"  # a segment named before boot ids: unknown


def _closed(path: Path) -> bool:
    with open(path, "rb") as fh:
        data = fh.read()
    stop = data.find(b"\0")
    return (data if stop < 0 else data[:stop]).endswith(CLOSED)


def lost_tails(root: Path | str, recovered: set[str]) -> list[str]:
    """Segments whose last lines an operating-system crash may have lost (module docstring): no writer
    holds them, they were not closed, and they were written under another boot than this one; those
    in ``recovered`` (walked for already) are left out."""
    out = []
    for name in segments(root):
        if name in recovered or _boot_of(name) == BOOT:
            continue
        try:
            if unheld(root, name) and not _closed(Path(root) / JOURNAL / name):
                out.append(name)
        except FileNotFoundError:
            continue
    return out


def clean_leftovers(root: Path | str, older_than: float = 3600.0) -> int:
    """Remove temporary files a crash left in the journal folder (a segment being made, a checkpoint
    being written) once they are ``older_than`` seconds old and no writer holds them."""
    folder, n = Path(root) / JOURNAL, 0
    try:
        names = [name for name in os.listdir(folder) if name.startswith(".") and name.endswith(".tmp")]
    except FileNotFoundError:
        return 0
    for name in names:
        try:
            if time.time() - os.stat(folder / name).st_mtime >= older_than and unheld(root, name):
                os.unlink(folder / name)
                n += 1
        except OSError:
            continue
    return n


class Checkpoint:
    """``root/.journal/checkpoint.json``: how far each segment is settled, and when storage was last
    walked whole (absent: a storage from before the journal, walked once by the reconciler)."""

    def __init__(self, root: Path | str, durable: bool = True) -> None:
        self.folder = Path(root) / JOURNAL
        self.path = self.folder / CHECKPOINT
        self.durable = durable
        self.offsets: dict[str, int] = {}
        self.walked_at: float | None = None
        #: segments with a lost tail already walked for (:func:`lost_tails`)
        self.recovered: set[str] = set()

    def load(self) -> "Checkpoint":
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return self
        except ValueError:  # torn by a power loss before its rename was durable: walk again
            log.warning("journal checkpoint %s unreadable: storage will be walked once", self.path)
            return self
        self.walked_at = data.get("walked_at")
        self.offsets = {str(k): int(v) for k, v in data.get("segments", {}).items()}
        self.recovered = {str(n) for n in data.get("recovered", [])}
        return self

    def save(self) -> None:
        """Replace the file atomically (write, fsync, rename, fsync the folder)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        # under PassLock, so one writer at a time; the host name too, as pids repeat across containers
        tmp = self.folder / f".{CHECKPOINT}.{socket.gethostname()}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"version": 1, "walked_at": self.walked_at, "segments": self.offsets,
                       "recovered": sorted(self.recovered)}, fh)
            fh.flush()
            if self.durable:
                os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        if self.durable:
            _sync_dir(self.folder)


class PassLock:
    """One reconciler pass at a time on a storage root (several listeners may share it):
    ``with PassLock(root) as held:`` ... ``held`` is False when another pass runs."""

    def __init__(self, root: Path | str) -> None:
        self.path = Path(root) / JOURNAL / LOCK
        self.fd = -1

    def __enter__(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
