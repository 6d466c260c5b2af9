"""A real Orthanc (Debian's ``orthanc`` package) on free ports, as the hospital PACS in tests.

Usage::

    with Orthanc(tmp_path, modalities={"pacsbridge": ("PACSBRIDGE", "127.0.0.1", 11112)}) as pacs:
        pacs.upload(files)                # REST upload
        pacs.dicom_port, pacs.aet         # for a Node
        pacs.get("/statistics")           # REST, parsed JSON

    with Orthanc(tmp_path, dicomweb=True) as pacs:   # Debian's orthanc-dicomweb plugin loaded
        pacs.web_url                      # http://127.0.0.1:PORT/dicom-web (QIDO, WADO-RS, STOW-RS)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["Orthanc", "free_port"]

ORTHANC = "/usr/sbin/Orthanc"
#: Debian's orthanc-dicomweb (Makefile DEBS)
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connections_to(port: int) -> int:
    """Established TCP connections to ``127.0.0.1:port`` from this host, as the kernel lists them
    (``/proc/net/tcp`` and ``tcp6``): the associations a DICOM peer on that port has open, counted from
    outside the code that opens them. Only the callers' ends (remote port ``port``) count, once each."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                n += 1
    return n


class ConnectionSampler:
    """How many connections to ``port`` were open at once, sampled every ``interval`` s in a thread.

    ``peak`` is the most seen in any one sample; ``most`` the most seen in two samples in a row (the
    same count or more both times). A released association's connection can still be listed for a
    fraction of a millisecond after the next one has opened (seen with sequential C-FINDs, which cannot
    overlap): ``peak`` counts that moment, ``most`` does not; a real extra association (a C-FIND takes
    several milliseconds) is in two samples 2 ms apart."""

    def __init__(self, port: int, interval: float = 0.002) -> None:
        import threading

        self.port, self.interval = port, interval
        self.most = self.peak = self.samples = self.busy = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conn-sampler", daemon=True)

    def _run(self) -> None:
        last = 0
        while not self._stop.is_set():
            n = connections_to(self.port)
            self.peak, self.most = max(self.peak, n), max(self.most, min(n, last))
            self.samples, self.busy, last = self.samples + 1, self.busy + (n > 0), n
            self._stop.wait(self.interval)

    def __enter__(self) -> "ConnectionSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)


class Orthanc:
    """Start and stop one Orthanc with its own configuration and storage.

    ``modalities``: ``{name: (AET, host, port)}``; these peers may C-FIND,
    C-MOVE and C-GET, and are the possible C-MOVE destinations.
    ``extra_config``: more configuration keys (``{"LimitFindResults": 5}``).
    ``dicomweb``: load the DICOMweb plugin, rooted at ``/dicom-web/`` (:attr:`web_url`).
    Started again after :meth:`stop`, it keeps its ports and its storage.
    """

    def __init__(self, workdir: Path, aet: str = "ORTHANC",
                 modalities: Mapping[str, tuple[str, str, int]] | None = None,
                 extra_config: Mapping[str, Any] | None = None, dicomweb: bool = False) -> None:
        self.workdir = Path(workdir)
        self.dicomweb = dicomweb
        self.extra_config = dict(extra_config or {})
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def web_url(self) -> str:
        """The DICOMweb root (with ``dicomweb=True``)."""
        return f"{self.url}/dicom-web"

    def start(self) -> "Orthanc":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": f"test-{self.aet}", "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"), "DicomAet": self.aet,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port, "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomScuTimeout": 10, "DicomAssociationCloseDelay": 0,
            **({"Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
               if self.dicomweb else {}),
            **self.extra_config,
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config))
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.workdir / 'orthanc.log'}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        raise TimeoutError("Orthanc did not answer within 30 s")

    def stop(self, hard: bool = False) -> None:
        """Stop Orthanc (SIGTERM, or SIGKILL with ``hard``) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST ---------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type} if body is not None else {})
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
        if resp.headers.get_content_type() == "application/json":
            return json.loads(data)
        return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        return self.request("POST", path, json.dumps(payload).encode())

    def upload(self, files: Iterable[Path]) -> int:
        """Upload DICOM files through REST; returns how many Orthanc accepted."""
        n = 0
        for f in files:
            self.request("POST", "/instances", Path(f).read_bytes(), "application/dicom")
            n += 1
        return n

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def sop_uids(self) -> set[str]:
        """SOPInstanceUID of every instance Orthanc holds."""
        out = set()
        for oid in self.get("/instances"):
            out.add(self.get(f"/instances/{oid}/simplified-tags")["SOPInstanceUID"])
        return out

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register a peer at run time (REST ``PUT /modalities/name``)."""
        self.request("PUT", f"/modalities/{name}", json.dumps({"AET": aet, "Host": host, "Port": port}).encode())
