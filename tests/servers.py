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
