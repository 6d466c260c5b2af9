"""Where a job's instances come from: the searcher and downloader interfaces, and their DIMSE implementations.

Built the dicomtrolley way: a job talks to its source through two small interfaces, so that QIDO-RS /
WADO-RS sources slot in without touching jobs, progress or the API:

* a :class:`Searcher` (query model in; studies, series, instances out), here :class:`DimseSearcher`
  (C-FIND, Study Root);
* a :class:`Downloader` (series, or SOP UIDs of a series, in; instances into our storage out), here
  :class:`MoveDownloader` (C-MOVE to our own listener, which stores, and the workers index) and
  :class:`GetDownloader` (C-GET stored straight into storage through ``ctx.storage`` and indexed here).

Each association holds a :class:`~pacsbridge.shared.nodes.throttle.NodeSlots` lease. The ``retrieve``
job that drives them is :mod:`pacsbridge.worker.kinds.retrieve`.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import logging
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (UID, HTJ2K, AllTransferSyntaxes, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, HTJ2KLossless, HTJ2KLosslessRPCL, ImplicitVRLittleEndian, JPEG2000,
                         JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                         JPEGLSLossless, JPEGLSNearLossless, RLELossless)
from pynetdicom import StoragePresentationContexts, build_role, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # (made at import time)
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove)

from pacsbridge.shared.core.config import initial_settings
from pacsbridge.shared.index.context import Context
from pacsbridge.shared.dicom.dimse import (PENDING, STATUS_CANCEL, FindResult, associate, describe_status, find_all,
                                           interrupt, lost)
from pacsbridge.shared.core.errors import DimseError, InvalidDataset, StorageError
from pacsbridge.shared.dicom.filemeta import encoded_instance
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.dicom.query import Query
from pacsbridge.shared.dicom.compat.reactor import on_conn_open as reactor_on_conn_open
from pacsbridge.shared.index.records import read_header
from pacsbridge.shared.nodes.throttle import NodeSlots, RateLimiter, SlotTimeout

__all__ = ["Searcher", "Downloader", "SeriesRef", "series_refs", "Transfer", "DimseSearcher", "MoveDownloader",
           "GetDownloader", "FIND_LIMIT", "DIMSE_TIMEOUT", "SLOT_WAIT", "MAX_CONTEXTS", "GET_COMPRESSED"]

log = logging.getLogger(__name__)

#: A C-FIND answer with this many studies is taken as cut short by the PACS (0: rely on its status).
FIND_LIMIT = initial_settings().find_limit  # PACSBRIDGE_FIND_LIMIT
#: Timeout of each association's requests (seconds): PACSBRIDGE_SCU_DIMSE_TIMEOUT, our client's
#: (PACSBRIDGE_DIMSE_TIMEOUT is the listener's).
DIMSE_TIMEOUT = initial_settings().scu_dimse_timeout
#: How long a job waits for a free association slot of its node before failing the series.
SLOT_WAIT = initial_settings().slot_wait_seconds  # PACSBRIDGE_SLOT_WAIT_SECONDS
#: After a C-CANCEL, how long the peer has to end the C-MOVE / C-GET before we abort the association.
CANCEL_GRACE = 2.0
#: Presentation contexts one association may propose (PS3.8: ids 1..255, odd).
MAX_CONTEXTS = 128
_UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian), str(DeflatedExplicitVRLittleEndian),
                 str(ExplicitVRBigEndian))
#: Compressed syntaxes a C-GET offers a context each, most wanted first (PACS store these; the rest follow).
GET_COMPRESSED: tuple[str, ...] = tuple(dict.fromkeys(
    [str(u) for u in (JPEG2000Lossless, JPEG2000, JPEGLosslessSV1, JPEGLossless, JPEGBaseline8Bit,
                      JPEGExtended12Bit, JPEGLSLossless, JPEGLSNearLossless, RLELossless, HTJ2KLossless,
                      HTJ2KLosslessRPCL, HTJ2K)]
    + [str(u) for u in AllTransferSyntaxes if UID(u).is_compressed]))
#: The earliest StudyDate assumed when a truncated query without dates has to be split.
EARLIEST = dt.date(1900, 1, 1)


# -- what a source gives ------------------------------------------------------
@dataclasses.dataclass
class SeriesRef:
    """A series on the source, with how many instances it should have (None: unknown)."""

    study_uid: str
    series_uid: str
    patient_id: str = ""
    modality: str = ""
    description: str = ""
    expected: int | None = None
    sops: tuple[str, ...] | None = None  # only these instances (an IMAGE-level query)
    sop_classes: tuple[str, ...] = ()  # SOP classes of its study, when the node said (SOPClassesInStudy)
    body_part: str = ""  # BodyPartExamined, when the query asked for it (a cohort's filter)


@dataclasses.dataclass
class Transfer:
    """What one download did: sub-operation counts, SOP UIDs stored here, why it stopped short."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    stored: list[str] = dataclasses.field(default_factory=list)
    error: str = ""
    failed_uids: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # what the job result should say (a fallback ...)


