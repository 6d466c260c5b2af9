#!/usr/bin/env python
"""A tuned pynetdicom C-STORE SCP that answers success and stores nothing.

This is the ceiling for any pynetdicom-based receiver on the machine: the
network and DIMSE work is done, the data set is never decoded, written or
even looked at.

Tuning (docs/performance.md, "pynetdicom as a C-STORE SCP"):

- ``ae.maximum_pdu_size = 0`` (unlimited): the sender uses its largest PDUs;
- every storage SOP class (``AllStoragePresentationContexts``) in every
  transfer syntax (``ALL_TRANSFER_SYNTAXES``), plus Verification for
  ``echoscu``;
- per association, what the listener does (:func:`on_conn_open`): a 0.2 ms
  DUL poll delay, TCP_NODELAY, reactors that wait instead of polling, and
  32 kB socket reads;
- glibc's malloc thresholds fixed as in the listener's receivers
  (``shared/core/memtune.py``);
- the C-STORE handler returns ``0x0000`` without touching ``event.dataset``;
- the listener's process model: as many processes as the listener starts by
  default (two per core; associations of one process share its GIL), forked
  after the parent opened the one listening socket they all accept on, with
  the listener's own server class (``pacsbridge.listener.server``), so a new
  association goes to an idle process. (``SO_REUSEPORT``, used here before,
  hashed 4 connections over the processes unevenly, 4 + 0 at times, and the
  ceiling then varied from 325 to 937 inst/s in one benchmark.)

Usage::

    python bench/noop_scp.py PORT [--aet NOOP] [--host 127.0.0.1] [--processes N] [--store DIR]

With ``--store DIR`` it is the *durable* reference instead: the same SCP, whose
handler only writes each instance durably with pacsbridge's storage code (fsync
of file and folder, cache drop), with no header read, template or queue.

The parent process prints ``noop_scp: ready ...`` on stderr once every
process serves, forwards SIGTERM / SIGINT to its children and
exits when they have all exited.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["make_ae", "serve", "main", "default_processes"]

SUCCESS = 0x0000


def default_processes() -> int:
    """The listener's default process count: two per core."""
    return 2 * (os.cpu_count() or 1)


def make_ae(aet: str) -> Any:
    """The AE: all storage contexts in all transfer syntaxes, Verification, no PDU limit."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=aet)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 64
    return ae


def on_conn_open(event: Any) -> None:
    """The listener's per-association tuning (its DUL poll delay, TCP_NODELAY, and the waiting
    reactors of ``pacsbridge.shared.dicom.compat.reactor``; ``PACSBRIDGE_REACTOR=poll`` keeps pynetdicom's
    polling, as for the listener)."""
    from pacsbridge.listener.handlers import tune_association

    tune_association(event.assoc)


def handle_store(event: Any) -> int:
    """Answer success; the data set is neither decoded nor stored."""
    return SUCCESS


def durable_handler(folder: str) -> Any:
    """A C-STORE handler that only stores: each instance as received, durably, with pacsbridge's
    storage code and settings (fsync and cache drop), under ``<SOP Instance UID>.dcm`` in one
    sub-folder. No header read, no template, no queue: the floor of a durable receiver."""
    from pacsbridge.shared.core.config import load_settings
    from pacsbridge.shared.dicom.filemeta import encoded_instance
    from pacsbridge.shared.index.storage import Storage

    storage = Storage.for_settings(load_settings().with_(storage=Path(folder), fsync=True))
    storage.ensure()

    def handle(event: Any) -> int:
        storage.store(encoded_instance(event), None, relpath=f"in/{event.request.AffectedSOPInstanceUID}.dcm")
        return SUCCESS

    return handle


def serve(shared: socket.socket, aet: str, ready_fd: int | None = None, store: str | None = None) -> None:
    """Serve on the listening socket ``shared`` in this process until SIGTERM / SIGINT (storing into
    ``store`` when given)."""
    from pynetdicom import evt

    from pacsbridge.shared.core.memtune import tune_malloc

    tune_malloc()  # as the listener's receivers do

    ae = make_ae(aet)
    from pacsbridge.listener.peers import parse_peers
    from pacsbridge.listener.server import server_class

    handler = durable_handler(store) if store else handle_store
    server = ae.make_server(shared.getsockname()[:2], evt_handlers=[(evt.EVT_C_STORE, handler),
                                                                    (evt.EVT_CONN_OPEN, on_conn_open)],
                            server_class=server_class(parse_peers("*"), shared))

    def stop() -> None:
        try:
            server.shutdown()
        except ValueError:
            # pynetdicom's shutdown() removes the server from ae._servers, where only
            # start_server() puts it, not make_server(): the loop has stopped anyway
            pass

    def shutdown(*_: Any) -> None:
        threading.Thread(target=stop, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description="pynetdicom C-STORE SCP that stores nothing (the ceiling).")
    parser.add_argument("port", type=int, help="TCP port")
    parser.add_argument("--aet", default="NOOP", help="our AE title (default: NOOP; called AE is not checked)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--processes", type=int, default=default_processes(),
                        help=f"processes accepting on the one listening socket (default: the listener's, two per "
                             f"core = {default_processes()})")
    parser.add_argument("--store", metavar="DIR",
                        help="store each instance durably into DIR (pacsbridge's storage code, fsync on) instead "
                             "of nothing: the floor of any durable pynetdicom receiver")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be >= 1")

    from pacsbridge.listener.server import listening_socket

    shared = listening_socket(args.host, args.port)
    read_fd, write_fd = os.pipe()
    children: list[int] = []
    for _ in range(args.processes):
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.close(read_fd)
                serve(shared, args.aet, write_fd, args.store)
            except BaseException as exc:  # noqa: BLE001 - report and exit non-zero
                print(f"noop_scp[{os.getpid()}]: {exc!r}", file=sys.stderr, flush=True)
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    os.close(write_fd)
    shared.close()  # the children hold it

    def forward(signum: int, _frame: Any) -> None:
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    ready = 0
    while ready < args.processes:
        chunk = os.read(read_fd, 64)
        if not chunk:  # every child closed the pipe: one failed before binding
            break
        ready += len(chunk)
    os.close(read_fd)
    if ready == args.processes:
        print(f"noop_scp: ready, {ready} processes on {args.host}:{args.port} (AE {args.aet})",
              file=sys.stderr, flush=True)
    else:
        print(f"noop_scp: only {ready} of {args.processes} processes serve {args.host}:{args.port}",
              file=sys.stderr, flush=True)
        forward(signal.SIGTERM, None)

    status = 0
    for pid in children:
        while True:
            try:
                _, st = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                st = 0
                break
        status = status or (1 if os.waitstatus_to_exitcode(st) not in (0, -signal.SIGTERM) else 0)
    return status if ready == args.processes else 1


if __name__ == "__main__":
    sys.exit(main())
