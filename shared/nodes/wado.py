"""DICOMweb downloaders: WADO-RS and WADO-URI into our storage, indexed, behind the ``Downloader`` protocol.

The ``retrieve`` job (:mod:`pacsbridge.worker.kinds.retrieve`) drives a :class:`WadoRsDownloader` or a
:class:`WadoUriDownloader` exactly as it drives :class:`~pacsbridge.shared.nodes.sources.GetDownloader`:
``fetch(series, sops, cancel)`` pulls a series (or some of its instances) and returns a
:class:`~pacsbridge.shared.nodes.sources.Transfer`; what is missing afterwards is asked again by SOP UID.

Why it is built this way
------------------------
* **The listener's storage path.** Each body arrives through :class:`~.webhttp.WebClient` as a
  ``.part-<uuid>`` file in ``<storage>/.incoming`` (same file system, bounded memory: never a study, never
  even one instance in memory). Its header is read from an ``mmap``
  (:func:`~pacsbridge.shared.index.records.read_header`, as the listener reads a spooled C-STORE), checked to
  belong to the series asked (and to the SOP UIDs asked),
  made durable (:meth:`Storage.settle`) and linked into place under the template's sanitised name
  (:meth:`Storage.link_into_place`: atomic, duplicate policy). A part that is not DICOM, or of another series,
  is counted failed with its reason and deleted: nothing half-stored under a real name, ever (a body cut short
  deletes the part in progress; the parts before it were complete and are kept).
* **Indexed here** (``indexes_itself``), by :class:`~pacsbridge.shared.index.importer.Importer` passes of 100
  instances on a thread while the rest of the series downloads (:class:`_Indexing`); ``fetch`` returns once
  all of them are indexed, as C-GET's does: the job's per-series progress reads the index right after.
* **The node's limits.** Every request holds a :class:`~.throttle.NodeSlots` lease (WADO-RS: one per request;
  WADO-URI: one per download thread, for as long as it has instances to fetch); the
  :class:`~.throttle.RateLimiter` is charged one instance as each arrives.
* **WADO-RS** asks ``Accept: multipart/related; type="application/dicom"; transfer-syntax=*`` (the instances as
  the node stores them: byte-identical copies, compressed syntaxes included). A node that answers 406 is
  asked again without ``transfer-syntax=*`` (it then sends its default, usually explicit VR little endian) and the
  Transfer says so in ``notes``; later requests of the same downloader go straight to the plain Accept.
  The whole series is one request; a list of SOP UIDs (a re-pull) is one request per instance.
* **WADO-URI** (PS3.18 9: ``requestType=WADO&studyUID=&seriesUID=&objectUID=&contentType=application/dicom
  &transferSyntax=*``) fetches one instance per request, so it needs the SOP UIDs: the searcher's
  ``instances`` is passed in. Up to ``node.max_associations`` requests run in parallel (threads sharing the
  node's one client and its connection pool).

:func:`web_client_for` builds a node's :class:`~.webhttp.WebClient` from its DICOMweb fields, read defensively
(``getattr``) so that this module works before and after the node model grows them.
"""

from __future__ import annotations

import copy
import logging
import mmap
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote

from pacsbridge.shared.core.errors import ConfigError, InvalidDataset, StorageError, WebError
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.index.context import Context
from pacsbridge.shared.index.records import read_header
from pacsbridge.shared.nodes.credentials import node_secret
from pacsbridge.shared.nodes.sources import SeriesRef, Transfer, _slot
from pacsbridge.shared.nodes.throttle import NodeSlots, RateLimiter, SlotTimeout
from pacsbridge.shared.nodes.webhttp import DICOM_MULTIPART, Part, WebAuth, WebClient

__all__ = ["WadoRsDownloader", "WadoUriDownloader", "web_client_for", "web_urls",
           "PLAIN_MULTIPART", "WebUrls"]

log = logging.getLogger(__name__)

#: The WADO-RS Accept after a 406 to ``transfer-syntax=*``: the node's default syntax.
PLAIN_MULTIPART = 'multipart/related; type="application/dicom"'
_SOP_UID, _SERIES_UID = 0x00080018, 0x0020000E


# -- the node's HTTP side ---------------------------------------------------------------------------------
class WebUrls:
    """A node's DICOMweb bases (:meth:`Node.service_url`: each one not configured is ``web_url``)."""

    def __init__(self, node: Node) -> None:
        self.web = node.web_url.rstrip("/")
        self.qido, self.wado = node.service_url("qido"), node.service_url("wado")
        self.wado_uri, self.stow = node.service_url("wado_uri"), node.service_url("stow")

    def all(self) -> list[str]:
        return [u for u in (self.web, self.qido, self.wado, self.wado_uri, self.stow) if u]