class Searcher(Protocol):
    """Query model in; studies, series and instances out (C-FIND here, QIDO-RS in
    :mod:`pacsbridge.shared.nodes.dicomweb`; :func:`pacsbridge.shared.nodes.searchers.searcher_for` picks)."""

    node: Node
    #: How many times a capped study list was split by date range.
    splits: int

    def studies(self, query: Query) -> list[dict[str, Any]]: ...

    def series(self, query: Query, study: dict[str, Any]) -> list[SeriesRef]: ...

    def instances(self, series: SeriesRef) -> list[str]: ...

    def plan(self, query: Query) -> list[SeriesRef]: ...


class Downloader(Protocol):
    """References in; instances into our storage and index (C-MOVE / C-GET now, WADO-RS later)."""

    #: True when :meth:`fetch` indexes what it stored before returning (no waiting on workers).
    indexes_itself: bool

    def fetch(self, series: SeriesRef, sops: Sequence[str] | None,
              cancel: threading.Event) -> Transfer: ...


# -- DIMSE searcher -------------------------------------------------------------
class DimseSearcher:
    """C-FIND (Study Root) against a node, each association under a :class:`NodeSlots` lease."""

    def __init__(self, node: Node, calling_ae: str, slots: NodeSlots | None = None,
                 find_limit: int = FIND_LIMIT, timeout: float = DIMSE_TIMEOUT,
                 cancel: threading.Event | None = None) -> None:
        self.node = node
        self.cancel = cancel or threading.Event()
        self.calling_ae = calling_ae
        self.slots = slots
        self.find_limit = find_limit
        self.timeout = timeout
        self.splits = 0

    def _find(self, query: Query, level: str, identifier: Dataset | None = None) -> Any:
        with _slot(self.slots, self.cancel):
            # our own association, tuned: an IMAGE-level answer is one response per instance
            with associate(self.node, self.calling_ae, timeout=self.timeout,
                           evt_handlers=[(evt.EVT_CONN_OPEN, reactor_on_conn_open)], cancel=self.cancel) as assoc:
                return find_all(self.node, query, self.calling_ae, level, timeout=self.timeout,
                                identifier=identifier, assoc=assoc)

    def studies(self, query: Query) -> list[dict[str, Any]]:
        """Matching studies; a range the PACS cut short is split in halves until it is not."""
        study_query = query.replace(level="study", SeriesInstanceUID=(), SOPInstanceUID=(),
                                    include_fields=tuple(dict.fromkeys(query.include_fields + ("SOPClassesInStudy",))))
        if study_query.is_empty():  # only series/instance UIDs given: the series level finds them
            return [{}]
        found = self._find(study_query, "study")
        truncated = found.truncated or (self.find_limit and len(found) >= self.find_limit)
        if not truncated:
            return list(found)
        lo = query.min_study_date or EARLIEST
        hi = query.max_study_date or dt.date.today()
        if lo >= hi:
            raise DimseError(f"node {self.node.name!r} cuts the study list short even for the single day "
                             f"{lo:%Y-%m-%d} ({len(found)} answers); narrow the query")
        mid = lo + (hi - lo) // 2
        self.splits += 1
        log.info("node %s: C-FIND cut short (%d answers, status %s): splitting %s..%s at %s",
                 self.node.name, len(found), describe_status(found.status), lo, hi, mid)
        out: dict[str, dict[str, Any]] = {}
        for part in (query.replace(min_study_date=lo, max_study_date=mid),
                     query.replace(min_study_date=mid + dt.timedelta(days=1), max_study_date=hi)):
            for study in self.studies(part):
                out.setdefault(study.get("StudyInstanceUID") or "", study)
        return list(out.values())

    def series(self, query: Query, study: dict[str, Any]) -> list[SeriesRef]:
        """The series of one study (or, for ``{}``, those the query names) with their counts."""
        uid = study.get("StudyInstanceUID")
        q = Query(level="series", PatientID=query.PatientID if not uid else "",
                  StudyInstanceUID=(uid,) if uid else query.StudyInstanceUID,
                  SeriesInstanceUID=query.SeriesInstanceUID, Modality=query.Modality,
                  include_fields=("BodyPartExamined",) if "BodyPartExamined" in query.include_fields else ())
        return series_refs(self._find(q, "series"), query, study, self.instances)

    def instances(self, series: SeriesRef, only: Sequence[str] = ()) -> list[str]:
        """SOP Instance UIDs of a series (IMAGE-level C-FIND), optionally among ``only``."""
        q = Query(level="image", StudyInstanceUID=(series.study_uid,) if series.study_uid else (),
                  SeriesInstanceUID=(series.series_uid,), SOPInstanceUID=tuple(only))
        return [str(i["SOPInstanceUID"]) for i in self._find(q, "image") if i.get("SOPInstanceUID")]

    def plan(self, query: Query) -> list[SeriesRef]:
        """Every series the query matches, with the SOP classes of its study when the node tells them."""
        seen: dict[str, SeriesRef] = {}
        studies = self.studies(query)
        for study in studies:
            for ref in self.series(query, study):
                seen.setdefault(ref.series_uid, ref)
        unknown = sorted({r.study_uid for r in seen.values() if r.study_uid and not r.sop_classes})
        if unknown and studies == [{}]:  # series named without their studies: ask the studies (C-GET needs them)
            try:
                found = self._find(Query(level="study", StudyInstanceUID=tuple(unknown),
                                         include_fields=("SOPClassesInStudy",)), "study")
            except DimseError as exc:
                log.info("node %s: SOP classes of the studies not found (%s)", self.node.name, exc)
                found = FindResult()
            classes = {s.get("StudyInstanceUID"): _uids(s.get("SOPClassesInStudy")) for s in found}
            for ref in seen.values():
                ref.sop_classes = ref.sop_classes or classes.get(ref.study_uid, ())
        return list(seen.values())


