"""``pacsbridge listener``: the C-STORE SCP.

Several receiver processes share one listening socket, so throughput grows
with cores (associations of one process share its GIL, so a busy receiver lets
a less busy one accept a new connection first). The parent
process supervises them (restarting one that dies) and runs the
reconciler, which enqueues stored-but-unindexed files at start and then
every ``PACSBRIDGE_RECONCILE_SECONDS``, reading the receivers' arrival
journal (shared/index/journal.py), never the whole storage once it has a
journal checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import socket
import socketserver
import sys
import tempfile
import threading
import time
from typing import Any

from pacsbridge.shared.core.config import Settings
from pacsbridge.shared.core.errors import ConfigError
from pacsbridge.shared.dicom.compat import receive_in_memory
from pacsbridge.shared.dicom.compat.acceptor import handler_class
from pacsbridge.shared.index.storage import Storage

from .peers import ANY_AE, parse_peers
from .queue import Batcher
from .slots import PeerSlots

log = logging.getLogger(__name__)

#: Longest a receiver leaves a new connection to a less busy receiver before it accepts it itself
#: (that one may be slow to wake on a loaded machine); it looks again every millisecond.
ACCEPT_DEFER = 0.2


def make_ae(settings: Settings, peers: Any) -> Any:
    """The pynetdicom AE: every storage SOP class in every transfer syntax, plus Verification."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
    from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                             ImplicitVRLittleEndian)

    # Received data sets are kept in memory up to PACSBRIDGE_SPOOL_ABOVE bytes, then written to
    # .incoming as they arrive (spool.py, installed per association by the handlers); a full or
    # read-only disk is 0xA700 either way. pynetdicom's own chunked mode stays off: a full disk
    # broke its write inside the reader and aborted the association.
    receive_in_memory()
    ae = AE(ae_title=settings.ae_title)
    # pynetdicom accepts the first of *our* syntaxes the sender offers: compressed ones first,
    # so a sender offering a file's own syntax next to an uncompressed one sends it as it is
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                    ExplicitVRBigEndian]
    syntaxes = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in uncompressed] + uncompressed
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, syntaxes)  # type: ignore[arg-type]
    ae.add_supported_context(Verification, uncompressed)
    # 0 = unlimited; a PDU larger than announced closes the connection (compat.reads.largest_pdu)
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout  # the listener's (our client's: scu_dimse_timeout)
    ae.network_timeout = settings.network_timeout
    ae.require_called_aet = settings.require_called_ae
    ae.require_calling_aet = peers.calling_aets()
    return ae