def web_urls(node: Node) -> WebUrls:
    """The node's DICOMweb URLs (empty strings when it speaks no DICOMweb)."""
    return WebUrls(node)


def web_client_for(node: Node, settings: Any = None, cancel: threading.Event | None = None) -> WebClient:
    """The :class:`WebClient` of a node's DICOMweb part: its URLs, authentication (its stored secret, else
    the one its name finds: :func:`~pacsbridge.shared.nodes.credentials.node_secret`), TLS and timeout.

    Raises
    ------
    WebError
        The node has no ``web_url``, or its secret cannot be found or decrypted (the message names the
        node or the secret's name, never its value).
    """
    urls = web_urls(node)
    if not node.has_web:
        raise WebError(f"node {node.name!r} has no DICOMweb URL (web_url)")
    secret = ""
    if node.web_auth != "none":
        try:
            secret = node_secret(node, settings)
        except ConfigError as exc:
            text = str(exc)
            raise WebError(text if text.startswith("node ") else f"node {node.name!r}: {text}") from None
    auth = WebAuth(node.web_auth, node.web_user, secret)
    return WebClient(urls.web, auth=auth, verify=node.web_verify, ca_bundle=node.web_ca_bundle,
                     timeout=float(node.web_timeout or 60.0), cancel=cancel, also=urls.all(),
                     max_connections=max(4, node.max_associations * 2))


# -- storing one part -----------------------------------------------------------------------------------------
class _Rejected(Exception):
    """A part that is not an instance we asked for: counted failed, with the reason."""

    def __init__(self, reason: str, sop: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.sop = sop


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _Store:
    """The common part of both downloaders: a part file in, an instance in storage (or a rejection) out."""

    indexes_itself = True

    def __init__(self, client: WebClient, ctx: Context, node: Any, slots: NodeSlots | None,
                 rate: RateLimiter | None) -> None:
        from pydicom.datadict import tag_for_keyword

        self.client = client
        self.ctx = ctx
        self.node = node
        self.name = str(getattr(node, "name", "") or "")
        self.source = str(getattr(node, "ae_title", "") or "") or self.name[:16]
        self.slots = slots
        self.rate = rate
        self.tags = {t for t in (tag_for_keyword(k) for k in ctx.storage.template.keywords()) if t}
        self.tags |= {_SOP_UID, _SERIES_UID}
        ctx.storage.ensure()
        # journaled, as C-GET's (this copy only): an instance stored but not yet indexed when the worker dies
        # is in the arrival journal for the listener's reconciler to find (shared/index/journal.py)
        self.storage = copy.copy(ctx.storage).enable_journal()
        self.folder = ctx.storage.incoming

    def _keep(self, part: Part, series: SeriesRef, wanted: set[str] | None, what: str) -> tuple[str, str]:
        """Check ``part`` and link it into storage: ``(relpath, sop)``. The part file is gone afterwards.

        Raises
        ------
        _Rejected
            Not DICOM, another series, an instance not asked for.
        StorageError, OSError
            The storage could not take it.
        """
        storage = self.storage
        try:
            media = part.content_type.split(";", 1)[0].strip().lower()
            if media and media not in ("application/dicom", "application/octet-stream"):
                raise _Rejected(f"a part of type {media!r}, not application/dicom")
            if part.size == 0:
                raise _Rejected("an empty part")
            with open(part.path, "rb") as fh:
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    try:
                        header = read_header(mm, what, self.tags)
                    except InvalidDataset as exc:
                        raise _Rejected(f"not a DICOM instance: {exc.reason}") from None
                sop = header.sop_instance_uid
                if header.values.get(_SERIES_UID, "") != series.series_uid:
                    raise _Rejected(f"instance {sop} is of series {header.values.get(_SERIES_UID, '?')}, "
                                    f"not {series.series_uid} as asked", sop)
                if wanted is not None and sop not in wanted:
                    raise _Rejected(f"instance {sop} was not asked for", sop)
                storage.settle(fh.fileno())
            result = storage.link_into_place(str(part.path), storage.path_for(header), part.size, sop=sop)
            return result.relpath, sop
        finally:
            _unlink(part.path)  # linked into place (a second name) or rejected: this name goes

    def _index(self, stored: list[tuple[str, str]], request_id: str) -> None:
        from pacsbridge.shared.index.importer import Importer

        if not stored:
            return
        now = time.time()
        report = Importer(self.ctx.index, self.ctx.storage, workers=1).reindex_files(
            [r for r, _ in stored], [[self.source, request_id, now]] * len(stored))
        for path, reason in report.rejected:
            log.warning("DICOMweb retrieve from %s: not indexed: %s: %s", self.name, path, reason)

    def _rate(self, cancel: threading.Event) -> None:
        if self.rate is not None:
            self.rate.wait(1, cancel=cancel)


class _Indexing:
    """What one fetch stored, ``(relpath, sop)`` in arrival order, indexed in batches of :attr:`BATCH` on one
    background thread while the rest downloads; :meth:`finish` indexes the last batch, waits for all of them
    (raising the first error, as one pass at the end did) and gives the SOP UIDs stored.

    (Measured: one Importer pass after the series had arrived left the CPU idle while the node streamed
    and the network idle while we indexed; the stream mostly waits on the socket and on fsync, both
    outside the GIL, so the two overlap.)"""

    BATCH = 100

    def __init__(self, store: _Store, request_id: str) -> None:
        self.store, self.request_id = store, request_id
        self.stored: list[tuple[str, str]] = []
        self._sent = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []

    def append(self, item: tuple[str, str]) -> None:
        with self._lock:
            self.stored.append(item)
            if len(self.stored) - self._sent >= self.BATCH:
                self._submit()

    def _submit(self) -> None:
        batch = self.stored[self._sent:]
        self._sent = len(self.stored)
        if batch:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"wado-index-{self.store.name}")
            self._futures.append(self._pool.submit(self.store._index, batch, self.request_id))

    def finish(self) -> list[str]:
        with self._lock:
            self._submit()
        try:
            for future in self._futures:
                future.result()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        return [sop for _, sop in self.stored]