def series_refs(answers: Iterable[Mapping[str, Any]], query: Query, study: Mapping[str, Any],
                instances: Callable[..., list[str]]) -> list[SeriesRef]:
    """Series-level answers (C-FIND or QIDO-RS, as keyword -> value) as :class:`SeriesRef` with their counts.

    A series without a count is counted by listing its instances (``instances(ref)``); a query naming SOP
    Instance UIDs keeps, per series, only those (``instances(ref, only)``), and drops a series with none.
    """
    uid = study.get("StudyInstanceUID")
    out = []
    for s in answers:
        count = s.get("NumberOfSeriesRelatedInstances")
        ref = SeriesRef(study_uid=str(s.get("StudyInstanceUID") or uid or ""),
                        series_uid=str(s.get("SeriesInstanceUID") or ""),
                        patient_id=str(s.get("PatientID") or study.get("PatientID") or ""),
                        modality=str(s.get("Modality") or ""),
                        description=str(s.get("SeriesDescription") or "")[:64],
                        expected=int(count) if isinstance(count, (int, str)) and str(count).isdigit() else None,
                        sop_classes=_uids(study.get("SOPClassesInStudy")),
                        body_part=str(s.get("BodyPartExamined") or ""))
        if not ref.series_uid:
            continue
        if query.SOPInstanceUID:
            ref.sops = tuple(instances(ref, query.SOPInstanceUID))
            ref.expected = len(ref.sops)
            if not ref.sops:
                continue
        elif ref.expected is None:
            ref.expected = len(instances(ref))
        out.append(ref)
    return out