def server_class(initial_peers: Any, shared: socket.socket | None, slots: PeerSlots | None = None) -> Any:
    from pynetdicom.transport import ThreadedAssociationServer

    # pynetdicom's handler, with the connection's slot given back when its association thread ends,
    # whatever the way (release, abort, timeout, error)
    Handler = handler_class(slots.release if slots is not None else None)

    class Server(ThreadedAssociationServer):
        """Accepts on a listening socket shared by all receiver processes; refuses unknown addresses,
        and addresses that already hold their share of connections (``slots``).

        ``peers`` is replaced when the nodes table changes (see :func:`_refresh_peers`).

        Every receiver waits in select() on the socket and all of them wake for a new
        connection; the first to call accept() gets it (SO_REUSEPORT would hash them instead,
        and 4 connections often land 3 + 1 + 0 + 0). A receiver that serves more connections
        than another one leaves it the connection (up to :data:`ACCEPT_DEFER`): when every
        receiver raced alike, the 4 associations of a 4-association send often landed two in one
        process, sharing its GIL, while another process sat idle.
        """

        peers: Any = initial_peers
        _last_warning: dict[str, float] = {}

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["request_handler"] = Handler
            super().__init__(*args, **kwargs)

        def server_bind(self) -> None:
            if shared is not None:
                self.socket.close()  # type: ignore[union-attr]
                self.socket = shared
                self.server_address = shared.getsockname()
                return
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # type: ignore[union-attr]
            super().server_bind()

        def server_activate(self) -> None:
            if shared is None:
                super().server_activate()

        def _handle_request_noblock(self) -> None:
            if slots is not None and slots.others_less_busy():
                deadline = time.monotonic() + ACCEPT_DEFER
                while time.monotonic() < deadline:
                    time.sleep(0.001)
                    if not select.select([self.socket], [], [], 0)[0]:  # type: ignore[type-var]
                        return  # a less busy receiver took it
                    if not slots.others_less_busy():
                        break
            super()._handle_request_noblock()  # type: ignore[misc]  # accept(): EAGAIN if another took it

        def verify_request(self, request: Any, client_address: Any) -> bool:
            address = client_address[0]
            if not self.peers.address_known(address):
                log.warning("connection refused: %s is not the address of an allowed peer", address)
                return False
            held = slots.acquire(address) if slots is not None else 0
            if held:
                now = time.monotonic()
                if now - self._last_warning.get(address, -60.0) >= 10:  # one line per address per 10 s
                    self._last_warning[address] = now
                    log.warning("connection refused: %s already holds %d connections "
                                "(PACSBRIDGE_MAX_ASSOCIATIONS_PER_PEER=%d)", address, held,
                                slots.limit if slots is not None else 0)
                return False
            return True

        def process_request(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request(request, client_address)  # starts the connection's thread
            except BaseException:
                if slots is not None:
                    slots.release(client_address[0])
                raise

    return Server


def listening_socket(host: str, port: int, backlog: int = 64) -> socket.socket:
    """The one listening socket the receiver processes share (non-blocking accept)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)  # the processes that lose the race for a connection go back to select()
    return sock


def make_sender(settings: Settings) -> Any:
    from pacsbridge.shared.core.celeryapp import INDEX_TASK, make_celery

    app = make_celery(settings)
    # Import the broker's transport and build the producer pool now, not in the first batch: in a
    # fresh receiver that took ~0.1 s of CPU (kombu and redis-py imports) while the first transfer
    # ran. Nothing connects yet, so a broker that is down does not delay the start.
    _ = app.amqp.producer_pool
    _ = app.backend

    def send(items: list[Any]) -> None:
        """Items are relative paths, or ``(path, calling_ae, association_id, arrived_at)``."""
        paths = [i if isinstance(i, str) else i[0] for i in items]
        arrivals = [None if isinstance(i, str) else list(i[1:]) for i in items]
        args = [paths, arrivals] if any(arrivals) else [paths]
        app.send_task(INDEX_TASK, args=args, queue="pacsbridge", retry=False)

    return send


def spool_above(settings: Settings) -> int:
    """Bytes of a received data set kept in memory before it goes to ``.incoming``
    (``PACSBRIDGE_SPOOL_ABOVE``; ``PACSBRIDGE_CHUNKED=1``: none, every data set goes to a file)."""
    return 0 if settings.chunked else settings.spool_above


def serve_process(settings: Settings, peers: Any, shared: socket.socket | None = None,
                  slots: PeerSlots | None = None) -> None:
    """One receiver: serve until SIGTERM, then flush the queue."""
    from pacsbridge.shared.core.memtune import tune_malloc

    from .handlers import StoreHandlers, load_callback

    tune_malloc()

    storage = Storage.for_settings(settings)
    storage.ensure()
    storage.enable_journal()  # what the batcher loses (broker down, a crash) the reconciler finds there
    batcher = Batcher(make_sender(settings), max_batch=settings.enqueue_batch, interval=settings.enqueue_interval)
    handlers = StoreHandlers(storage, batcher, peers, load_callback(settings.after_store),
                             spool_above=spool_above(settings))
    ae = make_ae(settings, peers)
    server = ae.make_server((settings.listener_host, settings.listener_port), evt_handlers=handlers.handlers(),
                            server_class=server_class(peers, shared, slots))

    def shutdown(*_: Any) -> None:
        # socketserver's own shutdown: pynetdicom's also unregisters the server from the AE,
        # which make_server() never registered
        threading.Thread(target=socketserver.BaseServer.shutdown, args=(server,), daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    stop = threading.Event()
    threading.Thread(target=_refresh_peers, args=(settings, peers, (handlers, server, ae), stop),
                     name="peers", daemon=True).start()
    if slots is not None:
        slots.mark_serving()
    try:
        server.serve_forever()
    finally:
        stop.set()
        server.server_close()
        batcher.close()
        if storage.journal is not None:
            storage.journal.close()


def _refresh_peers(settings: Settings, static: Any, holders: tuple[Any, Any, Any], stop: threading.Event) -> None:
    """Allow the configured nodes too, re-reading them every ``settings.peers_refresh_seconds``.

    A database outage keeps the last known list (and the static one from the start).
    """
    from pacsbridge.shared.core.db import make_engine
    from pacsbridge.shared.jobs.store import JobStore

    from .peers import with_nodes

    handlers, server, ae = holders
    engine = make_engine(settings.database_url)
    current = None
    try:
        while True:
            try:
                # a research node (identifiable false) is no peer: what a platform sends back comes home
                # through POST /projects/{name}/results (checked, re-identified, audited), never by C-STORE
                nodes = [(n.ae_title, n.host) for n in JobStore(engine).list_nodes() if n.identifiable]
            except Exception as exc:  # tables not created yet, or database down
                log.debug("peers: nodes not read (%s)", exc)
                nodes = None
            if nodes is not None:
                merged = with_nodes(static, nodes)
                if merged != current:
                    current = merged
                    handlers.peers = server.peers = merged
                    ae.require_calling_aet = merged.calling_aets()
            if stop.wait(settings.peers_refresh_seconds):
                return
    finally:
        engine.dispose()


def reconcile_once(settings: Settings, min_age: float = 30.0) -> int:
    """Enqueue stored instances that are not indexed (older than ``min_age`` seconds). Returns how many.

    Reads the arrival journal since the last pass (shared/index/journal.py): its cost follows what
    arrived since, not what storage holds. A storage without a journal checkpoint (made before the
    journal, or a new one) is walked whole once, and the walk recorded; ``pacsbridge rebuild
    --missing`` is the full walk on request. One pass at a time per storage root.
    """
    from pacsbridge.shared.index.context import open_context
    from pacsbridge.shared.index.journal import Checkpoint, PassLock, clean_leftovers, lost_tails

    ctx = open_context(settings)
    try:
        ctx.index.create()
        root = ctx.storage.root
        with PassLock(root) as held:
            if not held:
                log.info("reconciler: another pass runs on %s; skipped", root)
                return 0
            checkpoint = Checkpoint(root, ctx.storage.fsync).load()
            queued: list[str] = []
            if checkpoint.walked_at is None:
                started = time.time()
                queued = _walk_once(ctx, settings, min_age)
                checkpoint.walked_at = started
                checkpoint.save()
                log.info("reconciler: storage walked once (it had no journal checkpoint); from now on only the "
                         "arrival journal is read (pacsbridge rebuild --missing walks it on request)")
            lost = lost_tails(root, checkpoint.recovered)
            if lost:
                _walk_changed(ctx, lost)
                checkpoint.recovered |= set(lost)
                checkpoint.save()
            queued += _journal_pass(ctx, settings, checkpoint, min_age, set(queued))
            clean_leftovers(root)
        ctx.storage.clean_incoming(older_than=3600)
        return len(queued)
    finally:
        ctx.index.engine.dispose()


def _send_all(settings: Settings, paths: list[str]) -> None:
    if paths:
        send = make_sender(settings)
        for i in range(0, len(paths), 100):
            send(paths[i:i + 100])
        log.warning("reconciler: %d stored instances were not indexed; queued them", len(paths))


def _walk_once(ctx: Any, settings: Settings, min_age: float) -> list[str]:
    """The whole storage against the index, once: the walk streams (a folder at a time) and each 1,000
    paths are looked up together, so memory follows what is missing, not the archive; the time
    follows the archive (once)."""
    from pacsbridge.shared.index.quarantine import Quarantine

    quarantine = Quarantine(ctx.index.engine)
    now = time.time()
    missing: list[str] = []

    def check(chunk: list[str]) -> None:
        # what indexing set aside (the database refused it) is recorded, not lost: queuing it
        # again would fail again, for ever (``rebuild`` or an admin's ``retry`` tries it again)
        known = ctx.index.object_files_among(chunk) | quarantine.among(chunk)
        for rel in chunk:
            if rel in known:
                continue
            try:
                if now - os.path.getmtime(ctx.storage.root / rel) < min_age:
                    continue
            except OSError:
                continue
            missing.append(rel)

    chunk: list[str] = []
    for rel in ctx.storage.iter_files():
        chunk.append(rel)
        if len(chunk) >= 1000:
            check(chunk)
            chunk = []
    if chunk:
        check(chunk)
    _send_all(settings, missing)
    return missing


def _walk_changed(ctx: Any, lost: list[str]) -> int:
    """After an operating-system crash (journal.lost_tails): what was linked into storage since the
    oldest of ``lost`` was made and is neither indexed nor set aside gets a journal line again (a
    segment of the reconciler's own, closed at once), so the journal pass that follows queues it, and
    queues it again until it is indexed, as any other line. Every folder is listed; only what changed
    since is stat'ed and looked up. Returns how many lines were written."""
    import mmap

    from pacsbridge.shared.core.errors import InvalidDataset
    from pacsbridge.shared.index.journal import JournalWriter, born
    from pacsbridge.shared.index.quarantine import Quarantine
    from pacsbridge.shared.index.records import read_header

    since = min(born(name) for name in lost) - 2.0  # file systems with coarse timestamps
    log.warning("reconciler: journal segment(s) %s were not closed before the kernel that wrote them stopped; "
                "their last lines may be lost: walking what changed in storage since %s", ", ".join(lost),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)))
    changed = ctx.storage.walk_changed(since)
    known = ctx.index.object_files_among(changed) | Quarantine(ctx.index.engine).among(changed)
    writer = JournalWriter(ctx.storage.root, durable=ctx.storage.fsync)
    n = 0
    try:
        for rel in changed:
            if rel in known:
                continue
            sop = ""
            try:
                with open(ctx.storage.absolute(rel), "rb") as fh, \
                        mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    sop = read_header(mm, rel, set()).sop_instance_uid
            except (OSError, ValueError, InvalidDataset):
                pass  # the indexer records what it cannot read (quarantine), which settles the line
            writer.record(rel, sop)
            n += 1
    finally:
        writer.close()
    return n