# -- WADO-RS -------------------------------------------------------------------------------------------------
class WadoRsDownloader(_Store):
    """WADO-RS a series (or some of its instances) into ``ctx.storage``, indexing what arrived.

    Parameters
    ----------
    client : WebClient
        The node's client (:func:`web_client_for`).
    ctx : Context
        Our storage and index.
    node : Node
        For its name (messages, arrivals) and AE title.
    slots, rate
        The node's limits (None: unlimited).
    base : str
        The WADO-RS root (default: the client's ``base_url``).
    """

    def __init__(self, client: WebClient, ctx: Context, node: Any, slots: NodeSlots | None = None,
                 rate: RateLimiter | None = None, base: str = "") -> None:
        super().__init__(client, ctx, node, slots, rate)
        self.base = base or client.base_url
        self.accept = DICOM_MULTIPART
        self._lock = threading.Lock()

    def _get(self, url: str, series: SeriesRef, wanted: set[str] | None, cancel: threading.Event,
             transfer: Transfer, stored: _Indexing) -> None:
        """One WADO-RS request: every part stored or counted failed; raises WebError / SlotTimeout."""
        for accept in (self.accept, PLAIN_MULTIPART):
            try:
                with _slot(self.slots, cancel):
                    for part in self.client.stream_multipart(url, accept, self.folder):
                        self._rate(cancel)
                        try:
                            stored.append(self._keep(part, series, wanted, f"WADO-RS {url}"))
                            transfer.completed += 1
                        except _Rejected as exc:
                            transfer.failed += 1
                            if exc.sop:
                                transfer.failed_uids.append(exc.sop)
                            transfer.notes.append(f"a part refused: {exc.reason}")
                        except (StorageError, OSError) as exc:
                            transfer.failed += 1
                            transfer.notes.append(f"a part not stored: {exc}")
                return
            except WebError as exc:
                if exc.status != 406 or accept == PLAIN_MULTIPART:
                    raise
                note = (f"node {self.name!r} refused transfer-syntax=* (406): asked again for its default "
                        "transfer syntax (instances may be transcoded)")
                log.info("%s", note)
                with self._lock:
                    self.accept = PLAIN_MULTIPART
                transfer.notes.append(note)

    def fetch(self, series: SeriesRef, sops: Sequence[str] | None, cancel: threading.Event) -> Transfer:
        transfer = Transfer()
        stored = _Indexing(self, uuid.uuid4().hex)
        base = [self.base, "studies", series.study_uid, "series", series.series_uid]
        try:
            if not sops:
                wanted = set(series.sops) if series.sops else None
                self._get(self.client.url(*base[1:], base=base[0]), series, wanted, cancel, transfer, stored)
            else:
                for sop in sops:
                    if cancel.is_set():
                        transfer.error = "cancelled"
                        break
                    try:
                        self._get(self.client.url(*base[1:], "instances", sop, base=base[0]), series, {sop},
                                  cancel, transfer, stored)
                    except WebError as exc:
                        if exc.status is None or exc.status < 400 or exc.status >= 500 or exc.status == 429:
                            raise  # the node is in trouble: the other instances would fail the same way
                        transfer.failed += 1
                        transfer.failed_uids.append(sop)
                        transfer.error = transfer.error or f"instance {sop}: {exc}"
        except SlotTimeout as exc:
            transfer.error = str(exc)
        except WebError as exc:
            transfer.error = "cancelled" if cancel.is_set() else str(exc)
        if transfer.notes and not transfer.error:
            refused = [n.split(": ", 1)[1] for n in transfer.notes if n.startswith("a part")]
            if refused:
                transfer.error = f"{len(refused)} part(s) not stored; first: {refused[0]}"
        transfer.stored = stored.finish()
        return transfer