def _uids(value: Any) -> tuple[str, ...]:
    """A C-FIND answer's UI value (one, several, or none) as a tuple."""
    if not value:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(dict.fromkeys(str(v).strip() for v in values if str(v).strip()))


# -- DIMSE downloaders -----------------------------------------------------------
def _identifier(series: SeriesRef, sops: Sequence[str] | None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE" if sops else "SERIES"
    ds.StudyInstanceUID = series.study_uid
    ds.SeriesInstanceUID = series.series_uid
    if sops:
        ds.SOPInstanceUID = list(sops) if len(sops) > 1 else sops[0]
    return ds


def _count(status: Dataset, transfer: Transfer) -> None:
    for attr, name in (("completed", "NumberOfCompletedSuboperations"),
                       ("failed", "NumberOfFailedSuboperations"),
                       ("warning", "NumberOfWarningSuboperations")):
        value = status.get(name)
        if value is not None and value != "":
            setattr(transfer, attr, int(value))


def _run_retrieve(node: Node, assoc: Any, responses: Iterable[Any], what: str, transfer: Transfer,
                  cancel: threading.Event, model: str) -> None:
    """Read a C-MOVE / C-GET's responses into ``transfer``; a cancel stops it between instances.

    Once ``cancel`` is set a watcher sends C-CANCEL at once (not only when the next
    pending response comes: a peer need not send any), and if the peer has not ended
    the request within :data:`CANCEL_GRACE` seconds it interrupts the association
    (A-ABORT): the job stops waiting either way.
    """
    finished = threading.Event()

    def watch() -> None:
        while not cancel.wait(0.1):
            if finished.is_set():
                return
        if finished.is_set():
            return
        try:
            assoc.send_c_cancel(1, query_model=model)
        except Exception:  # the association ended meanwhile
            log.debug("C-CANCEL not sent", exc_info=True)
        if not finished.wait(CANCEL_GRACE):
            log.info("node %s: %s not ended %.0f s after C-CANCEL: aborting", node.name, what, CANCEL_GRACE)
            interrupt(assoc, "cancelled")

    watcher = threading.Thread(target=watch, name=f"{what}-cancel", daemon=True)
    watcher.start()
    try:
        for status, identifier in responses:
            if not status or "Status" not in status:
                transfer.error = "cancelled" if cancel.is_set() else str(lost(node, assoc, what, DIMSE_TIMEOUT))
                return
            code = int(status.Status)
            _count(status, transfer)
            if code in PENDING:
                continue
            if code == STATUS_CANCEL:
                transfer.error = "cancelled"
            elif code != 0 and not (0xB000 <= code <= 0xBFFF):
                comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
                transfer.error = f"{what} failed with status {describe_status(code)}{comment}"
            elif code != 0:
                transfer.error = f"{what} ended with warning {describe_status(code)} ({transfer.failed} failed)"
            _failed_uids(identifier, transfer)
    finally:
        finished.set()
        watcher.join(CANCEL_GRACE + 2)


def _failed_uids(identifier: Any, transfer: Transfer) -> None:
    """The Failed SOP Instance UID List (0008,0058) of a final response, if the peer gave one."""
    try:
        value = identifier.get("FailedSOPInstanceUIDList") if identifier is not None else None
    except Exception:  # an identifier pydicom cannot read
        return
    if value:
        transfer.failed_uids = [str(v) for v in value] if isinstance(value, (MultiValue, list)) else [str(value)]


class MoveDownloader:
    """C-MOVE a series (or some of its instances) to our listener's AE; the workers index them."""

    indexes_itself = False

    def __init__(self, node: Node, calling_ae: str, destination: str, slots: NodeSlots | None = None,
                 rate: RateLimiter | None = None) -> None:
        self.node = node
        self.calling_ae = calling_ae
        self.destination = destination
        self.slots = slots
        self.rate = rate

    def fetch(self, series: SeriesRef, sops: Sequence[str] | None, cancel: threading.Event) -> Transfer:
        transfer = Transfer()
        if self.rate is not None:
            self.rate.wait(len(sops) if sops else (series.expected or 1), cancel=cancel)
        if cancel.is_set():  # cancelled while waiting for its turn: move nothing
            transfer.error = "cancelled"
            return transfer
        model = StudyRootQueryRetrieveInformationModelMove
        try:
            with _slot(self.slots, cancel):
                with associate(self.node, self.calling_ae, [build_context(model)], timeout=DIMSE_TIMEOUT,
                               evt_handlers=[(evt.EVT_CONN_OPEN, reactor_on_conn_open)], cancel=cancel,
                               cancel_grace=CANCEL_GRACE + 1) as assoc:
                    responses = assoc.send_c_move(_identifier(series, sops), self.destination, model)
                    _run_retrieve(self.node, assoc, responses, "C-MOVE", transfer, cancel, model)
        except (DimseError, SlotTimeout) as exc:
            transfer.error = str(exc)
        return transfer


class GetDownloader:
    """C-GET a series (or some instances) into ``ctx.storage``, indexing what arrived."""

    indexes_itself = True

    def __init__(self, node: Node, calling_ae: str, ctx: Context, slots: NodeSlots | None = None,
                 rate: RateLimiter | None = None) -> None:
        self.node = node
        self.calling_ae = calling_ae
        self.ctx = ctx
        self.slots = slots
        self.rate = rate
        from pydicom.datadict import tag_for_keyword

        self.tags = {t for t in (tag_for_keyword(k) for k in ctx.storage.template.keywords()) if t}
        # journaled (this copy only, not the context's other stores): instances are indexed once the
        # association ends, and a worker killed before that leaves them stored but unindexed, for
        # the listener's reconciler to find (shared/index/journal.py)
        self.storage = copy.copy(ctx.storage).enable_journal()
        self._proposals: dict[tuple[str, ...], tuple[list[Any], list[Any]]] = {}

    def proposal(self, sop_classes: Sequence[str]) -> tuple[list[Any], list[Any]]:
        """Presentation contexts and SCP roles for a C-GET of instances of ``sop_classes``.

        The node sends each instance in a context accepted for its SOP class,
        preferably in the syntax it stores it in; one that cannot convert
        (Orthanc without a JPEG 2000 codec) fails the sub-operation when only an
        uncompressed context was accepted. So for the SOP classes the query
        found, each compressed syntax of :data:`GET_COMPRESSED` gets a context of
        its own (the node accepts each one it can send), beside one context of
        the uncompressed syntaxes, within the 128 contexts an association may
        propose (:data:`GET_COMPRESSED` is in order of preference when they do
        not all fit). Unknown SOP classes: one context per common storage SOP
        class, listing every syntax (the node picks one per class).
        """
        key = tuple(sorted(set(sop_classes)))
        if key not in self._proposals:
            model = StudyRootQueryRetrieveInformationModelGet
            per_class = (MAX_CONTEXTS - 1) // len(key) - 1 if key else 0
            if key and per_class >= 0:
                compressed = list(GET_COMPRESSED)[:per_class]
                contexts = [build_context(model)]
                for uid in key:
                    contexts.append(build_context(uid, list(_UNCOMPRESSED)))
                    contexts += [build_context(uid, [ts]) for ts in compressed]
                classes = list(key)
            else:
                classes = [str(cx.abstract_syntax) for cx in StoragePresentationContexts][:MAX_CONTEXTS - 1]
                syntaxes = list(_UNCOMPRESSED) + [ts for ts in GET_COMPRESSED if ts not in _UNCOMPRESSED]
                contexts = [build_context(model)] + [build_context(uid, syntaxes) for uid in classes]
            self._proposals[key] = (contexts, [build_role(uid, scp_role=True) for uid in classes])
        return self._proposals[key]

    def fetch(self, series: SeriesRef, sops: Sequence[str] | None, cancel: threading.Event) -> Transfer:
        from pacsbridge.shared.index.importer import Importer

        transfer = Transfer()
        stored: list[tuple[str, str]] = []  # (relpath, sop)
        assoc_id = uuid.uuid4().hex
        problems: list[str] = []

        def on_store(event: Any) -> int:
            if self.rate is not None:
                self.rate.wait(1, cancel=cancel)
            sop = str(event.request.AffectedSOPInstanceUID)
            try:
                data = encoded_instance(event)
                header = read_header(data, f"C-GET {sop}", self.tags)
                result = self.storage.store(data, header)
            except InvalidDataset as exc:
                problems.append(f"{sop}: {exc.reason}")
                return 0xC210
            except (StorageError, OSError) as exc:
                problems.append(f"{sop}: {exc}")
                return 0xA700
            stored.append((result.relpath, sop))
            return 0x0000

        model = StudyRootQueryRetrieveInformationModelGet
        contexts, roles = self.proposal(series.sop_classes)
        accepted: dict[str, list[str]] = {}
        try:
            with _slot(self.slots, cancel):
                with associate(self.node, self.calling_ae, contexts, timeout=DIMSE_TIMEOUT,
                               ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store),
                                                            (evt.EVT_CONN_OPEN, reactor_on_conn_open)],
                               cancel=cancel, cancel_grace=CANCEL_GRACE + 1) as assoc:
                    for cx in assoc.accepted_contexts:
                        accepted.setdefault(str(cx.abstract_syntax), []).append(str(cx.transfer_syntax[0]))
                    responses = assoc.send_c_get(_identifier(series, sops), model)
                    _run_retrieve(self.node, assoc, responses, "C-GET", transfer, cancel, model)
        except (DimseError, SlotTimeout) as exc:
            transfer.error = str(exc)
        if transfer.failed and transfer.error != "cancelled" and transfer.failed > len(problems):
            transfer.error = _explain_get_failures(transfer, accepted, series.sop_classes)
        if problems and not transfer.error:
            transfer.error = f"{len(problems)} instance(s) not stored: {problems[0]}"
        if stored:
            now = time.time()
            report = Importer(self.ctx.index, self.ctx.storage, workers=1).reindex_files(
                [r for r, _ in stored], [[self.node.ae_title, assoc_id, now]] * len(stored))
            for path, reason in report.rejected:
                log.warning("C-GET from %s: not indexed: %s: %s", self.node.name, path, reason)
        transfer.stored = [s for _, s in stored]
        return transfer