def _journal_pass(ctx: Any, settings: Settings, checkpoint: Any, min_age: float, already: set[str]) -> list[str]:
    """Settle the journal's new lines and queue the instances they name that are neither indexed nor
    set aside (older than ``min_age``); delete segments read to the end that no writer holds.

    A line is settled when its SOP Instance UID is indexed, its path has a quarantine entry, or its
    file is not there ``min_age`` after the line (the store was not completed: nothing was
    acknowledged). The checkpoint of a segment moves past settled lines only: the first pending
    line (queued, or too young) and those after it are read again at the next pass.
    """
    from pacsbridge.shared.index import journal
    from pacsbridge.shared.index.journal import pending_chunks, segments
    from pacsbridge.shared.index.quarantine import Quarantine

    root = ctx.storage.root
    missing: list[str] = []
    # segments this pass does not reach (a backlog over MAX_LINES) keep their offsets; gone ones drop out
    offsets = {name: checkpoint.offsets[name] for name in segments(root) if name in checkpoint.offsets}
    dropped = 0
    quarantine = Quarantine(ctx.index.engine)
    # a chunk of lines at a time (journal.CHUNK_LINES), each let go before the next is read: the pass's
    # memory follows the chunk, not the lines a period wrote
    for found in pending_chunks(root, checkpoint, journal.MAX_LINES, journal.CHUNK_LINES):
        queued, gone = _settle_chunk(ctx, found, offsets, quarantine, min_age, already)
        dropped += gone
        _send_all(settings, queued)
        missing += queued
    if dropped:
        log.info("reconciler: %d journal lines name a file that is not there (a store cut short, or an "
                 "instance moved aside or deleted since); dropped", dropped)
    recovered = checkpoint.recovered & set(segments(root))
    if offsets != checkpoint.offsets or recovered != checkpoint.recovered:
        checkpoint.offsets, checkpoint.recovered = offsets, recovered
        checkpoint.save()
    return missing