# -- WADO-URI ------------------------------------------------------------------------------------------------
class WadoUriDownloader(_Store):
    """WADO-URI the instances of a series, one request each, ``node.max_associations`` at a time.

    Parameters
    ----------
    client, ctx, node, slots, rate
        As :class:`WadoRsDownloader`.
    instances : callable
        ``instances(series) -> [SOP Instance UID]`` (the searcher's): WADO-URI names every instance.
    url : str
        The WADO-URI endpoint (Orthanc: ``http://host:8042/wado``; default: the client's ``base_url``).
    parallel : int
        Requests at once (default: the node's ``max_associations``).
    """

    def __init__(self, client: WebClient, ctx: Context, node: Any, instances: Callable[[SeriesRef], Sequence[str]],
                 slots: NodeSlots | None = None, rate: RateLimiter | None = None, url: str = "",
                 parallel: int | None = None) -> None:
        super().__init__(client, ctx, node, slots, rate)
        self.instances = instances
        self.url = url or client.base_url
        self.parallel = max(1, parallel or int(getattr(node, "max_associations", 1) or 1))

    def _one(self, series: SeriesRef, sop: str, cancel: threading.Event) -> tuple[str, str]:
        self._rate(cancel)
        params = {"requestType": "WADO", "studyUID": series.study_uid, "seriesUID": series.series_uid,
                  "objectUID": sop, "contentType": "application/dicom", "transferSyntax": "*"}
        # the query is written here, not by requests: it would send contentType=application%2Fdicom, which
        # Orthanc (1.12's plugin) does not decode and refuses; '/' and '*' are legal in a query (RFC 3986)
        query = "&".join(f"{k}={quote(v, safe='/*')}" for k, v in params.items())
        sep = "&" if "?" in self.url else "?"
        part = self.client.get_to_file(f"{self.url}{sep}{query}", "application/dicom", self.folder)
        return self._keep(part, series, {sop}, f"WADO-URI {sop}")

    def fetch(self, series: SeriesRef, sops: Sequence[str] | None, cancel: threading.Event) -> Transfer:
        transfer = Transfer()
        stored = _Indexing(self, uuid.uuid4().hex)
        if not sops:
            try:
                sops = list(series.sops) if series.sops else list(self.instances(series))
            except Exception as exc:  # the searcher's own errors (DimseError, WebError ...)
                transfer.error = f"cannot list the instances of series {series.series_uid}: {exc}"
                return transfer
        work: queue.SimpleQueue[str] = queue.SimpleQueue()
        for sop in sops:
            work.put(sop)
        lock = threading.Lock()
        errors: list[str] = []
        stop = threading.Event()  # the node is in trouble: no more requests

        def worker() -> None:
            try:
                with _slot(self.slots, cancel):
                    while not cancel.is_set() and not stop.is_set():
                        try:
                            sop = work.get_nowait()
                        except queue.Empty:
                            return
                        try:
                            got = self._one(series, sop, cancel)
                        except _Rejected as exc:
                            with lock:
                                transfer.failed += 1
                                transfer.failed_uids.append(sop)
                                errors.append(f"instance {sop}: {exc.reason}")
                            continue
                        except WebError as exc:
                            with lock:
                                transfer.failed += 1
                                transfer.failed_uids.append(sop)
                                errors.append("cancelled" if cancel.is_set() else f"instance {sop}: {exc}")
                            if exc.status is None or exc.status >= 500 or exc.status == 429:
                                stop.set()  # retried already by the client: the others would wait the same
                            continue
                        except (StorageError, OSError) as exc:
                            with lock:
                                transfer.failed += 1
                                transfer.failed_uids.append(sop)
                                errors.append(f"instance {sop}: not stored: {exc}")
                            continue
                        with lock:
                            stored.append(got)
                            transfer.completed += 1
            except SlotTimeout as exc:
                with lock:
                    errors.append(str(exc))

        count = min(self.parallel, len(sops)) or 1
        threads = [threading.Thread(target=worker, name=f"wado-uri-{self.name}-{i}", daemon=True)
                   for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if cancel.is_set():
            transfer.error = "cancelled"
        elif errors:
            left = work.qsize()
            more = f"; {left} not asked" if left else ""
            transfer.error = f"{len(errors)} instance(s) not retrieved{more}; first: {errors[0]}"
        transfer.stored = stored.finish()
        return transfer
