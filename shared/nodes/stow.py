"""The STOW-RS pusher: stored instances to a DICOMweb node, in chunks, with per-instance outcomes.

:func:`stow_push` is :func:`pacsbridge.shared.nodes.pusher.push` for a node with a STOW URL: the same
arguments (plus the node's :class:`~.webhttp.WebClient`), the same :class:`~.pusher.Sent` outcomes handed to
``on_results`` in batches (the push job records them in ``pacsbridge_push_instances`` with
:func:`~.pusher.record`, so a retried job re-sends only what the node did not acknowledge), the same
:class:`~.pusher.PushReport`. What differs, and why:

* **Chunks.** One POST carries up to :data:`CHUNK_INSTANCES` instances or :data:`CHUNK_BYTES` bytes (whichever
  is reached first; an instance larger than that goes alone), so that one failed request costs little to
  send again and the node's answer (DICOM JSON, read whole) stays small. Up to ``node.max_associations``
  requests run at once, each holding a :class:`~.throttle.NodeSlots` lease; the
  :class:`~.throttle.RateLimiter` is charged one instance as each is prepared.
* **Per-instance outcomes from the answer.** An instance in the ReferencedSOPSequence is acknowledged (its
  WarningReason, if any, is its status, as a DIMSE warning would be); one in the FailedSOPSequence failed
  with its FailureReason; one the answer does not name is failed too ("not acknowledged"), since nothing says
  it was stored and a retry costs one instance. A node that answers 200 without a body acknowledged the
  whole request. A request that fails as a whole (HTTP 4xx/5xx after the client's retries, a timeout)
  fails each of its instances with the reason.
* **As stored.** Files are streamed from storage as they are (:class:`~.webhttp.MultipartBody`: never a
  whole request in memory); STOW has no transfer syntax negotiation, so there is no fallback to make.
* **De-identified on the fly** when a project is named: ``transform`` (the job's
  :class:`~pacsbridge.shared.deid.outgoing.Outgoing`) makes each instance's bytes, which are written to a
  temporary file in ``folder`` (one instance in memory at a time) and streamed from there; the node's answer
  names the new SOP Instance UIDs, mapped back to ours for the outcome. An instance the project's risk
  policy withholds is not sent (``withheld``), as in the DIMSE push.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from sqlalchemy.engine import Engine

from pacsbridge.shared.core.errors import InvalidRequest, WebError
from pacsbridge.shared.deid.profile import DeidentifyError
from pacsbridge.shared.dicom.dimse import describe_status
from pacsbridge.shared.index.instance import Instance
from pacsbridge.shared.nodes.pusher import FLUSH_SECONDS, SLOT_TIMEOUT, Emitter, PushReport, Sent, Transform
from pacsbridge.shared.nodes.throttle import NodeSlots, RateLimiter, SlotTimeout, worker_id
from pacsbridge.shared.nodes.webhttp import StowResult, WebClient

__all__ = ["stow_push", "chunks", "CHUNK_INSTANCES", "CHUNK_BYTES", "FAILURE_REASONS"]

log = logging.getLogger(__name__)

#: Instances per STOW-RS request at most.
CHUNK_INSTANCES = 50
#: Bytes per STOW-RS request at most (an instance larger than this goes alone).
CHUNK_BYTES = 64 << 20
#: PS3.18 / PS3.4 failure reasons a STOW-RS answer may give, for messages.
FAILURE_REASONS = {
    0x0110: "processing failure", 0x0122: "SOP class not supported", 0x0124: "not authorized",
    0xA700: "out of resources", 0xA770: "out of resources", 0xA900: "data set does not match SOP class",
    0xC000: "cannot understand", 0xC122: "transfer syntax not supported",
    0xB000: "coercion of data elements", 0xB006: "elements discarded", 0xB007: "data set does not match SOP class",
}


def _reason(code: int | None) -> str:
    if code is None:
        return ""
    name = FAILURE_REASONS.get(code)
    return f"{describe_status(code)}{': ' + name if name else ''}"


class _Item(NamedTuple):
    inst: Instance
    size: int


def chunks(items: Sequence[_Item], max_instances: int = CHUNK_INSTANCES,
           max_bytes: int = CHUNK_BYTES) -> list[list[_Item]]:
    """Split instances (in order) into requests of at most ``max_instances`` and ``max_bytes``."""
    out: list[list[_Item]] = []
    current: list[_Item] = []
    size = 0
    for item in items:
        if current and (len(current) >= max_instances or size + item.size > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        out.append(current)
    return out


class _Chunker(threading.Thread):
    """One request at a time: takes chunks from the shared queue until it is empty, under one slot lease."""

    def __init__(self, n: int, client: WebClient, url: str, name: str, work: "queue.SimpleQueue[list[_Item]]",
                 results: "queue.SimpleQueue[Sent | None]", slots: NodeSlots | None, rate: RateLimiter | None,
                 cancel: threading.Event, transform: Transform | None, folder: Path) -> None:
        super().__init__(name=f"stow-{name}-{n}", daemon=True)
        self.client, self.url, self.node_name = client, url, name
        self.work, self.results, self.slots, self.rate, self.cancel = work, results, slots, rate, cancel
        self.transform, self.folder = transform, folder
        self.error = ""
        self.requests = 0

    def run(self) -> None:
        try:
            if self.slots is None:
                self._loop()
            else:
                with self.slots.acquire(timeout=SLOT_TIMEOUT, cancel=self.cancel):
                    self._loop()
        except SlotTimeout as exc:
            self.error = str(exc)
        except Exception as exc:  # a bug: the parent fails what no one sent, with this reason
            log.exception("STOW sender %s stopped", self.name)
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.results.put(None)

    def _loop(self) -> None:
        while not self.cancel.is_set():
            try:
                chunk = self.work.get_nowait()
            except queue.Empty:
                return
            for sent in self._send(chunk):
                self.results.put(sent)

    def _prepare(self, item: _Item, temps: list[str]) -> tuple[str, str, str] | Sent:
        """``(path to send, SOP UID the node will name, risk warning)``, or the instance's outcome already."""
        inst = item.inst
        if self.rate is not None:
            self.rate.wait(1, cancel=self.cancel)
        if self.transform is None:
            return str(inst.path), inst.sop_uid, ""
        try:
            made = self.transform(str(inst.path))
        except DeidentifyError as exc:
            return Sent(inst.sop_uid, inst.series_uid, False, None, f"cannot de-identify: {exc}")
        except OSError as exc:
            return Sent(inst.sop_uid, inst.series_uid, False, None,
                        f"cannot read {inst.object_file}: {exc.strerror or exc}")
        if made.data is None:
            return Sent(inst.sop_uid, inst.series_uid, False, None, made.reason, withheld=made.action)
        fd, tmp = tempfile.mkstemp(prefix="stow-", suffix=".dcm", dir=self.folder)
        temps.append(tmp)
        with os.fdopen(fd, "wb") as out:
            out.write(made.data)
        return tmp, made.sop_uid, made.reason if made.action == "warn" else ""

    def _send(self, chunk: list[_Item]) -> list[Sent]:
        out: list[Sent] = []
        temps: list[str] = []
        sending: list[tuple[Instance, str, str, str]] = []  # (inst, path, uid named by the node, risk)
        try:
            for item in chunk:
                if self.cancel.is_set():
                    break
                prepared = self._prepare(item, temps)
                if isinstance(prepared, Sent):
                    out.append(prepared)
                else:
                    sending.append((item.inst, *prepared))
            if not sending or self.cancel.is_set() and not out and not sending:
                return out
            try:
                self.requests += 1
                result = self.client.post_multipart(self.url, [p for _, p, _, _ in sending])
            except WebError as exc:
                why = "cancelled" if self.cancel.is_set() else f"node {self.node_name!r}: STOW-RS failed: {exc}"
                self.error = why
                # the HTTP status is in the text: Sent.status is a DICOM status (0xA900 ...), as in the job result
                return out + [Sent(i.sop_uid, i.series_uid, False, None, why) for i, _, _, _ in sending]
            return out + _outcomes(result, sending)
        finally:
            for tmp in temps:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass


