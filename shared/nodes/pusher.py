"""The DICOM pusher: C-STORE stored instances to a node, as stored, within its limits.

What a ``push`` job (:mod:`pacsbridge.worker.kinds.push`) does is :func:`push`; a cohort or any
other caller that has a list of stored instances uses it the same way. It sends every instance:
* **As stored.** Each file's transfer syntax is read from its file meta
  (nothing else is decoded) and proposed to the peer as its own presentation
  context, beside an uncompressed fallback context (explicit / implicit VR
  little endian) per SOP class. A file whose own syntax was accepted is sent
  from disk without decoding (pynetdicom's chunked file send, one PDU per
  instance when the peer allows an unlimited PDU).
* **Fallback.** When the peer refused the file's syntax, the file is read
  and, if compressed, decompressed by pydicom to explicit VR little endian
  (its SOP Instance UID kept); an instance pydicom cannot decompress here (a
  missing decoder plugin) or that the peer accepts in no syntax is a failure
  of that instance with the reason.
* **Within the node's limits.** Up to ``node.max_associations`` associations
  in parallel, each holding a slot of :class:`~pacsbridge.shared.nodes.throttle.NodeSlots`
  (shared by all workers), and at most ``node.max_rate`` instances/s
  (:class:`~pacsbridge.shared.nodes.throttle.RateLimiter`).
* **Nothing dropped silently.** Every instance ends acknowledged (status
  0x0000 or a warning) or failed with the peer's status or the reason; a file
  the index lists but storage cannot give is failed too. Outcomes are kept per
  instance in ``pacsbridge_push_instances`` (written in small batches while
  the job runs), per series in the job's ``pushed`` / ``failed`` counters, and
  the job result lists the failed SOP Instance UIDs with their statuses.
* **Retries re-send only what was not acknowledged.** A retried (or taken
  over) job skips the instances already acknowledged for it.
* **De-identified on the fly** when a job names a project: ``transform`` (the job's
  :class:`~pacsbridge.shared.deid.outgoing.Outgoing`) makes each instance's de-identified bytes from
  the stored file in memory, in one pass (no temporary copy), right before it is sent under its new
  SOP Instance UID; an instance
  the project's risk policy withholds is not sent and ends ``withheld`` (quarantined or dropped,
  with the reason), neither acknowledged nor failed. With ``PACSBRIDGE_PUSH_PROCESSES`` the sender
  processes de-identify (the engine's CPU is then not the job process's GIL): they ask the job for
  each patient's pseudonym and offset (the map is in the database), make the new UIDs from the
  project's key, and report what they made for the map and the audit before sending it.

:func:`push` returns a :class:`PushReport`: acknowledged and failed instances with their statuses.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext, build_context
from sqlalchemy import and_, delete, select
from sqlalchemy.engine import Engine

from pacsbridge.shared.dicom.dimse import associate, describe_status, lost
from pacsbridge.shared.dicom.compat import send_files_as_stored
from pacsbridge.shared.dicom.compat.reactor import on_conn_open as reactor_on_conn_open
from pacsbridge.shared.dicom.compat.store import FastStore, ParkedSends
from pacsbridge.shared.core.errors import DimseError, InvalidRequest
from pacsbridge.shared.deid.outgoing import Outgoing
from pacsbridge.shared.deid.profile import DeidentifyError, OriginalIds
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.core.schema import instances_table
from pacsbridge.shared.core.config import initial_settings
from pacsbridge.shared.index.instance import Instance
from pacsbridge.shared.dicom.sender import SendFailed, file_meta
from pacsbridge.shared.nodes.throttle import NodeSlots, RateLimiter, SlotTimeout, worker_id

__all__ = ["push", "PushReport", "Emitter", "Sent", "Transform", "acknowledged", "record", "send_files", "MAX_CONTEXTS"]

log = logging.getLogger(__name__)

#: Presentation contexts per association (the standard allows 128 ids).
MAX_CONTEXTS = 120
#: Outcomes are written to the database after this many instances or seconds, whichever first.
FLUSH_EVERY = 200
FLUSH_SECONDS = 0.5
#: Failures listed in a job's result (all are counted).
MAX_LISTED = 1000
#: ACSE / DIMSE / network timeout of a push association, seconds.
TIMEOUT = initial_settings().scu_dimse_timeout
#: How long a sender waits for one of the node's association slots.
SLOT_TIMEOUT = 600.0
#: After a cancel, how long an established association may go on (the C-STORE in flight is answered,
#: the sender stops before the next instance) before it is aborted (a node that stopped answering).
CANCEL_GRACE = 2.0
#: pynetdicom's polling delay per association (its default 0.001 s costs latency per instance).
#: Parallel associations run in sender processes (``python -m pacsbridge.shared.nodes.pushproc``), not threads
#: sharing our GIL: "auto" when the node allows more than one association, "1" always, "0" never.
#: Off by default: on a 2-core host the processes' start-up (~0.5 s of imports each) and their
#: reactors' polling cost more CPU than the shared GIL (2,000 CT, 4 associations: ~480 vs ~670 inst/s).
PROCESSES = initial_settings().push_processes  # PACSBRIDGE_PUSH_PROCESSES
#: ... and "auto" only when each process gets at least this many files (a process starts in ~0.5 s).
PROC_MIN_FILES = 100
#: Files handed to a sender process ahead of its outcomes (so it never waits for the next one).
PROC_WINDOW = 2
#: Send stored files with :class:`~pacsbridge.shared.dicom.compat.store.FastStore` (one socket write per
#: instance); 0: pynetdicom's own.
FAST_SEND = initial_settings().push_fast  # PACSBRIDGE_PUSH_FAST

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_WARNINGS = (0x0001, 0x0107, 0x0116)

class _File(NamedTuple):
    """An instance ready to send: what its file meta says."""

    inst: Instance
    sop_class: str
    transfer_syntax: str


class Sent(NamedTuple):
    """The outcome of one instance (its stored UIDs, also when it was sent de-identified)."""

    sop_uid: str
    series_uid: str
    ok: bool
    status: int | None
    error: str
    fallback: bool = False
    withheld: str = ""  # "quarantine" or "drop": a project's risk policy kept it back (error: why)
    risk: str = ""      # sent, with this warning of the risk policy


#: A project's de-identification of one stored file (:class:`pacsbridge.shared.deid.outgoing.Outgoing`):
#: path -> :class:`~pacsbridge.shared.deid.profile.Deidentified`.
Transform = Callable[[str], Any]


@dataclass
class PushReport:
    """What :func:`push` did (this run only)."""

    acknowledged: int = 0
    failed: list[Sent] = field(default_factory=list)
    withheld: list[Sent] = field(default_factory=list)
    risks: int = 0
    fallbacks: int = 0
    warnings: int = 0
    associations: int = 0
    cancelled: bool = False
    per_series: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    seconds: float = 0.0


class Emitter:
    """Counts each outcome into a :class:`PushReport` and hands them on in batches (``on_results``: every
    :data:`FLUSH_EVERY` outcomes or :data:`FLUSH_SECONDS`, and when called with ``force``). The DIMSE push
    and the STOW-RS push (:mod:`.stow`) count alike through it."""

    def __init__(self, report: "PushReport", on_results: Callable[[list[Sent]], None] | None) -> None:
        self.report, self.on_results = report, on_results
        self.pending: list[Sent] = []
        self.last_flush = time.monotonic()

    def __call__(self, sent: Sent | None, force: bool = False) -> None:
        report = self.report
        if sent is not None:
            self.pending.append(sent)
            if sent.withheld:
                report.per_series[sent.series_uid]["quarantined"] += 1
                report.withheld.append(sent)
            elif sent.ok:
                report.per_series[sent.series_uid]["pushed"] += 1
                report.acknowledged += 1
                report.warnings += int(bool(sent.status))
                report.risks += int(bool(sent.risk))
            else:
                report.per_series[sent.series_uid]["failed"] += 1
                report.failed.append(sent)
            report.fallbacks += int(sent.fallback and sent.ok)
        if self.pending and (force or len(self.pending) >= FLUSH_EVERY
                             or time.monotonic() - self.last_flush >= FLUSH_SECONDS):
            if self.on_results is not None:
                self.on_results(list(self.pending))
            self.pending.clear()
            self.last_flush = time.monotonic()


def acknowledged(engine: Engine, job_id: str) -> set[str]:
    """SOP Instance UIDs the node acknowledged for this job (all runs)."""
    t = instances_table
    with engine.connect() as conn:
        return {r[0] for r in conn.execute(select(t.c.sop_uid).where(
            and_(t.c.job_id == job_id, t.c.outcome == "stored")))}


def record(engine: Engine, job_id: str, batch: Sequence[Sent]) -> None:
    """Keep the outcome of each instance of ``batch`` for job ``job_id`` (``pacsbridge_push_instances``)."""
    if not batch:
        return
    t = instances_table
    now = time.time()
    latest = {s.sop_uid: s for s in batch}
    rows = [{"job_id": job_id, "sop_uid": s.sop_uid, "series_uid": s.series_uid,
             "outcome": "stored" if s.ok else "failed", "status": s.status, "error": s.error[:2000],
             "fallback": int(s.fallback), "at": now} for s in latest.values()]
    with engine.begin() as conn:
        conn.execute(delete(t).where(and_(t.c.job_id == job_id, t.c.sop_uid.in_(list(latest)))))
        conn.execute(t.insert(), rows)


# -- preparing: file meta and presentation contexts ------------------------------
def read_meta(inst: Instance) -> _File:
    """SOP class and transfer syntax from the file meta (the data set is not read).

    Raises OSError (file missing or unreadable) or ValueError (no usable meta).
    """
    meta: Any = file_meta(str(inst.path))  # the common case, ~10x quicker than pydicom
    if meta is None:
        try:
            meta = read_file_meta_info(inst.path)
        except OSError:
            raise
        except Exception as exc:  # pydicom: not DICOM, truncated meta ...
            raise ValueError(f"unreadable file meta: {exc}") from None
    ts = str(meta.get("TransferSyntaxUID", "") or "")
    sop_class = str(meta.get("MediaStorageSOPClassUID", "") or inst.sop_class)
    sop = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    if not ts or not sop_class:
        raise ValueError("no transfer syntax or SOP class in the file meta")
    if sop and sop != inst.sop_uid:
        raise ValueError(f"the file holds SOP instance {sop}, not {inst.sop_uid} (index out of date?)")
    return _File(inst, sop_class, ts)


def contexts_for(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) and one uncompressed fallback per class."""
    by_class: dict[str, set[str]] = defaultdict(set)
    for sop_class, ts in pairs:
        by_class[sop_class].add(ts)
    out = []
    for sop_class in sorted(by_class):
        for ts in sorted(by_class[sop_class]):
            out.append(build_context(sop_class, [ts]))
        out.append(build_context(sop_class, list(_UNCOMPRESSED)))
    return out