def _settle_chunk(ctx: Any, found: dict[str, tuple[list[Any], int]], offsets: dict[str, int], quarantine: Any,
                  min_age: float, already: set[str]) -> tuple[list[str], int]:
    """One chunk of :func:`_journal_pass`: the instances to queue, and how many lines named a file that
    is not there; moves ``offsets`` past the settled lines of each segment in ``found`` and deletes the
    segments read to their end that no writer holds."""
    from pacsbridge.shared.core.errors import UnsafePath
    from pacsbridge.shared.index.journal import JOURNAL, read_segment, unheld

    root = ctx.storage.root
    entries = [e for lines, _ in found.values() for e in lines]
    settled: set[tuple[str, int]] = set()
    missing: list[str] = []
    dropped = 0
    if entries:
        indexed = ctx.index.lookup_sop(sorted({e.sop for e in entries if e.sop}))
        set_aside = quarantine.among(sorted({e.relpath for e in entries if e.relpath}))
        now = time.time()
        for e in entries:
            if not e.relpath or (e.sop and e.sop in indexed) or e.relpath in set_aside:
                settled.add((e.segment, e.end))
                continue
            young = now - e.at < min_age
            try:
                there = os.path.lexists(ctx.storage.absolute(e.relpath))
            except UnsafePath:
                log.warning("journal line %r: not a path inside storage; dropped", e.relpath)
                there = young = False
            if not there:
                if not young:  # a crash between the line and the link (never acknowledged), or moved aside
                    settled.add((e.segment, e.end))
                    dropped += 1
                continue
            if not young and e.relpath not in already:
                already.add(e.relpath)
                missing.append(e.relpath)
    for name, (lines, end) in found.items():
        offset = offsets.get(name, 0)
        for e in lines:
            if (e.segment, e.end) not in settled:
                break
            offset = e.end
        else:
            offset = end  # every line settled: past what follows them too (a segment's #closed)
        if offset >= end and unheld(root, name) and not read_segment(root / JOURNAL / name, offset)[0]:
            # read to its end, and its writer is gone (rotated, stopped, killed): nothing more will come
            try:
                os.unlink(root / JOURNAL / name)
            except FileNotFoundError:
                pass
            offsets.pop(name, None)
            continue
        offsets[name] = offset
    return missing, dropped


