"""Bring DICOM files into storage and the index: ``import`` and ``rebuild``.

Reading headers (and copying files into storage) runs in worker processes;
the parent writes the index, many instances per transaction. Each file ends
in one :class:`Outcome`: ``stored`` (new file in storage and indexed),
``indexed`` (indexed where it lies: rebuild, ``--in-place``), ``duplicate``
(this SOP Instance is already stored; the policy kept the existing file) or
``rejected`` (with the reason). A rejected file never touches what is
already stored or indexed.

Only regular files are read: a FIFO, a socket or a device is rejected
("not a regular file") without being opened for a blocking read, and a
symbolic link to a folder is not followed (and listed). An import confined to
a root (the ``import`` job: ``PACSBRIDGE_IMPORT_ROOT``) checks every file
after resolving links, when it is listed and again on the descriptor it
reads, and rejects one that lies outside the root.

One instance never blocks another: a batch the database refuses is split until
the refused instance is alone, and that one is recorded in the quarantine
(``index_failed``); an instance whose Study, Series or SOP Instance UID is
indexed under another PatientID is moved to ``<root>/.quarantine/`` and
recorded (``uid_conflict``) instead of being indexed. See
:mod:`pacsbridge.shared.index.quarantine`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import itertools
import logging
import mmap
import multiprocessing
import os
import signal
import stat
import threading
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from pydicom.datadict import tag_for_keyword
from sqlalchemy import text

from pacsbridge.shared.core.dicomsql import Schema
from pacsbridge.shared.core.errors import InvalidDataset, PacsbridgeError
from pacsbridge.shared.index.conquest import Index
from pacsbridge.shared.index.records import Rows, build_rows, clean_text, needs_dataset, read_header, schema_tags
from pacsbridge.shared.index.quarantine import Quarantine
from pacsbridge.shared.index.resume import Checkpoint
from pacsbridge.shared.index.storage import OWN_FOLDERS, QUARANTINE, Storage

__all__ = ["Outcome", "Report", "Importer", "iter_sources", "Source", "Refused", "check_path", "open_regular"]

log = logging.getLogger(__name__)

#: Instances per index transaction.
BATCH_SIZE = 500
#: Below this many files, no worker processes are started.
PROCESS_THRESHOLD = 64
#: Files read ahead of the batch being indexed, at most (memory does not follow the input's size).
WINDOW = 4 * BATCH_SIZE
#: Files handed to a worker process at a time.
CHUNKSIZE = 32
#: ``rebuild --missing`` and ``--prune``: paths (rows) compared with the index per query.
CHUNK = 1000


class Source(NamedTuple):
    """One file to bring in: a path, or a member of a zip archive."""

    path: str
    member: str | None = None

    @property
    def display(self) -> str:
        return f"{self.path}!{self.member}" if self.member else self.path


class Outcome(NamedTuple):
    """What happened to one source."""

    source: Source
    status: str  #: stored, indexed, duplicate, rejected
    reason: str = ""
    sop: str = ""
    relpath: str = ""
    rows: Rows | None = None


@dataclass
class Report:
    """Counts and rejections of one run."""

    stored: int = 0
    indexed: int = 0
    duplicate: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    removed: int = 0
    pruned: int = 0
    cancelled: bool = False
    quarantined: int = 0  #: rebuild: files of the quarantine area given an entry
    resumed_after: str = ""  #: rebuild: resumed after this path (walk order) ...
    done_before: int = 0  #: ... where the interrupted run(s) had done this many files
    estimated_total: int | None = None  #: rebuild: files in storage (counted beside the walk)

    @property
    def total(self) -> int:
        return self.stored + self.indexed + self.duplicate + len(self.rejected)

    def as_dict(self) -> dict[str, Any]:
        out = {"stored": self.stored, "indexed": self.indexed, "duplicate": self.duplicate,
               "rejected": len(self.rejected), "removed": self.removed, "pruned": self.pruned,
               "quarantined": self.quarantined,
               "rejections": [{"file": f, "reason": r} for f, r in self.rejected]}
        if self.cancelled:
            out["cancelled"] = True
        if self.resumed_after:
            out["resumed_after"] = self.resumed_after
            out["done_before"] = self.done_before
        if self.estimated_total is not None:
            out["files_in_storage"] = self.estimated_total
        return out


class Refused(Exception):
    """A file that is not read: not a regular file, or a link out of the import root."""


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0))


def _not_regular(mode: int) -> str:
    kind = next((name for test, name in _KINDS if test(mode)), "not a file")
    return f"not a regular file ({kind}): not read"


def _inside(real: str, confine: str) -> bool:
    return real.startswith(confine + os.sep)


def check_path(path: str, confine: str | None = None) -> None:
    """Refuse ``path`` before opening it: not a regular file (links followed), or outside ``confine``.

    ``confine`` is the real path (links resolved) of the root the file must lie in.

    Raises
    ------
    Refused
        With the reason.
    OSError
        The file cannot be looked at.
    """
    if confine is not None and not _inside(os.path.realpath(path), confine):
        raise Refused("a symbolic link to outside the import root: not read")
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(_not_regular(st.st_mode))


def open_regular(path: str, confine: str | None = None) -> int:
    """A read-only descriptor of ``path`` if it is a regular file (inside ``confine``, if given).

    The file is opened without blocking (``O_NONBLOCK``: a FIFO with no writer opens at
    once) and checked on the descriptor itself (``fstat``, and the path the kernel opened,
    ``/proc/self/fd``), so a name swapped for a link or a FIFO after it was listed is
    refused too.

    Raises
    ------
    Refused, OSError
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(_not_regular(st.st_mode))
        if confine is not None:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # no /proc: the path as it resolves now
                real = os.path.realpath(path)
            if not _inside(real, confine):
                raise Refused("a symbolic link to outside the import root: not read")
        return fd
    except BaseException:
        os.close(fd)
        raise


