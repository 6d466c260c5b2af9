"""Throwaway servers: the tests' own Redis (each stack's broker) and, for fault tests, PostgreSQL.

Stopping or emptying them leaves the machine's own services, which other test runs share, alone.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from .orthanc import free_port


class ThrowawayRedis:
    """``redis-server`` on a free port, nothing saved to disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).returncode == 0:
                atexit.register(self.stop)  # a test that never reaches its stop() leaves no server behind
                return
            time.sleep(0.05)
        raise TimeoutError("redis did not start")

    def __enter__(self) -> "ThrowawayRedis":
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
        atexit.unregister(self.stop)


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"PostgreSQL's {name} (Debian package postgresql)")
    return found[-1]


class ThrowawayPostgres:
    """A PostgreSQL cluster made with ``initdb`` in a temporary folder, on a free port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "pgdata"
        self.port = free_port()
        self.user = "postgres"
        folder.mkdir(parents=True, exist_ok=True)
        self._demote = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the postgres account
            pw = pwd.getpwnam("postgres")
            os.chown(folder, pw.pw_uid, pw.pw_gid)

            def demote() -> None:
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)

            self._demote = demote
        subprocess.run([_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, preexec_fn=self._demote)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run([_pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.folder / "log"), "-o",
                        f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, preexec_fn=self._demote)

    def stop(self) -> None:
        subprocess.run([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"], capture_output=True,
                       preexec_fn=self._demote)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class HalfAssociatePeer:
    """A DICOM node that answers half an A-ASSOCIATE-AC, then holds the connection (a hostile or hung peer).

    A real TCP server thread: it reads each A-ASSOCIATE-RQ, sends the 6-byte PDU header of an
    A-ASSOCIATE-AC announcing ``length`` bytes and only the first ``sent`` of them (the protocol
    version and the called AE title it was asked for), and then sends nothing, keeping the socket
    open until :meth:`close`. ``connections`` counts the associations it was asked for.
    """

    def __init__(self, length: int = 190, sent: int = 12) -> None:
        import socket
        import threading

        self.length, self.sent = length, sent
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = int(self.server.getsockname()[1])
        self.held: list = []
        self.connections = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="half-associate-peer", daemon=True)
        self.thread.start()

    def _read(self, conn, n: int) -> bytes:  # type: ignore[no-untyped-def]
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                break
            out += chunk
        return out

    def _serve(self) -> None:
        import struct

        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.held.append(conn)
            conn.settimeout(5)
            try:
                head = self._read(conn, 6)
                if len(head) < 6 or head[0] != 0x01:  # not an A-ASSOCIATE-RQ
                    continue
                body = self._read(conn, struct.unpack(">I", head[2:6])[0])
            except OSError:
                continue
            self.connections += 1
            called = body[4:20]  # as asked: protocol version 1, reserved, called AE title
            ac_start = struct.pack(">BBI", 0x02, 0x00, self.length) + struct.pack(">HH", 1, 0) + called
            try:
                conn.sendall(ac_start[:6 + self.sent])
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.server.close()

    def __enter__(self) -> "HalfAssociatePeer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FullBacklog:
    """A listening socket whose accept queue is full and never served: a connect to it times out.

    Linux drops the SYNs of a listener whose backlog is full, so a client's connect waits for its
    own timeout, as with a firewalled or dead host.
    """

    def __init__(self) -> None:
        import socket

        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(0)
        self.port = int(self.server.getsockname()[1])
        self.fillers = []
        for _ in range(4):  # fill the queue (backlog 0 still admits one or two)
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(s)
        time.sleep(0.2)

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.server.close()