def _outcomes(result: StowResult, sending: list[tuple[Instance, str, str, str]]) -> list[Sent]:
    """Each sent instance's outcome from the node's answer."""
    out = []
    if not result.parsed:  # 200 without a DICOM JSON body: the request as a whole was stored
        return [Sent(i.sop_uid, i.series_uid, True, 0, "", risk=risk) for i, _, _, risk in sending]
    answered = {a.sop_instance_uid: a for a in result.instances}
    for inst, _, uid, risk in sending:
        a = answered.get(uid)
        if a is None:
            out.append(Sent(inst.sop_uid, inst.series_uid, False, None,
                            f"not acknowledged: the STOW-RS answer (HTTP {result.status}) does not name {uid}"))
        elif a.ok:
            warning = a.warning_reason if a.warning_reason is not None else result.warning_reason
            out.append(Sent(inst.sop_uid, inst.series_uid, True, warning or 0,
                            f"warning {_reason(warning)}" if warning else "", risk=risk))
        else:
            out.append(Sent(inst.sop_uid, inst.series_uid, False, a.failure_reason,
                            f"STOW-RS failed: {_reason(a.failure_reason) or 'no FailureReason given'}"))
    return out


def stow_push(node: Any, instances: Sequence[Instance], engine: Engine | None, client: WebClient, url: str, *,
              folder: Path | str, holder: str = "", cancel: threading.Event | None = None,
              on_results: Callable[[list[Sent]], None] | None = None, transform: Transform | None = None,
              max_instances: int | None = None, max_bytes: int | None = None) -> PushReport:
    """STOW-RS ``instances`` to ``node`` (see the module docstring).

    Parameters
    ----------
    node : Node
        The destination (its name, ``allow_store`` and limits).
    instances
        From :func:`pacsbridge.worker.selection.resolve`.
    engine : Engine or None
        The database of the node slots and rate limiter (None: no limits, for tests and tools).
    client : WebClient
        The node's client (:func:`pacsbridge.shared.nodes.wado.web_client_for`).
    url : str
        The STOW-RS endpoint (``<stow base>/studies``).
    folder : path
        Where de-identified instances are written for the time of their request (the storage's incoming folder).
    holder, cancel, on_results, transform
        As :func:`pacsbridge.shared.nodes.pusher.push`.
    max_instances, max_bytes
        A request's size at most (default :data:`CHUNK_INSTANCES`, :data:`CHUNK_BYTES`).

    Raises
    ------
    InvalidRequest
        The node does not allow pushes.
    """
    if not getattr(node, "allow_store", True):
        raise InvalidRequest(f"node {node.name!r} does not accept pushes (allow_store is false)", "node")
    cancel = cancel or threading.Event()
    report = PushReport()
    start = time.monotonic()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    emit = Emitter(report, on_results)

    items: list[_Item] = []
    for inst in instances:
        try:
            items.append(_Item(inst, os.path.getsize(inst.path)))
        except OSError as exc:
            emit(Sent(inst.sop_uid, inst.series_uid, False, None,
                      f"cannot read {inst.object_file}: {exc.strerror or exc}"))
    work: queue.SimpleQueue[list[_Item]] = queue.SimpleQueue()
    todo = chunks(items, max_instances or CHUNK_INSTANCES, max_bytes or CHUNK_BYTES)
    for chunk in todo:
        work.put(chunk)
    slots = NodeSlots(engine, node, holder or worker_id()) if engine is not None else None
    rate = RateLimiter(engine, node) if engine is not None else None
    results: queue.SimpleQueue[Sent | None] = queue.SimpleQueue()
    count = max(1, min(int(getattr(node, "max_associations", 1) or 1), len(todo)))
    senders = [_Chunker(i, client, url, node.name, work, results, slots, rate, cancel, transform, folder)
               for i in range(count)] if todo else []
    for s in senders:
        s.start()
    running = len(senders)
    while running:
        try:
            item = results.get(timeout=FLUSH_SECONDS)
        except queue.Empty:
            emit(None)
            continue
        if item is None:
            running -= 1
        else:
            emit(item)
    for s in senders:
        s.join()
    report.associations = sum(s.requests for s in senders)  # requests, for a STOW push
    reason = next((s.error for s in senders if s.error), "") or "no request could be sent"
    while not cancel.is_set():  # what no sender could send is failed, with the senders' reason
        try:
            chunk = work.get_nowait()
        except queue.Empty:
            break
        for it in chunk:
            emit(Sent(it.inst.sop_uid, it.inst.series_uid, False, None, f"not sent: {reason}"))
    emit(None, force=True)
    report.cancelled = cancel.is_set()
    report.seconds = time.monotonic() - start
    return report