def _reconciler(settings: Settings, stop: threading.Event, period: float, min_age: float) -> None:
    while True:
        try:
            reconcile_once(settings, min_age)
        except Exception as exc:  # database or broker down: try again next period
            log.error("reconciler: %s", exc)
        if stop.wait(period):
            return


def _start_metrics(port: int, settings: Settings) -> None:
    """Serve the counters of every receiver process on ``port`` (Prometheus multiprocess mode).

    They listen on ``PACSBRIDGE_LISTENER_METRICS_HOST``, by default the listener's own host:
    a listener bound to 127.0.0.1 keeps its metrics on 127.0.0.1 too.
    """
    host = settings.listener_metrics_host or settings.listener_host or "0.0.0.0"
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        folder = tempfile.mkdtemp(prefix="pacsbridge-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # before prometheus_client is imported anywhere
    for name in os.listdir(folder):
        if name.endswith(".db"):
            os.unlink(os.path.join(folder, name))
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)
    start_http_server(port, addr=host, registry=registry)
    log.info("metrics on %s:%d/metrics", host, port)


def _receiver(settings: Settings, level: int, own_level: int, shared: socket.socket, slots: PeerSlots,
              row: int) -> None:
    """Entry point of a spawned receiver process."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    logging.getLogger("pacsbridge").setLevel(own_level)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    serve_process(settings, parse_peers(settings.allowed_peers), shared, slots.for_process(row))


def main(settings: Settings, args: argparse.Namespace | None = None) -> int:
    """Run the listener until SIGTERM / Ctrl-C."""
    if args is not None and getattr(args, "port", None):
        settings = settings.with_(listener_port=args.port)
    os.environ.update(settings.environ())  # what the command line changed, for what this process starts
    peers = parse_peers(settings.allowed_peers)
    if peers.any_peer:
        log.warning("PACSBRIDGE_ALLOWED_PEERS=*: any calling AE may store here (fine for a first try only)")
    elif not peers.rules:
        log.warning("PACSBRIDGE_ALLOWED_PEERS is empty: every association will be rejected")
    elif ANY_AE in peers.rules:
        log.warning("PACSBRIDGE_ALLOWED_PEERS=*@%s: any calling AE title from there may store here "
                    "(fine for a first try only)", ",".join(map(str, peers.rules[ANY_AE])))
    if not settings.require_called_ae:
        log.warning("PACSBRIDGE_REQUIRE_CALLED_AE=0: any called AE title is accepted, not only %s "
                    "(fine for a first try only)", settings.ae_title)
    processes = (getattr(args, "processes", None) if args is not None else None) or \
        settings.listener_processes or 2 * (os.cpu_count() or 1)
    period = settings.reconcile_seconds
    min_age = settings.reconcile_min_age
    Storage.for_settings(settings).ensure()
    metrics_port = settings.listener_metrics_port
    if metrics_port:
        _start_metrics(metrics_port, settings)
    stop = threading.Event()
    threading.Thread(target=_reconciler, args=(settings, stop, period, min_age), daemon=True,
                     name="reconciler").start()
    log.info("listener %s on %s:%d, %d process(es), storage %s", settings.ae_title, settings.listener_host,
             settings.listener_port, processes, settings.storage)
    shared = listening_socket(settings.listener_host, settings.listener_port)
    print(f"pacsbridge listener: AE {settings.ae_title} on port {settings.listener_port}", file=sys.stderr,
          flush=True)
    per_peer = settings.max_associations_per_peer
    if processes == 1:
        serve_process(settings, peers, shared, PeerSlots(1, per_peer))
        stop.set()
        return 0
    # Receivers are *spawned* (fresh interpreters), not forked: this process already runs the
    # reconciler thread, and a fork taken while another thread holds an import lock hangs forever.
    ctx = multiprocessing.get_context("spawn")
    level = logging.getLogger().level
    own_level = logging.getLogger("pacsbridge").getEffectiveLevel()
    children: dict[int, Any] = {}
    slots = PeerSlots(processes, per_peer, ctx)

    def spawn(slot: int) -> None:
        slots.clear(slot)  # a receiver that died took its connections with it
        proc = ctx.Process(target=_receiver, args=(settings, level, own_level, shared, slots, slot),
                           name=f"receiver-{slot}", daemon=False)
        proc.start()
        children[slot] = proc

    stopping = False

    def terminate(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc in children.values():
            if proc.is_alive():
                proc.terminate()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    for slot in range(processes):
        spawn(slot)
    while children:
        sentinels = {proc.sentinel: slot for slot, proc in children.items()}
        for ready in multiprocessing.connection.wait(list(sentinels), timeout=1.0):
            slot = sentinels[ready]  # type: ignore[index]
            proc = children.pop(slot)
            proc.join()
            if not stopping:
                log.error("receiver process %d exited (code %s); starting another", proc.pid, proc.exitcode)
                time.sleep(0.5)
                spawn(slot)
    stop.set()
    return 0
