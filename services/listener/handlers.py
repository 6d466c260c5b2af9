"""C-STORE / C-ECHO handlers and the per-association bookkeeping.

The hot path never decodes the data set: what the peer sends is kept in memory,
or for a large instance written to a temporary file inside the storage's
``.incoming`` folder as it arrives (spool.py);
:func:`~pacsbridge.shared.index.records.read_header` reads the few attributes the file
name needs (and checks the file is complete), the file is written (or the
spooled one fsynced) and linked into place, its line written to the arrival journal
(shared/index/journal.py) and fsynced, and only then is success (0x0000)
returned. The path is then queued for indexing.
"""

from __future__ import annotations

import importlib
import logging
import mmap
import os
import threading
import time
import uuid
from typing import Any, Callable

from prometheus_client import Counter
from pydicom.datadict import tag_for_keyword

from pacsbridge.shared.core.errors import InvalidDataset, StorageError
from pacsbridge.shared.dicom.filemeta import encoded_instance
from pacsbridge.shared.index.disk import DiskLow
from pacsbridge.shared.index.records import read_header
from pacsbridge.shared.index.storage import Storage

from .peers import Peers
from .queue import Batcher
from .spool import Spool, install as install_spool
from pacsbridge.shared.dicom.compat.acceptor import reject
from pacsbridge.shared.dicom.compat.reactor import install as install_reactor, quiet, tune
from pacsbridge.shared.dicom.compat.reads import bounded_reads

__all__ = ["StoreHandlers", "SUCCESS", "OUT_OF_RESOURCES", "CANNOT_UNDERSTAND", "PROCESSING_FAILURE"]

log = logging.getLogger(__name__)

SUCCESS = 0x0000
#: Refused: out of resources (storage full or unwritable)
OUT_OF_RESOURCES = 0xA700
#: Error: cannot understand (not a usable data set)
CANNOT_UNDERSTAND = 0xC210
#: Error: processing failure (anything else)
PROCESSING_FAILURE = 0x0110

INSTANCES = Counter("pacsbridge_listener_instances", "C-STORE requests by result", ["status"])
BYTES = Counter("pacsbridge_listener_bytes", "Bytes stored by the listener")
ASSOCIATIONS = Counter("pacsbridge_listener_associations", "Associations by outcome", ["outcome"])

#: A callback run after each stored instance: ``fn(relpath, header, calling_ae)``.
AfterStore = Callable[[str, Any, str], None]


def load_callback(spec: str) -> AfterStore | None:
    """``module:function`` from ``PACSBRIDGE_AFTER_STORE`` (None when empty)."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"PACSBRIDGE_AFTER_STORE={spec!r}: expected module:function")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def tune_association(assoc: Any) -> None:
    """Per-association tuning of a receiver (the no-op SCP of bench/ gets the same):
    shorter polling and TCP_NODELAY, no standard logging handlers (unless pynetdicom logs at
    INFO), then waiting instead of polling (see shared/dicom/compat/reactor.py). Every read of a PDU has a deadline
    (the network timeout), whether the waiting reactor is installed or not: a peer that stops
    in the middle of a PDU is dropped."""
    tune(assoc)
    quiet(assoc)
    if not install_reactor(assoc):
        bounded_reads(assoc)


def _same_instance(event: Any, header: Any, display: str) -> None:
    """Refuse a C-STORE whose command names another SOP Instance than its data set: the stored
    file's meta (built from the command) would contradict its data set."""
    sent = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "").strip(" \x00")
    if sent != header.sop_instance_uid:
        raise InvalidDataset(display, f"the command's AffectedSOPInstanceUID {sent!r} is not the data set's "
                                      f"SOPInstanceUID {header.sop_instance_uid!r}")


def _refusal(status: int, reason: str) -> Any:
    """A status with its reason as ErrorComment (LO: 64 characters at most)."""
    from pydicom import Dataset

    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = reason.encode("ascii", "replace").decode()[:64]
    return ds