def _groups(files: Sequence[_File]) -> list[list[_File]]:
    """Split files so that each group needs at most :data:`MAX_CONTEXTS` contexts."""
    by_class: dict[str, list[_File]] = defaultdict(list)
    for f in files:
        by_class[f.sop_class].append(f)
    groups: list[list[_File]] = []
    current: list[_File] = []
    used = 0
    for sop_class in sorted(by_class):
        items = by_class[sop_class]
        need = len({f.transfer_syntax for f in items}) + 1
        if current and used + need > MAX_CONTEXTS:
            groups.append(current)
            current, used = [], 0
        current += items
        used += need
    if current:
        groups.append(current)
    return groups


# -- sending -------------------------------------------------------------------
class _Unconvertible(Exception):
    pass


def _decoded(f: _File, source: Any = None) -> Any:
    """The data set (of ``source``, else the stored file), decompressed to explicit VR little endian if it
    was compressed."""
    ds = dcmread(f.inst.path if source is None else source)
    ts = UID(f.transfer_syntax)
    if ts.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # pydicom: no plugin for this syntax, or corrupt pixel data
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise _Unconvertible(f"the node refused {ts.name} and it cannot be decompressed here: {text}") \
                from None
    return ds


def _status(rsp: Any) -> int | None:
    if rsp is None or "Status" not in rsp:
        return None
    return int(rsp.Status)