def iter_sources(paths: Iterable[str | Path], skip_under: Path | None = None,
                 confine: str | Path | None = None) -> Iterator[Source | Outcome]:
    """Files under ``paths`` (recursively), zip members expanded.

    Yields a rejected :class:`Outcome` for a path that does not exist, a zip
    file that cannot be opened, a file that is not a regular file (a FIFO would
    block the reader for ever), a symbolic link to a folder (not followed) and,
    with ``confine``, a file that resolves outside that folder. Dot-files and
    dot-folders are skipped, and so is anything under ``skip_under`` (the
    storage's own incoming folder).
    """
    skip = os.path.realpath(skip_under) if skip_under else None
    real_confine = os.path.realpath(confine) if confine is not None else None

    def one(path: str) -> Iterator[Source | Outcome]:
        try:
            check_path(path, real_confine)
            fd = open_regular(path, real_confine)
        except Refused as exc:
            yield Outcome(Source(path), "rejected", str(exc))
            return
        except OSError as exc:
            yield Outcome(Source(path), "rejected", f"cannot read: {exc.strerror or exc}")
            return
        with os.fdopen(fd, "rb") as fh:
            if not zipfile.is_zipfile(fh):
                yield Source(path)
                return
            try:
                fh.seek(0)
                with zipfile.ZipFile(fh) as zf:
                    members = [info.filename for info in zf.infolist()
                               if not info.is_dir() and not os.path.basename(info.filename).startswith(".")]
            except (zipfile.BadZipFile, OSError) as exc:
                yield Outcome(Source(path), "rejected", f"bad zip file: {exc}")
                return
        for member in members:
            yield Source(path, member)

    for p in paths:
        p = str(p)
        if os.path.isdir(p):
            for folder, dirs, files in os.walk(p):
                if skip and os.path.realpath(folder).startswith(skip):
                    dirs[:] = []
                    continue
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for d in [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
                    dirs.remove(d)  # os.walk would not go in either: say so
                    yield Outcome(Source(os.path.join(folder, d)), "rejected",
                                  "a symbolic link to a folder: not followed")
                for name in sorted(files):
                    if not name.startswith("."):
                        yield from one(os.path.join(folder, name))
        elif os.path.lexists(p):  # a file, or something one() refuses with its reason (a FIFO, a dangling link)
            yield from one(p)
        else:
            yield Outcome(Source(p), "rejected", "no such file or directory")


def transient(exc: BaseException) -> bool:
    """True for an error of the database itself (down, restarting, locked, a lost connection, a
    deadlock, a schema it lacks), which no instance causes and a retry of the same batch may
    cure; false for a refusal of the values (a NUL, a constraint ...), which splitting isolates."""
    from sqlalchemy import exc as sa

    if isinstance(exc, (sa.OperationalError, sa.InterfaceError, sa.ProgrammingError, sa.DisconnectionError,
                        sa.TimeoutError, sa.ResourceClosedError)):
        return True
    return isinstance(exc, sa.DBAPIError) and bool(exc.connection_invalidated)


def _db_reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {text}"[:500]


# -- the per-file work, run in worker processes ----------------------------------
class _Job(NamedTuple):
    schema: Schema
    storage: Storage
    mode: str  # "import", "rebuild", "inplace"
    tags: frozenset[int]
    dataset: bool
    confine: str | None = None  #: real path every file read must lie under (an import job's root)


_job: _Job | None = None
_zips: dict[str, zipfile.ZipFile] = {}


def _init(job: _Job) -> None:
    global _job
    _job = job
    _zips.clear()


def _init_worker(job: _Job) -> None:
    """A worker process ignores Ctrl-C: the parent handles it (stops the pool, keeps what is indexed).
    A worker that took the interrupt itself would die mid-task and leave the pool waiting for it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init(job)


def _read(source: Source, whole: bool = True, confine: str | None = None) -> Any:
    """The bytes of ``source``: a zip member, or the file mapped read-only.

    ``whole=False`` (only the header will be read) maps the file for random
    access: a page fault then reads that page, not the kernel's read-around
    window (128 kB here, a quarter of a CT slice, nine tenths of it pixel data).
    Only a regular file is read (inside ``confine``, if given): see :func:`open_regular`.
    """
    if source.member is not None:
        zf = _zips.get(source.path)
        if zf is None:
            zf = _zips[source.path] = zipfile.ZipFile(os.fdopen(open_regular(source.path, confine), "rb"))
        return zf.read(source.member)
    fd = open_regular(source.path, confine)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return b""
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        if not whole and hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)
        return mapped
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=8)
def _real_root(root: Path) -> str:
    return os.path.realpath(root)


def _process(source: Source) -> Outcome:
    job = _job
    assert job is not None
    buf: Any = None
    try:
        try:
            buf = _read(source, whole=job.mode == "import" or job.dataset, confine=job.confine)
        except Refused as exc:
            return Outcome(source, "rejected", str(exc))
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            return Outcome(source, "rejected", f"cannot read: {getattr(exc, 'strerror', None) or exc}")
        if len(buf) == 0:
            return Outcome(source, "rejected", "empty file")
        header = read_header(buf, source.display, job.tags, job.dataset)
        if job.mode == "import":
            result = job.storage.store(buf, header)
            if result.action == "duplicate":  # the stored copy stays, and so does its row
                return Outcome(source, "duplicate", result.action, header.sop_instance_uid, result.relpath)
            rows = build_rows(header, job.schema, result.relpath)
            return Outcome(source, "stored", result.action, header.sop_instance_uid, result.relpath, rows)
        real = os.path.realpath(source.path)
        root = _real_root(job.storage.root)
        if real.startswith(root + os.sep):
            rel, device = os.path.relpath(real, root).replace(os.sep, "/"), "MAG0"
        elif job.mode == "inplace":
            rel, device = real, "EXTERN"
            if len(rel) > 255:
                return Outcome(source, "rejected", "path longer than 255 characters (ObjectFile)")
        else:
            return Outcome(source, "rejected", "outside the storage root")
        rows = build_rows(header, job.schema, rel, device)
        return Outcome(source, "indexed", "", header.sop_instance_uid, rel, rows)
    except InvalidDataset as exc:
        return Outcome(source, "rejected", exc.reason)
    except PacsbridgeError as exc:
        return Outcome(source, "rejected", str(exc))
    except Exception as exc:  # never let one file stop a run
        log.exception("unexpected error on %s", source.display)
        return Outcome(source, "rejected", f"unexpected {type(exc).__name__}: {exc}")
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class _Counter(threading.Thread):
    """Counts the files of storage beside a rebuild, for its progress and estimate.

    Names only (``os.scandir``: no ``stat`` of each file on most file systems), one folder at a
    time; :meth:`total` is 0 until the count is complete.
    """

    def __init__(self, storage: Storage) -> None:
        super().__init__(name="rebuild-count", daemon=True)
        self.storage = storage
        self._total = 0
        self._halt = threading.Event()

    def run(self) -> None:
        n = 0
        folders = [str(self.storage.root)]
        while folders and not self._halt.is_set():
            folder = folders.pop()
            top = folder == str(self.storage.root)
            try:
                with os.scandir(folder) as it:
                    for entry in it:
                        if not entry.is_dir():
                            n += 1
                        elif not entry.is_symlink() and not (top and entry.name in OWN_FOLDERS):
                            folders.append(entry.path)
            except OSError:
                continue
        if not self._halt.is_set():
            self._total = n

    def total(self) -> int:
        return self._total

    def stop(self) -> None:
        self._halt.set()


# -- the parent: fan out, collect, index in batches ---------------------------
class Importer:
    """Runs ``import`` and ``rebuild`` over a storage and an index.

    Parameters
    ----------
    index : Index
    storage : Storage
    workers : int
        Header-reading processes; 0 means one per core.
    progress : callable, optional
        Called as ``progress(done, total)``.
    """

    def __init__(self, index: Index, storage: Storage, workers: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.index = index
        self.storage = storage
        self.workers = workers or os.cpu_count() or 1
        self.progress = progress or (lambda done, total: None)
        self.quarantine = Quarantine(index.engine)
        #: resolve the index_failed entries of files indexed after all (rebuild)
        self.resolve_indexed = False

    def _job(self, mode: str, confine: str | None = None) -> _Job:
        tags = schema_tags(self.index.schema)
        for kw in self.storage.template.keywords():
            tag = tag_for_keyword(kw)
            if tag is not None:
                tags.add(tag)
        return _Job(self.index.schema, self.storage, mode, frozenset(tags), needs_dataset(self.index.schema),
                    confine)

    def _run(self, mode: str, sources: Iterable[Source], on_batch: Callable[[list[Outcome]], Any],
             report: Report, already_done: int = 0, confine: str | None = None,
             cancel: threading.Event | None = None, total: Callable[[], int] | None = None) -> None:
        """Read ``sources`` (a list or a stream) in worker processes, ``on_batch`` every
        :data:`BATCH_SIZE` outcomes, in the order of ``sources``.

        At most :data:`WINDOW` sources are read ahead of the batch being written, so that a
        stream of 20 M paths holds no more than that in memory however slow the index is.
        ``total()`` gives the number of files expected (0 while it is not known yet).
        """
        count = total or (lambda: len(sources) + already_done if isinstance(sources, Sequence) else 0)
        job = self._job(mode, confine)
        done = already_done
        batch: list[Outcome] = []
        stream = iter(sources)
        head = list(itertools.islice(stream, PROCESS_THRESHOLD))
        window = threading.BoundedSemaphore(WINDOW)
        stop = threading.Event()
        self.progress(done, count())  # where this run starts (a resumed rebuild: past the files done before)

        def consume(outcomes: Iterable[Outcome]) -> None:
            nonlocal done, batch
            for outcome in outcomes:
                window.release()
                if cancel is not None and cancel.is_set():
                    report.cancelled = True  # what is done so far is indexed below; the rest is left
                    break
                batch.append(outcome)
                done += 1
                if len(batch) >= BATCH_SIZE:
                    on_batch(batch)
                    batch = []
                    self.progress(done, count())
            if batch:
                on_batch(batch)
                batch = []
            self.progress(done, count())

        def feed() -> Iterator[Source]:
            for source in itertools.chain(head, stream):
                while not window.acquire(timeout=0.2):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                yield source

        if self.workers <= 1 or len(head) < PROCESS_THRESHOLD:
            _init(job)
            consume(_process(s) for s in feed())
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
        self.index.engine.dispose(close=False)  # a forked child must not share pooled connections
        with ctx.Pool(self.workers, initializer=_init_worker, initargs=(job,)) as pool:
            try:
                consume(pool.imap(_process, feed(), chunksize=CHUNKSIZE))
            finally:
                stop.set()  # the pool's feeding thread may wait for room in the window: let it end

    @contextlib.contextmanager
    def _uid_lock(self, outcomes: list[Outcome]) -> Iterator[None]:
        """Hold the studies and series of ``outcomes`` while they are checked and written, so that two
        workers indexing two patients of one study at the same moment cannot both pass the check.

        PostgreSQL: session advisory locks on a hash of each Study and Series UID, taken in order
        (no deadlock), one or a few per batch. SQLite (one host, one writer at a time anyway): an
        exclusive lock on a file next to the database (:meth:`uid_lock_path`).
        """
        if not outcomes:
            yield
            return
        schema = self.index.schema
        if self.index.dialect == "postgresql":
            skey, sekey = schema["Study"].key.column, schema["Series"].key.column
            uids = {o.rows["Study"][skey] for o in outcomes} | {o.rows["Series"][sekey]  # type: ignore[index]
                                                                 for o in outcomes}
            keys = sorted({int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "big",
                                          signed=True) for u in uids})
            with self.index.engine.connect() as conn:
                try:
                    for key in keys:
                        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock_all()"))
                    conn.commit()
            return
        database = self.index.engine.url.database
        if not database or database == ":memory:":
            yield
            return
        with open(self.uid_lock_path(database), "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def uid_lock_path(database: str) -> str:
        """The SQLite lock file of :meth:`_uid_lock`: next to the database, not in the temporary folder,
        which is each container's own (worker replicas on one database volume would not see each
        other's lock); the database's folder is writable, as SQLite writes its journal there."""
        return os.path.realpath(database) + ".uid-lock"

    def _index_batch(self, batch: list[Outcome], report: Report) -> list[Outcome]:
        """Index the good outcomes of a batch; count everything; return what was committed."""
        good = [o for o in batch if o.rows is not None and o.status != "rejected"]
        with self._uid_lock(good):
            self._index_good(batch, good)
        self._record_unreadable(batch)
        for o in batch:
            if o.status == "rejected":
                report.rejected.append((o.source.display, o.reason))
            elif o.status == "duplicate":
                report.duplicate += 1
            elif o.status == "stored":
                report.stored += 1
            else:
                report.indexed += 1
        return batch

    def _record_unreadable(self, batch: list[Outcome]) -> None:
        """Record stored files that cannot be indexed at all (not DICOM, truncated, no UID) as
        ``index_failed``: the reconciler would otherwise queue them again every period."""
        root = _real_root(self.storage.root)
        records = []
        for o in batch:
            if o.status != "rejected" or o.source.member is not None or o.reason.startswith(
                    ("quarantined:", "not indexed:")):
                continue
            real = os.path.realpath(o.source.path)
            if not real.startswith(root + os.sep) or not os.path.isfile(real):
                continue  # an import from elsewhere, or a file gone since it was queued
            rel = os.path.relpath(real, root).replace(os.sep, "/")
            if rel.split("/", 1)[0] in OWN_FOLDERS:
                continue
            records.append({"relpath": rel, "detail": o.reason})
        self.quarantine.record_failures(records)

    def _index_good(self, batch: list[Outcome], good: list[Outcome]) -> None:
        """Check, apply the duplicates policy and index (under :meth:`_uid_lock`)."""
        conflicts, known = self._find_conflicts(good)
        if conflicts:
            self._set_aside_conflicts(batch, conflicts)
            good = [o for o in good if id(o) not in conflicts]
        replaced: list[tuple[str, str]] = []
        if self.storage.duplicates != "keep-both" and good:
            # a template with {time}/{counter} names each copy differently: the index decides
            keep = []
            for o in good:
                old = known.get(o.sop)
                if old is None or old[0] == o.relpath or o.status == "indexed":
                    keep.append(o)
                    continue
                old_path = self.storage.root / old[0] if old[1] == "MAG0" else Path(old[0])
                if self.storage.duplicates == "keep" and old_path.exists():
                    if o.status == "stored":
                        (self.storage.root / o.relpath).unlink(missing_ok=True)
                    batch[batch.index(o)] = o._replace(status="duplicate", rows=None)
                else:
                    keep.append(o)
                    if old[1] == "MAG0":
                        replaced.append((o.sop, old[0]))
            good = keep
        seen: dict[str, Outcome] = {}
        for o in good:
            seen[o.sop] = o  # the same SOP twice in one batch: the last copy wins the row
        failed = self._upsert_isolating(list(seen.values()))
        if failed:
            self._set_aside(batch, failed)
        for sop, old_rel in replaced:  # the index now points at the new copy
            if sop in failed:
                continue
            try:
                self.storage.absolute(old_rel).unlink()
            except (OSError, PacsbridgeError):
                pass
        if self.resolve_indexed:
            done = [o.relpath for o in batch if o.status == "indexed" and o.relpath]
            if done:
                self.quarantine.resolve_indexed(done)

    def _upsert_isolating(self, outcomes: list[Outcome]) -> dict[str, str]:
        """Index ``outcomes`` in one transaction; if the database refuses it, split the batch in
        halves until each refused instance is alone. Returns ``{sop: reason}`` of those refused.

        An outage (:func:`transient`) is raised as it is: the caller retries the whole batch later.
        """
        if not outcomes:
            return {}
        try:
            self.index.upsert([o.rows for o in outcomes])  # type: ignore[misc]
            return {}
        except Exception as exc:
            if transient(exc):
                raise
            if len(outcomes) == 1:
                return {outcomes[0].sop: _db_reason(exc)}
            log.warning("the database refused a batch of %d instances (%s); splitting it to find which",
                        len(outcomes), _db_reason(exc))
        half = len(outcomes) // 2
        return self._upsert_isolating(outcomes[:half]) | self._upsert_isolating(outcomes[half:])

    def _set_aside(self, batch: list[Outcome], failed: dict[str, str]) -> None:
        """Record the refused instances in the quarantine; they count as rejected."""
        key = self.index.schema
        records = []
        for i, o in enumerate(batch):
            if o.rows is None or o.sop not in failed or o.status == "rejected":
                continue
            reason = f"not indexed: the database refused it: {failed[o.sop]}"
            batch[i] = o._replace(status="rejected", reason=reason, rows=None)
            if o.relpath and not os.path.isabs(o.relpath):
                records.append({"relpath": o.relpath, "detail": failed[o.sop], "sop_uid": o.sop,
                                "series_uid": o.rows["Image"].get(key["Image"].parent.column),  # type: ignore
                                "study_uid": o.rows["Series"].get(key["Series"].parent.column),  # type: ignore
                                "patient_id": o.rows["Patient"].get(key["Patient"].key.column)})
        self.quarantine.record_failures(records)

    def _find_conflicts(self, outcomes: list[Outcome]) -> tuple[dict[int, tuple[str, str, str]],
                                                                 dict[str, tuple[str, str]]]:
        """Instances whose Study, Series or SOP Instance UID is indexed (or comes earlier in this
        batch) under another PatientID: ``{id(outcome): (level, uid, other_patient)}``, the
        highest level that clashes; and, from the same query, ``{sop: (ObjectFile, DeviceName)}``
        of the instances already indexed (for the duplicates policy)."""
        if not outcomes:
            return {}, {}
        schema = self.index.schema
        pkey, skey, sekey = (schema[lv].key.column for lv in ("Patient", "Study", "Series"))

        def uids(o: Outcome) -> tuple[tuple[str, str], ...]:
            rows = o.rows
            assert rows is not None
            return (("Study", rows["Study"][skey]), ("Series", rows["Series"][sekey]), ("Image", o.sop))

        owners, known = self.index.owners([o.rows["Study"][skey] for o in outcomes],  # type: ignore[index]
                                          [o.rows["Series"][sekey] for o in outcomes],  # type: ignore[index]
                                          [o.sop for o in outcomes])
        claimed: dict[str, dict[str, str]] = {"Study": {}, "Series": {}, "Image": {}}
        found: dict[int, tuple[str, str, str]] = {}
        for o in outcomes:
            patient = o.rows["Patient"][pkey] or ""  # type: ignore[index]
            for level, uid in uids(o):
                if uid in owners[level]:
                    other = owners[level][uid] or ""
                elif uid in claimed[level]:
                    other = claimed[level][uid]
                else:
                    continue
                if other != patient:
                    found[id(o)] = (level, uid, other)
                    break
            else:
                for level, uid in uids(o):
                    claimed[level].setdefault(uid, patient)
        return found, known

    def _set_aside_conflicts(self, batch: list[Outcome], conflicts: dict[int, tuple[str, str, str]]) -> None:
        """Move each conflicting instance under ``<root>/.quarantine/`` and record it (uid_conflict)."""
        schema = self.index.schema
        for i, o in enumerate(batch):
            if id(o) not in conflicts or o.rows is None:
                continue
            level, uid, other = conflicts[id(o)]
            patient = o.rows["Patient"][schema["Patient"].key.column] or ""
            name = {"Study": "Study Instance", "Series": "Series Instance", "Image": "SOP Instance"}[level]
            detail = (f"{name} UID {uid} is indexed under PatientID {other!r}; this instance has PatientID "
                      f"{patient!r}: set aside, not indexed")
            inside = bool(o.relpath) and not os.path.isabs(o.relpath)  # not a file indexed in place
            where = f"{QUARANTINE}/{uuid.uuid4().hex}/{os.path.basename(o.relpath)}" if inside else o.relpath
            # the entry first: if the database is down now, the file has not moved and the task's retry
            # finds it where it was
            entry = self.quarantine.add(
                "uid_conflict", where, detail, level=level.lower(), sop_uid=o.sop,
                series_uid=o.rows["Series"][schema["Series"].key.column],
                study_uid=o.rows["Study"][schema["Study"].key.column], patient_id=patient[:64],
                other_patient_id=other[:64], original_relpath=o.relpath[:255])
            if inside:
                try:
                    (self.storage.root / where).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self.storage.absolute(o.relpath), self.storage.root / where)
                except (OSError, PacsbridgeError) as exc:  # not moved: still set aside, where it lies
                    log.error("could not move %s to the quarantine area: %s", o.relpath, exc)
                    self.quarantine.relocate(entry, o.relpath, f"{detail} (not moved: {exc})")
            log.warning("UID conflict: %s (%s)", detail, o.source.display)
            batch[i] = o._replace(status="rejected", reason=f"quarantined: {detail}", rows=None)

    def recognise_quarantine(self) -> int:
        """Record files of the quarantine area that have no entry (the database was replaced ...).

        Returns how many were recorded.
        """
        area = self.storage.root / QUARANTINE
        if not area.is_dir():
            return 0
        known = self.quarantine.relpaths("uid_conflict")
        n = 0
        for folder, _, files in os.walk(area):
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(folder, name), self.storage.root).replace(os.sep, "/")
                if rel in known:
                    continue
                values: dict[str, Any] = {}
                try:
                    with open(os.path.join(folder, name), "rb") as fh:
                        header = read_header(fh.read(), rel, self._job("rebuild").tags)
                    rows = build_rows(header, self.index.schema, rel)
                    schema = self.index.schema
                    values = {"sop_uid": header.sop_instance_uid,
                              "series_uid": rows["Series"][schema["Series"].key.column],
                              "study_uid": rows["Study"][schema["Study"].key.column],
                              "patient_id": (rows["Patient"][schema["Patient"].key.column] or "")[:64]}
                except (OSError, PacsbridgeError) as exc:
                    values = {"detail": f"unreadable: {exc}"}
                detail = values.pop("detail", "found in the quarantine area without an entry (recorded by rebuild)")
                self.quarantine.add("uid_conflict", rel, detail, **values)
                n += 1
        return n

    def import_paths(self, paths: Sequence[str | Path], move: bool = False, in_place: bool = False, *,
                     confine: str | Path | None = None, cancel: threading.Event | None = None) -> Report:
        """Import files, folders and zip files.

        Parameters
        ----------
        confine : path, optional
            Read only files that lie under this folder once links are resolved
            (the import job's ``PACSBRIDGE_IMPORT_ROOT``); others are rejected.
        cancel : threading.Event, optional
            Checked between files: once set, the files read so far are indexed
            and the run stops (``report.cancelled``).
        move : bool
            Remove each original once it is stored and indexed (never a file
            inside the storage root, and a zip only when all its members went in).
        in_place : bool
            Index the files where they are, without copying (outside the
            storage root their ObjectFile is the absolute path, DeviceName EXTERN).
        """
        self.storage.ensure()
        report = Report()
        sources: list[Source] = []
        real_confine = os.path.realpath(confine) if confine is not None else None
        for item in iter_sources(paths, skip_under=self.storage.incoming, confine=real_confine):
            if isinstance(item, Outcome):
                report.rejected.append((item.source.display, item.reason))
            else:
                sources.append(item)
        root = os.path.realpath(self.storage.root)
        zip_failed: set[str] = set()
        zip_done: set[str] = set()

        def on_batch(batch: list[Outcome]) -> None:
            self._index_batch(batch, report)
            if not move or in_place:
                return
            for o in batch:
                if o.source.member is not None:
                    (zip_failed if o.status == "rejected" else zip_done).add(o.source.path)
                    continue
                if o.status == "rejected" or os.path.realpath(o.source.path).startswith(root + os.sep):
                    continue
                try:
                    os.unlink(o.source.path)
                    report.removed += 1
                except OSError as exc:
                    log.warning("could not remove %s: %s", o.source.path, exc.strerror)

        self._run("inplace" if in_place else "import", sources, on_batch, report, confine=real_confine,
                  cancel=cancel)
        for path in zip_done - zip_failed:
            try:
                os.unlink(path)
                report.removed += 1
            except OSError:
                pass
        for zf in _zips.values():
            fp = zf.fp  # opened by us (open_regular): ZipFile.close leaves it open
            zf.close()
            if fp is not None:
                fp.close()
        _zips.clear()
        return report

    def rebuild(self, missing_only: bool = False, prune: bool = False, restart: bool = False) -> Report:
        """Index every file in storage (``rebuild_database_from_dicom``), streaming and resumable.

        Storage is walked in a fixed order (:meth:`Storage.iter_files`), a folder at a time, and
        files are read and indexed as the walk goes: memory does not follow the archive's size.
        After each batch a checkpoint records the last file committed
        (:class:`~pacsbridge.shared.index.resume.Checkpoint`); a rebuild that was interrupted
        goes on from there when run again (the rows it wrote stay: indexing is an upsert), and
        the checkpoint is removed once the walk reaches the end. Nothing is emptied first:
        ``pacsbridge init --force`` does that.

        Parameters
        ----------
        missing_only : bool
            Skip files whose ObjectFile is already in the index (checked a chunk of the walk at
            a time, one query per chunk).
        prune : bool
            Also delete image rows whose MAG0 file no longer exists (the index read a page at a
            time); done at the start of a run, not again when resuming.
        restart : bool
            Ignore the checkpoint of an interrupted rebuild: start from the beginning.
        """
        self.storage.ensure()
        report = Report()
        database = self.index.engine.url.render_as_string(hide_password=True)
        checkpoint = Checkpoint(self.storage.root, database, missing_only)
        resume = None if restart else checkpoint.load()
        report.quarantined = self.recognise_quarantine()
        if prune and resume is None:
            report.pruned = self._prune()
        after, before = (resume.after, resume.done) if resume else (None, 0)
        if resume:
            report.resumed_after, report.done_before = resume.after, resume.done
            log.info("resuming the interrupted rebuild after %s (%d files done)", resume.after, resume.done)
        counter = _Counter(self.storage)
        paths = self.storage.iter_files(after)
        if missing_only:
            paths = self._not_indexed(paths)
        sources = (Source(str(self.storage.root / f)) for f in paths)
        prefix = len(str(self.storage.root)) + 1
        done = before

        def on_batch(batch: list[Outcome]) -> None:
            nonlocal done
            self._index_batch(batch, report)
            done += len(batch)
            try:
                checkpoint.save(batch[-1].source.path[prefix:], done)
            except OSError as exc:  # the rebuild goes on; only resuming it would start further back
                log.warning("could not write the rebuild checkpoint %s: %s", checkpoint.path, exc)

        self.resolve_indexed = True
        counter.start()
        try:
            self._run("rebuild", sources, on_batch, report, already_done=before, total=counter.total)
            counter.join(timeout=1.0)  # a small tree: its count may still be under way
        finally:
            self.resolve_indexed = False
            counter.stop()
        report.estimated_total = counter.total() or None
        if not report.cancelled:
            checkpoint.clear()
        return report

    def _not_indexed(self, paths: Iterable[str]) -> Iterator[str]:
        """``paths`` without those already indexed on MAG0, compared :data:`CHUNK` at a time."""
        for chunk in _chunks(paths, CHUNK):
            known = self.index.object_files_among(chunk)
            yield from (p for p in chunk if p not in known)

    def _prune(self) -> int:
        """Delete the image rows whose MAG0 file is gone, reading the index a page at a time."""
        gone: list[str] = []
        pruned = 0
        for page in self.index.iter_object_files(CHUNK):
            gone += [sop for sop, rel in page  # a row naming storage's own folders was never a stored file
                     if not rel or rel.split("/", 1)[0] in OWN_FOLDERS or not os.path.lexists(self.storage.root / rel)]
            if len(gone) >= CHUNK:
                pruned += self.index.delete_images(gone)
                gone = []
        return pruned + (self.index.delete_images(gone) if gone else 0)

    def reindex_files(self, relpaths: Sequence[str],
                      arrivals: Sequence[Sequence[Any] | None] | None = None) -> Report:
        """Index given files of the storage (the worker's task).

        ``arrivals`` gives, per path, ``(calling_ae, association_id, arrived_at)``
        as the listener saw it; they are kept in ``pacsbridge_arrivals``.
        """
        report = Report()
        sources = [Source(str(self.storage.absolute(r))) for r in relpaths]
        by_source = {s.path: a for s, a in zip(sources, arrivals or []) if a}
        sop_key = self.index.schema["Image"].key.column
        link = self.index.schema["Image"].parent.column  # type: ignore[union-attr]

        def on_batch(batch: list[Outcome]) -> None:
            self._index_batch(batch, report)
            rows = []
            for o in batch:
                info = by_source.get(o.source.path)
                if info is None or o.rows is None:
                    continue
                ae, assoc, ts = info
                rows.append({"sop_uid": o.rows["Image"][sop_key], "series_uid": o.rows["Image"][link],
                             "study_uid": o.rows["Series"][self.index.schema["Series"].parent.column],  # type: ignore
                             "patient_id": o.rows["Patient"][self.index.schema["Patient"].key.column],
                             "calling_ae": (clean_text(str(ae)) or "")[:16],
                             "association": (clean_text(str(assoc)) or "")[:36], "arrived_at": float(ts),
                             "object_file": o.relpath})
            self.index.record_arrivals(rows)

        self._run("rebuild", sources, on_batch, report)
        return report