class StoreHandlers:
    """Handlers bound to one storage, one queue and one peer list."""

    def __init__(self, storage: Storage, batcher: Batcher | None, peers: Peers,
                 after_store: AfterStore | None = None, spool_above: int = 16 << 20) -> None:
        self.storage = storage
        self.spool_above = spool_above
        self.batcher = batcher
        self.peers = peers
        self.after_store = after_store
        self.tags = {t for t in (tag_for_keyword(k) for k in storage.template.keywords()) if t}
        self._stats: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._disk_logged = -60.0

    # -- association events ------------------------------------------------
    def on_conn_open(self, event: Any) -> None:
        tune_association(event.assoc)
        install_spool(event.assoc, self.spool_above, self.storage.temp_file)

    def on_requested(self, event: Any) -> None:
        """Reject (A-ASSOCIATE-RJ, calling AE not recognised) a calling AE that is not allowed from
        this address, before anything is accepted. It was aborted from EVT_ACCEPTED, where
        pynetdicom only queues the abort: a C-STORE sent as soon as the A-ASSOCIATE-AC arrived was
        sometimes stored first. Same steps as pynetdicom's own rejections (reject, then kill)."""
        assoc = event.assoc
        ae = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "").strip()
        address = assoc.requestor.address
        if self.peers.allows(ae, address):
            return
        log.warning("association refused: calling AE %r from %s is not an allowed peer", ae, address)
        ASSOCIATIONS.labels("refused").inc()
        reject(assoc, 0x01, 0x01, 0x03)
        assoc.kill()

    def on_accepted(self, event: Any) -> None:
        assoc = event.assoc
        ae = assoc.requestor.ae_title.strip()
        address = assoc.requestor.address
        with self._lock:
            self._stats[id(assoc)] = {"ae": ae, "address": address, "start": time.monotonic(), "instances": 0,
                                      "bytes": 0, "failures": 0, "id": uuid.uuid4().hex}

    def on_rejected(self, event: Any) -> None:
        rq = event.assoc.requestor
        ASSOCIATIONS.labels("rejected").inc()
        log.warning("association rejected: calling AE %r from %s (called %r)", rq.ae_title, rq.address,
                    getattr(rq.primitive, "called_ae_title", "?") if rq.primitive else "?")

    def on_closed(self, event: Any, outcome: str) -> None:
        if self.batcher is not None:
            self.batcher.flush()  # the transfer is over: index its last instances now
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        ASSOCIATIONS.labels(outcome).inc()
        seconds = time.monotonic() - stats["start"]
        log.info("association %s: peer %s@%s, %d instances, %d bytes, %.2f s, %d failures", outcome, stats["ae"],
                 stats["address"], stats["instances"], stats["bytes"], seconds, stats["failures"])

    def _count(self, event: Any, size: int, failed: bool) -> str:
        """Add one instance to its association's figures; returns the association id."""
        with self._lock:
            stats = self._stats.get(id(event.assoc))
            if stats is None:
                return ""
            stats["instances"] += 1
            stats["bytes"] += size
            stats["failures"] += int(failed)
            return str(stats["id"])

    # -- DIMSE ---------------------------------------------------------------
    def handle_echo(self, event: Any) -> int:
        return SUCCESS

    def handle_store(self, event: Any) -> Any:
        """Store one instance durably, then answer. Never raises.

        A refusal of the data set (0xC210) carries the reason as its ErrorComment."""
        stream = getattr(event.request, "DataSet", None)
        spool = stream if isinstance(stream, Spool) and stream.spilled else None
        display = f"C-STORE {event.request.AffectedSOPInstanceUID} from {event.assoc.requestor.ae_title.strip()}"
        size = 0
        try:
            if spool is None:  # in memory (up to PACSBRIDGE_SPOOL_ABOVE): write the bytes ourselves
                data = encoded_instance(event)
                size = len(data)
                header = read_header(data, display, self.tags)
                _same_instance(event, header, display)
                result = self.storage.store(data, header)
            else:  # written to .incoming while it arrived (spool.py)
                if spool.error is not None:
                    raise StorageError(f"cannot spool {display}: {spool.error.strerror or spool.error}")
                path = spool.finish()
                with open(path, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                        header = read_header(mm, display, self.tags)
                    _same_instance(event, header, display)
                    self.storage.settle(fh.fileno())
                rel = self.storage.path_for(header)
                result = self.storage.link_into_place(path, rel, size, header.sop_instance_uid)
        except InvalidDataset as exc:
            log.warning("refused %s: %s", display, exc.reason)
            INSTANCES.labels("invalid").inc()
            self._count(event, size, True)
            return _refusal(CANNOT_UNDERSTAND, exc.reason)
        except DiskLow as exc:  # before the disk is full (PACSBRIDGE_DISK_MIN_FREE): said once a minute
            INSTANCES.labels("disk_low").inc()
            self._count(event, size, True)
            self._disk_low(str(exc))
            return _refusal(OUT_OF_RESOURCES, "storage below its free-space watermark")
        except (StorageError, OSError) as exc:
            log.error("cannot store %s: %s", display, exc)
            INSTANCES.labels("storage_error").inc()
            self._count(event, size, True)
            return OUT_OF_RESOURCES
        except Exception:
            log.exception("failed %s", display)
            INSTANCES.labels("error").inc()
            self._count(event, size, True)
            return PROCESSING_FAILURE
        finally:
            if spool is not None:
                spool.discard()  # refused or failed (once linked into place, its name is gone already)
        INSTANCES.labels(result.action).inc()
        BYTES.inc(size)
        assoc_id = self._count(event, size, False)
        if result.action != "duplicate" and self.batcher is not None:
            self.batcher.add((result.relpath, event.assoc.requestor.ae_title.strip(), assoc_id, time.time()))
        if self.after_store is not None:
            try:
                self.after_store(result.relpath, header, event.assoc.requestor.ae_title.strip())
            except Exception:
                log.exception("after-store callback failed for %s", result.relpath)
        return SUCCESS

    def _disk_low(self, message: str) -> None:
        """Log a refusal for lack of space once a minute, not once per instance of a study."""
        now = time.monotonic()
        if now - self._disk_logged >= 60.0:
            self._disk_logged = now
            log.error("refusing C-STORE (0xA700): %s", message)

    def handlers(self) -> list[tuple[Any, ...]]:
        from pynetdicom import evt

        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_CONN_OPEN, self.on_conn_open),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_closed, ["released"]),
            (evt.EVT_ABORTED, self.on_closed, ["aborted"]),
        ]