def accepted(assoc: Any) -> set[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs the peer accepted on this association."""
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}


def _send_one(assoc: Any, node: Node, f: _File, ok: set[tuple[str, str]], fast: FastStore | None = None,
              transform: Transform | None = None) -> Sent:
    inst = f.inst
    fallback = (f.sop_class, f.transfer_syntax) not in ok
    risk = ""
    try:
        if transform is not None:  # de-identified on the fly, then sent as the stored file would be
            made = transform(str(inst.path))
            if made.data is None:
                return Sent(inst.sop_uid, inst.series_uid, False, None, made.reason, fallback, withheld=made.action)
            risk = made.reason if made.action == "warn" else ""
            if not fallback and fast is not None:
                rsp = fast.store_bytes(made.data, f.sop_class, made.sop_uid, f.transfer_syntax)
            else:
                rsp = assoc.send_c_store(_decoded(f, io.BytesIO(made.data)) if fallback
                                         else dcmread(io.BytesIO(made.data)))
        elif not fallback and fast is not None:
            rsp = fast.store(str(inst.path), f.sop_class, inst.sop_uid, f.transfer_syntax)
        elif not fallback:
            rsp = assoc.send_c_store(inst.path)  # as stored: the file is not decoded
        else:  # the peer refused the file's own transfer syntax
            rsp = assoc.send_c_store(_decoded(f))
    except _Unconvertible as exc:
        return Sent(inst.sop_uid, inst.series_uid, False, None, str(exc), fallback)
    except SendFailed as exc:
        return Sent(inst.sop_uid, inst.series_uid, False, None,
                    f"node {node.name!r}: C-STORE not sent: {exc}", fallback)
    except DeidentifyError as exc:  # the de-identification could not read it
        return Sent(inst.sop_uid, inst.series_uid, False, None, f"cannot de-identify: {exc}", fallback)
    except ValueError as exc:  # no context at all for this SOP class / syntax
        return Sent(inst.sop_uid, inst.series_uid, False, None,
                    f"the node accepted no presentation context for it: {exc}", fallback)
    except (OSError, AttributeError) as exc:
        return Sent(inst.sop_uid, inst.series_uid, False, None,
                    f"cannot read {inst.object_file}: {getattr(exc, 'strerror', None) or exc}", fallback)
    code = _status(rsp)
    if code is None:
        return Sent(inst.sop_uid, inst.series_uid, False, None,
                    str(lost(node, assoc, "C-STORE", TIMEOUT)), fallback)
    if code == 0 or code in _WARNINGS or 0xB000 <= code <= 0xBFFF:
        return Sent(inst.sop_uid, inst.series_uid, True, code, "" if code == 0 else describe_status(code), fallback,
                    risk=risk)
    comment = f": {rsp.ErrorComment}" if rsp is not None and "ErrorComment" in rsp else ""
    return Sent(inst.sop_uid, inst.series_uid, False, code, f"C-STORE answered {describe_status(code)}{comment}",
                fallback)


_HANDLERS = [(evt.EVT_CONN_OPEN, reactor_on_conn_open)]


def send_files(assoc: Any, node: Node, take: Callable[[], "_File | None"],
               done: Callable[["_File", Sent], None], transform: Transform | None = None) -> Sent | None:
    """Send on ``assoc`` every file ``take()`` gives until it gives None, the reactor parked
    (:class:`~pacsbridge.shared.dicom.compat.store.ParkedSends`: the fast sender where the node
    accepted the file's own syntax, pynetdicom's ``send_c_store`` otherwise); ``done(f, sent)``
    after each. Returns the outcome after which the association was lost (aborted or dropped:
    the caller opens a new one), or None when ``take()`` ran out."""
    ok = accepted(assoc)
    with ParkedSends(assoc, TIMEOUT, fast=FAST_SEND) as sends:
        while (f := take()) is not None:
            sent = sends.send(f.sop_class, f.transfer_syntax,
                              partial(_send_one, assoc, node, f, ok, transform=transform))
            done(f, sent)
            if not assoc.is_established:
                return sent
    return None


class _Ahead:
    """A project's de-identification one file ahead of the send: while a sender waits for the node's
    answer to one file (the GIL released), this push's one helper thread de-identifies the file that
    sender sends next. (Our own pipelining: de-identifying between a response and the next send
    leaves the association idle for the engine's time on every file; the profile of a 1-association
    push showed the sender thread waiting on the node's answers most of its time. Its gain was not
    measurable on the shared 2-core test host: see the branch's report.)"""

    def __init__(self, transform: Transform) -> None:
        self.transform = transform
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="push-deid")
        self.made: dict[str, Future[Any]] = {}
        self.lock = threading.Lock()

    def start(self, f: _File) -> None:
        """Begin de-identifying ``f`` (once, whichever sender sends it)."""
        path = str(f.inst.path)
        with self.lock:
            if path not in self.made:
                self.made[path] = self.pool.submit(self.transform, path)

    def __call__(self, path: str) -> Any:
        """What the transform made of ``path`` (waited for; made now if it was not begun)."""
        with self.lock:
            future = self.made.pop(path, None)
        return self.transform(path) if future is None else future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Sender(threading.Thread):
    """One association: takes files from the shared queue until it is empty."""

    def __init__(self, n: int, node: Node, calling_ae: str, contexts: list[PresentationContext],
                 work: "queue.SimpleQueue[_File]", results: "queue.SimpleQueue[Sent | None]",
                 slots: NodeSlots, rate: RateLimiter, cancel: threading.Event,
                 transform: Transform | None = None) -> None:
        super().__init__(name=f"push-{node.name}-{n}", daemon=True)
        self.node, self.calling_ae, self.contexts = node, calling_ae, contexts
        self.work, self.results, self.slots, self.rate, self.cancel = work, results, slots, rate, cancel
        self.transform = transform
        self.error: str = ""
        self.associations = 0
        self.current: _File | None = None  # taken from the queue, not yet reported
        self.following: _File | None = None  # taken to be de-identified ahead (_Ahead), not yet sent

    def _next(self) -> _File | None:
        if self.cancel.is_set():
            return None
        try:
            return self.work.get_nowait()
        except queue.Empty:
            return None

    def _take(self) -> _File | None:
        ahead = self.transform if isinstance(self.transform, _Ahead) else None
        if ahead is None:
            f = self._next()
        else:  # the file after this one is de-identified while this one is sent
            f, self.following = (self.following or self._next()), None
            if f is not None:
                ahead.start(f)
                self.following = self._next()
                if self.following is not None:
                    ahead.start(self.following)
        if f is not None:
            self.current = f
            self.rate.wait(1, cancel=self.cancel)
        return f

    def _done(self, f: _File, sent: Sent) -> None:
        self.results.put(sent)
        self.current = None

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a bug or a database outage: the parent reports what was not sent
            log.exception("push sender %s stopped", self.name)
            self.error = f"{type(exc).__name__}: {exc}"
            if self.current is not None:
                f = self.current
                self.results.put(Sent(f.inst.sop_uid, f.inst.series_uid, False, None, f"not sent: {self.error}"))
        finally:
            if self.following is not None:  # taken ahead, not sent: back for another sender (or the report)
                self.work.put(self.following)
                self.following = None
            self.results.put(None)

    def _run(self) -> None:
        failures = 0
        while failures < 2 and (not self.work.empty() or self.following is not None) and not self.cancel.is_set():
            try:
                with self.slots.acquire(timeout=SLOT_TIMEOUT, cancel=self.cancel):
                    with associate(self.node, self.calling_ae, self.contexts, timeout=TIMEOUT,
                                   evt_handlers=_HANDLERS, cancel=self.cancel,
                                   cancel_grace=CANCEL_GRACE) as assoc:
                        self.associations += 1
                        failures = 0
                        lost = send_files(assoc, self.node, self._take, self._done, self.transform)
                        if lost is not None:  # aborted or dropped: open a new one
                            self.error = lost.error
            except (DimseError, SlotTimeout) as exc:
                self.error = str(exc)
                failures += 1
                if failures < 2 and not self.cancel.is_set():
                    self.cancel.wait(1.0)


class _ProcSender(threading.Thread):
    """One sender process (:mod:`pacsbridge.shared.nodes.pushproc`), fed from the shared queue.

    This thread holds the node slot for the process's lifetime, applies the
    rate limit as it hands out files, and turns the process's outcome lines
    into :class:`Sent`. Files handed out but not reported when the process
    ends (it died, or could not associate) are reported failed with the
    reason: the peer may or may not have them, a retry sends them again.
    """

    def __init__(self, n: int, node: Node, calling_ae: str, contexts: list[PresentationContext],
                 work: "queue.SimpleQueue[_File]", results: "queue.SimpleQueue[Sent | None]",
                 slots: NodeSlots, rate: RateLimiter, cancel: threading.Event,
                 transform: Outgoing | None = None) -> None:
        super().__init__(name=f"push-{node.name}-p{n}", daemon=True)
        self.node, self.calling_ae, self.contexts = node, calling_ae, contexts
        self.work, self.results, self.slots, self.rate, self.cancel = work, results, slots, rate, cancel
        self.transform = transform
        self.error: str = ""
        self.associations = 0
        self.proc: subprocess.Popen[str] | None = None
        self.inflight: dict[int, _File] = {}
        self._count = 0

    def run(self) -> None:
        try:
            with self.slots.acquire(timeout=SLOT_TIMEOUT, cancel=self.cancel):
                self._run()
        except (DimseError, SlotTimeout) as exc:
            self.error = str(exc)
        except Exception as exc:  # a bug, or the process could not start
            log.exception("push sender %s stopped", self.name)
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for f in self.inflight.values():
                self.results.put(Sent(f.inst.sop_uid, f.inst.series_uid, False, None,
                                      f"not sent: {self.error or 'the sender process stopped'}"))
            self.inflight.clear()
            self.results.put(None)

    def _feed(self, stdin: Any) -> bool:
        """Hand out files up to the window; False once there are no more (stdin closed)."""
        while len(self.inflight) < PROC_WINDOW:
            f = None if self.cancel.is_set() else self._take()
            if f is None:
                if self.transform is not None:  # the process may still ask for a patient: stdin stays open
                    stdin.write(json.dumps({"end": 1}) + "\n")
                    stdin.flush()
                else:
                    stdin.close()
                return False
            self.rate.wait(1, cancel=self.cancel)
            self._count += 1
            self.inflight[self._count] = f
            i = f.inst
            stdin.write(json.dumps([self._count, str(i.path), f.sop_class, f.transfer_syntax, i.sop_uid,
                                    i.series_uid, i.object_file]) + "\n")
        stdin.flush()
        return True

    def _take(self) -> _File | None:
        try:
            return self.work.get_nowait()
        except queue.Empty:
            return None

    def _run(self) -> None:
        head = {"node": {"name": self.node.name, "ae_title": self.node.ae_title, "host": self.node.host,
                         "port": self.node.port},
                "calling_ae": self.calling_ae,
                "contexts": [[str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax]]
                             for cx in self.contexts]}
        if self.transform is not None:
            head["deid"] = self.transform.child_spec()
        self.proc = subprocess.Popen([sys.executable, "-m", "pacsbridge.shared.nodes.pushproc"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        ended = threading.Event()

        def stop_on_cancel() -> None:  # the process may be waiting on the node: end it
            while not ended.wait(0.1):
                if self.cancel.is_set():
                    if self.proc is not None and self.proc.poll() is None:
                        self.proc.terminate()
                    return

        threading.Thread(target=stop_on_cancel, name=f"{self.name}-cancel", daemon=True).start()
        try:
            stdin.write(json.dumps(head) + "\n")
            feeding = self._feed(stdin)
            for line in stdout:
                doc = json.loads(line)
                if "n" in doc:
                    f = self.inflight.pop(doc["n"])
                    self.results.put(Sent(f.inst.sop_uid, f.inst.series_uid, bool(doc["ok"]), doc["status"],
                                          doc["error"], bool(doc["fallback"]), doc.get("withheld", ""),
                                          doc.get("risk", "")))
                    if feeding:
                        feeding = self._feed(stdin)
                elif "made" in doc and self.transform is not None:
                    self.transform.note(OriginalIds(*doc["original"]), bool(doc["sent"]), doc["action"],
                                        doc["uids"], doc["pseudonym"])
                elif "patient" in doc and self.transform is not None:
                    patient = self.transform.patient(*doc["patient"])
                    stdin.write(json.dumps({"patient": [patient.pseudonym, patient.date_offset]}) + "\n")
                    stdin.flush()
                elif "assoc" in doc:
                    self.associations += 1
                elif "error" in doc:
                    self.error = doc["error"]
        except (BrokenPipeError, ValueError, KeyError):  # the process is gone: what it had is reported below
            pass
        finally:
            ended.set()
            if not stdin.closed:
                try:
                    stdin.close()
                except BrokenPipeError:
                    pass
        code = self.proc.wait()
        if self.cancel.is_set() and self.inflight:
            self.error = "cancelled"
        if code != 0 and self.inflight:
            self.error = f"the sender process ended with exit code {code}" + (
                f" ({self.error})" if self.error else "")


def push(node: Node, instances: Sequence[Instance], calling_ae: str, engine: Engine, *,
         holder: str = "", cancel: threading.Event | None = None,
         on_results: Any = None, transform: Transform | None = None) -> PushReport:
    """C-STORE ``instances`` to ``node`` (see the module docstring).

    Parameters
    ----------
    node : Node
        The destination; must allow C-STORE.
    instances
        From :func:`pacsbridge.worker.selection.resolve`.
    calling_ae : str
        Our AE title.
    engine : Engine
        The database of the node slots and rate limiter.
    holder : str
        Names us in the node's slot leases.
    cancel : threading.Event, optional
        Checked between instances.
    on_results : callable, optional
        ``on_results(list_of_Sent)``, called in batches from this thread.
    transform : Transform, optional
        De-identify each instance as it is sent (a project's push).

    Raises
    ------
    InvalidRequest
        The node does not allow C-STORE.
    """
    if not node.allow_store:
        raise InvalidRequest(f"node {node.name!r} does not accept pushes (allow_store is false)", "node")
    cancel = cancel or threading.Event()
    report = PushReport()
    start = time.monotonic()
    emit = Emitter(report, on_results)

    files: list[_File] = []
    for inst in instances:
        try:
            files.append(read_meta(inst))
        except (OSError, ValueError) as exc:
            emit(Sent(inst.sop_uid, inst.series_uid, False, None,
                      f"cannot read {inst.object_file}: {getattr(exc, 'strerror', None) or exc}"))
    slots = NodeSlots(engine, node, holder or worker_id())
    rate = RateLimiter(engine, node)
    send_files_as_stored()  # send_c_store(path): the file as stored, never decoded
    for group in _groups(files):
        if cancel.is_set():
            break
        contexts = contexts_for((f.sop_class, f.transfer_syntax) for f in group)
        work: queue.SimpleQueue[_File] = queue.SimpleQueue()
        for f in group:
            work.put(f)
        results: queue.SimpleQueue[Sent | None] = queue.SimpleQueue()
        count = max(1, min(node.max_associations, len(group)))
        many = count > 1 and len(group) >= PROC_MIN_FILES * count
        senders: list[_Sender | _ProcSender]
        ahead: _Ahead | None = None
        if (transform is None or isinstance(transform, Outgoing)) and \
                (PROCESSES == "1" or (PROCESSES == "auto" and many)):
            senders = [_ProcSender(i, node, calling_ae, contexts, work, results, slots, rate, cancel,
                                   transform) for i in range(count)]
        else:
            ahead = _Ahead(transform) if transform is not None else None
            senders = [_Sender(i, node, calling_ae, contexts, work, results, slots, rate, cancel, ahead)
                       for i in range(count)]
        for s in senders:
            s.start()
        running = len(senders)
        while running:
            try:
                item = results.get(timeout=FLUSH_SECONDS)
            except queue.Empty:
                emit(None)  # type: ignore[arg-type]
                continue
            if item is None:
                running -= 1
            else:
                emit(item)
        for s in senders:
            s.join()
        if ahead is not None:
            ahead.close()
        report.associations += sum(s.associations for s in senders)
        reason = next((s.error for s in senders if s.error), "") or "no association could be opened"
        while not cancel.is_set():  # what no sender could send is failed, with the senders' reason
            try:
                f = work.get_nowait()
            except queue.Empty:
                break
            emit(Sent(f.inst.sop_uid, f.inst.series_uid, False, None, f"not sent: {reason}"))
    emit(None, force=True)  # type: ignore[arg-type]
    report.cancelled = cancel.is_set()
    report.seconds = time.monotonic() - start
    return report


# -- the job -------------------------------------------------------------------