def _explain_get_failures(transfer: Transfer, accepted: dict[str, list[str]], sop_classes: Sequence[str]) -> str:
    """Why C-GET sub-operations failed, as far as we can tell, and what to try instead."""
    first = f" (first: {transfer.failed_uids[0]})" if transfer.failed_uids else ""
    status = f"; it answered: {transfer.error}" if transfer.error else ""
    if sop_classes:
        offered = "; ".join(f"{UID(c).name}: " + (", ".join(UID(ts).name for ts in accepted.get(c, [])) or "nothing")
                            for c in sop_classes[:5])
    else:  # the node did not say which SOP classes the study holds: one context per common storage class
        names = sorted({UID(ts).name for v in accepted.values() for ts in v})
        offered = f"{len(accepted)} storage SOP classes, in {', '.join(names)}" if accepted else ""
    return (f"the node could not send {transfer.failed} instance(s) over C-GET{first}{status}. It must send "
            f"each one in a transfer syntax accepted for its SOP class (accepted here: {offered or 'none'}); "
            "a node that stores an instance in another syntax and cannot convert it (JPEG 2000 and other "
            "compressed syntaxes often) fails the sub-operation. Try mode 'move': C-MOVE lets the node send "
            "each instance as it stores it")


class _slot:
    """``with _slot(slots, cancel):`` holds a lease when there are slots, else nothing."""

    def __init__(self, slots: NodeSlots | None, cancel: threading.Event) -> None:
        self.cm = slots.acquire(timeout=SLOT_WAIT, cancel=cancel) if slots is not None else None

    def __enter__(self) -> None:
        if self.cm is not None:
            self.cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.cm is not None:
            self.cm.__exit__(*exc)
