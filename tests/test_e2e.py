"""Full stack, end to end: the three services as compose starts them, a researcher over HTTP.

listener, worker and API run as separate processes with the commands of
docker-compose.yml (``pacsbridge listener``, ``pacsbridge worker``, ``pacsbridge api``)
and its environment variables, against the
machine's real PostgreSQL and a redis-server of its own. Orthanc is the hospital PACS; a second
Orthanc is the research platform's DICOM node. A retrieve job submitted over
HTTP goes C-MOVE → listener → worker → index and succeeds with the right
per-series counts; a push job then sends it to the second node, where every
instance arrives with identical pixel data.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest

from .helpers import TEST_FILES, make_instance
from .orthanc import Orthanc, free_port
from .servers import ThrowawayRedis

pytestmark = pytest.mark.slow
TOKEN = "e2e-secret-token"


class Compose:
    """The three pacsbridge services, started as docker-compose.yml starts them."""

    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.dicom_port = free_port()
        self.api_port = free_port()
        self.redis = ThrowawayRedis()  # the broker: our own, never a database of the machine's Redis
        self.redis.start()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
        self.env.update({
            # the values docker-compose.yml gives, with this machine's addresses
            "PACSBRIDGE_DATABASE_URL": database_url,
            "PACSBRIDGE_BROKER_URL": self.redis.url,
            "PACSBRIDGE_STORAGE": str(tmp_path / "data"),
            "PACSBRIDGE_EXPORT_ROOT": str(tmp_path / "export"),
            "PACSBRIDGE_IMPORT_ROOT": str(tmp_path / "import"),
            "PACSBRIDGE_AE_TITLE": "PACSBRIDGE",
            "PACSBRIDGE_ALLOWED_PEERS": "MODALITY",  # the PACS gets in as a configured node
            "PACSBRIDGE_LISTENER_HOST": "127.0.0.1",
            "PACSBRIDGE_LISTENER_PORT": str(self.dicom_port),
            "PACSBRIDGE_API_TOKENS": f"researcher:{TOKEN}:admin",
            "PACSBRIDGE_API_PORT": str(self.api_port),
            "PACSBRIDGE_PEERS_REFRESH_SECONDS": "1",
            "TCP_NODELAY": "1",
        })
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        pb = [sys.executable, "-m", "pacsbridge.cli"]
        init = subprocess.run(pb + ["init"], env=self.env, capture_output=True, text=True)  # the entrypoint's step
        assert init.returncode == 0, init.stderr
        for name, cmd in (("listener", pb + ["listener"]), ("worker", pb + ["worker"]), ("api", pb + ["api"])):
            self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=open(self.logs / f"{name}.log", "w"),
                                                stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_http()

    def _wait_http(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} exited: {self.log(name)}"
            try:
                status, body = self.call("GET", "/healthz", auth=False)
                if status == 200 and body.get("checks", body).get("listener", {"ok": True}):
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(self.log("api"))

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()[-4000:]

    def call(self, method: str, path: str, body: Any = None, auth: bool = True) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.api_port}{path}"
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {TOKEN}"
        req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_job(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.call("GET", f"/api/v1/jobs/{job_id}")
            assert status == 200, job
            if job["state"] not in ("queued", "running"):
                return job  # type: ignore[no-any-return]
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id}: {job}\n{self.log('worker')}")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.redis.stop()


def _pixels(data: bytes) -> str:
    import io

    ds = pydicom.dcmread(io.BytesIO(data))
    return hashlib.sha256(ds.PixelData).hexdigest()


def _wait_until_allowed(port: int, calling_ae: str, timeout: float = 30.0) -> None:
    """Until the listener on ``port`` accepts an association (a C-ECHO) from ``calling_ae``."""
    from pacsbridge.shared.core.errors import DimseError
    from pacsbridge.shared.dicom import dimse
    from pacsbridge.shared.dicom.node import Node

    listener = Node(name="listener", ae_title="PACSBRIDGE", host="127.0.0.1", port=port)
    deadline = time.monotonic() + timeout
    while True:
        try:
            dimse.echo(listener, calling_ae, timeout=5)
            return
        except DimseError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_retrieve_over_http_then_push_to_a_second_node(tmp_path, pg_url):
    # the hospital PACS: pydicom's CT and MR plus a generated two-series CT study, one patient each
    files = [TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm"]
    study = pydicom.uid.generate_uid()
    series = [pydicom.uid.generate_uid() for _ in range(2)]
    for i in range(24):
        files.append(tmp_path / "gen" / f"{i}.dcm")
        make_instance(files[-1], rows=64, PatientID="E2E", StudyInstanceUID=study,
                      SeriesInstanceUID=series[i % 2], InstanceNumber=i + 1)
    stack = Compose(tmp_path, pg_url)
    try:
        with Orthanc(tmp_path / "pacs", modalities={"pacsbridge": ("PACSBRIDGE", "127.0.0.1", stack.dicom_port)}) \
                as pacs, Orthanc(tmp_path / "platform", aet="PLATFORM") as platform:
            pacs.upload(files)
            assert stack.call("POST", "/api/v1/nodes", {"name": "hospital", "ae_title": "ORTHANC",
                                                        "host": "127.0.0.1", "port": pacs.dicom_port})[0] == 201
            assert stack.call("POST", "/api/v1/nodes", {"name": "platform", "ae_title": "PLATFORM",
                                                        "host": "127.0.0.1", "port": platform.dicom_port})[0] == 201
            status, echo = stack.call("POST", "/api/v1/nodes/hospital/echo")
            assert status == 200, echo
            # the listener re-reads the nodes every second here (30 s by default): the C-MOVE's sub-operations
            # come from the hospital's AE title, which it accepts once it has seen the new node
            _wait_until_allowed(stack.dicom_port, "ORTHANC")

            # one HTTP call gets the patient's study into pacsbridge
            status, sub = stack.call("POST", "/api/v1/jobs", {"kind": "retrieve", "node": "hospital",
                                                              "query": {"PatientID": "E2E"}})
            assert status == 202, sub
            job = stack.wait_job(sub["id"])
            assert job["state"] == "succeeded", (job, stack.log("worker"), stack.log("listener"))
            assert sorted((s["series_uid"], s["expected"], s["indexed"]) for s in job["series"]) == \
                sorted((uid, 12, 12) for uid in series)
            status, listing = stack.call("GET", f"/api/v1/instances?StudyInstanceUID={study}&limit=100")
            assert status == 200
            items = listing.get("items", listing) if isinstance(listing, dict) else listing
            assert len(items) == 24

            # and one more sends what it brought to the research platform's node
            status, sub = stack.call("POST", "/api/v1/jobs", {"kind": "push", "node": "platform",
                                                              "selection": {"job": job["id"]}})
            assert status == 202, sub
            pushed = stack.wait_job(sub["id"])
            assert pushed["state"] == "succeeded", pushed
            assert pushed["totals"]["pushed"] == 24
            sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files[2:]}
            assert platform.sop_uids() == set(sent)
            for oid in platform.get("/instances"):
                data = platform.request("GET", f"/instances/{oid}/file")
                sop = pydicom.dcmread(__import__("io").BytesIO(data), stop_before_pixels=True).SOPInstanceUID
                assert _pixels(data) == _pixels(Path(sent[sop]).read_bytes())
    finally:
        stack.close()
