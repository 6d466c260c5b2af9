"""``pacsbridge serve`` on the embedded default, driven by DCMTK and by the command-line client.

The first-try path of the README, for real: SQLite index, kombu's SQLAlchemy
broker, the three services as processes; Orthanc is the PACS.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import TEST_FILES, make_instance
from .orthanc import Orthanc, free_port

PB = [sys.executable, "-m", "pacsbridge.cli"]


class Served:
    def __init__(self, workdir: Path, *args: str, dicom_port: int | None = None, api_port: int | None = None,
                 log: str = "serve.log", global_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.dicom_port = dicom_port or free_port()
        self.api_port = api_port or free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
        self.env.update({"PACSBRIDGE_LISTENER_PORT": str(self.dicom_port), "PACSBRIDGE_API_PORT": str(self.api_port),
                         "PACSBRIDGE_FSYNC": "0", "PACSBRIDGE_PEERS_REFRESH_SECONDS": "1", "TCP_NODELAY": "1",
                         "PACSBRIDGE_EXPORT_ROOT": str(workdir / "export")})
        self.log = workdir / log
        self.proc = subprocess.Popen(PB + [*global_args, "serve", "--workers", "1", *args], cwd=workdir, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = self.log.read_text()
            found = re.search(r"API token\s+(\S+)", text)
            if found and "Try:" in text:
                self.token = found.group(1)
                break
            assert self.proc.poll() is None, text
            time.sleep(0.3)
        else:
            _end(self.proc)
            raise TimeoutError(self.log.read_text())
        self.client_env = {**self.env, "PACSBRIDGE_API_URL": f"http://127.0.0.1:{self.api_port}",
                           "PACSBRIDGE_API_TOKEN": self.token}

    def client(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(PB + list(args), env=self.client_env, cwd=self.workdir, capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            return self.proc.wait(timeout=60)
        return self.proc.returncode


def _end(proc: subprocess.Popen) -> None:
    """Stop a serve a test left running the way a user does (Ctrl-C: it stops its services); a
    SIGKILL only if that fails (its services, in sessions of their own, would outlive it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path)
    yield s
    _end(s.proc)


def test_serve_stores_indexes_and_answers_the_client_then_stops_cleanly(served, tmp_path):
    make_instance(tmp_path / "one.dcm", PatientID="FIRST", rows=16)
    sent = subprocess.run(["storescu", "-aec", "PACSBRIDGE", "127.0.0.1", str(served.dicom_port),
                           str(tmp_path / "one.dcm")], env=served.env, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = served.client("repack", "--dest", "first", "--PatientID", "FIRST", "--follow", "--format", "json")
        if out.returncode == 0:
            break
        time.sleep(0.5)  # not indexed yet: the repack finds nothing
    assert out.returncode == 0, out.stdout + out.stderr
    copied = list((tmp_path / "export" / "first").rglob("*"))
    assert any(p.is_file() for p in copied)
    jobs = served.client("jobs", "--format", "csv")
    assert jobs.returncode == 0 and "repack,,succeeded" in jobs.stdout
    assert served.client("status", "0" * 32).returncode == 2  # unknown job: a clear refusal
    bad = served.client("jobs", "--token", "wrong")
    assert bad.returncode == 2 and "401" in bad.stderr
    assert served.stop() == 0
    # every service stopped with it: both ports are free again
    import socket

    for port in (served.dicom_port, served.api_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_client_finds_and_retrieves_from_a_real_pacs(served, tmp_path):
    files = [TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm"]
    with Orthanc(tmp_path / "orthanc",
                 modalities={"pacsbridge": ("PACSBRIDGE", "127.0.0.1", served.dicom_port)}) as pacs:
        pacs.upload(files)
        add = served.client("nodes", "add", "pacs", "--aet", "ORTHANC", "--host", "127.0.0.1",
                            "--port", str(pacs.dicom_port))
        assert add.returncode == 0, add.stderr
        assert served.client("echo", "pacs").returncode == 0
        found = served.client("find", "pacs", "--PatientID", "*", "--StudyDate", "19000101-", "--format", "csv")
        assert found.returncode == 0, found.stderr
        assert found.stdout.count("\n") == 1 + 2  # header + two studies
        got = served.client("retrieve", "pacs", "--PatientID", "*", "--StudyDate", "19000101-", "--follow",
                            "--format", "json")
        assert got.returncode == 0, got.stdout + got.stderr
        import json

        job = json.loads(got.stdout)
        assert job["state"] == "succeeded" and job["totals"]["indexed"] == 2
        status = served.client("status", job["id"], "--format", "csv")
        assert status.returncode == 0 and status.stdout.count(",done,") == 2  # one row per series
        assert served.client("cancel", job["id"]).returncode == 2  # finished: a clear refusal (409)
        with Orthanc(tmp_path / "platform", aet="PLATFORM") as platform:
            assert served.client("nodes", "add", "platform", "--aet", "PLATFORM", "--host", "127.0.0.1",
                                 "--port", str(platform.dicom_port)).returncode == 0
            pushed = served.client("push", "platform", "--job", job["id"], "--follow", "--format", "json")
            assert pushed.returncode == 0, pushed.stdout + pushed.stderr
            assert json.loads(pushed.stdout)["totals"]["pushed"] == 2
            assert platform.sop_uids() == pacs.sop_uids()
        # find --then retrieve: the same query again finds everything indexed, so nothing is pulled twice
        again = served.client("find", "pacs", "--PatientID", "*", "--StudyDate", "19000101-", "--then", "retrieve",
                              "--follow", "--format", "json")
        assert again.returncode == 0, again.stdout + again.stderr
    assert served.stop() == 0


def _indexed(workdir: Path) -> int:
    import sqlite3

    with sqlite3.connect(workdir / "conquest.db") as db:
        return int(db.execute("select count(*) from DICOMImages").fetchone()[0])


def test_a_second_serve_on_busy_ports_names_the_port_and_touches_nothing(served, tmp_path):
    assert _indexed(tmp_path) == 0
    for busy, other, name in ((served.dicom_port, "api", "PACSBRIDGE_LISTENER_PORT"),
                              (served.api_port, "listener", "PACSBRIDGE_API_PORT")):
        # the same folder, the same busy port, with --demo: what a second `make demo` does
        env = {**served.env, "PACSBRIDGE_API_PORT" if other == "api" else "PACSBRIDGE_LISTENER_PORT": str(free_port())}
        t0 = time.monotonic()
        second = subprocess.run(PB + ["serve", "--demo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode != 0
        assert f"port {busy}" in second.stderr and name in second.stderr, second.stderr
        assert "is running" not in second.stderr and "API token" not in second.stderr
        assert time.monotonic() - t0 < 10  # it checked before indexing anything
        assert _indexed(tmp_path) == 0  # nothing indexed into the running one's database
    assert served.proc.poll() is None  # the first one runs on
    assert served.stop() == 0


def test_demo_try_line_runs_as_printed_and_the_token_is_kept(tmp_path):
    import shlex
    import stat

    demo = Served(tmp_path, "--demo")
    try:
        banner = demo.log.read_text()
        # the token is kept in the demo folder, readable by its owner only
        kept = tmp_path / "pacsbridge-token"
        assert kept.read_text().strip() == demo.token
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        # the last "Try:" line runs as printed: no placeholder, a command that exists
        line = [x.strip() for x in banner.splitlines() if x.strip().startswith("PACSBRIDGE_API_URL=")][-1]
        assert "<" not in line
        words = shlex.split(line)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
        while "=" in words[0]:
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        ran = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert demo.stop() == 0
    finally:
        _end(demo.proc)
    # started again in the same folder: the same token
    again = Served(tmp_path, "--demo", log="serve2.log")
    try:
        assert again.token == demo.token
        assert again.client("jobs").returncode == 0
        assert again.stop() == 0
    finally:
        _end(again.proc)


def test_demo_accepts_dcmtk_and_pynetdicom_defaults_then_stops_quickly_and_cleanly(tmp_path):
    from pynetdicom import AE

    demo = Served(tmp_path, "--demo")
    try:
        # what DCMTK and pynetdicom send by default (calling ECHOSCU / STORESCU / PYNETDICOM, called ANY-SCP)
        echo = subprocess.run(["echoscu", "127.0.0.1", str(demo.dicom_port)], capture_output=True, text=True,
                              timeout=60)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        make_instance(tmp_path / "one.dcm", PatientID="DEFAULTS", rows=16)
        sent = subprocess.run(["storescu", "127.0.0.1", str(demo.dicom_port), str(tmp_path / "one.dcm")],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        ae = AE()
        ae.add_requested_context("1.2.840.10008.1.1")  # Verification
        assoc = ae.associate("127.0.0.1", demo.dicom_port)
        try:
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0
        finally:
            assoc.release()
        # a warning says so, as for PACSBRIDGE_ALLOWED_PEERS=*
        assert re.search(r"WARNING .*any calling AE", demo.log.read_text()), demo.log.read_text()[-3000:]
        # both Celery workers at work once (the instance sent is indexed, then a job runs), then stopped
        deadline = time.monotonic() + 90
        while True:
            out = demo.client("repack", "--dest", "defaults", "--PatientID", "DEFAULTS", "--follow", "--format", "json")
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert out.returncode == 0, out.stdout + out.stderr
        # Ctrl-C: every service stops, quickly, and says nothing alarming
        t0 = time.monotonic()
        assert demo.stop() == 0
        took = time.monotonic() - t0
        text = demo.log.read_text()
        stop_log = text[text.index("pacsbridge serve: stopping"):]
        assert "SIGTERM" not in stop_log and "ERROR" not in stop_log and "did not stop" not in stop_log, stop_log
        assert took < 15, f"stopping took {took:.1f} s"  # it took 20 s and a SIGKILL; about 9 s now
    finally:
        _end(demo.proc)


def test_any_ae_from_an_address_is_that_address_only():
    from pacsbridge.listener.peers import parse_peers, with_nodes
    from pacsbridge.shared.core.errors import ConfigError

    peers = parse_peers("*@127.0.0.1,PACS@10.1.2.3")
    assert peers.allows("ECHOSCU", "127.0.0.1") and peers.allows("PACS", "127.0.0.1")
    assert not peers.allows("ECHOSCU", "10.1.2.3") and peers.allows("PACS", "10.1.2.3")
    assert not peers.address_known("10.9.9.9") and peers.calling_aets() == []  # checked once accepted
    assert with_nodes(peers, [("ORTHANC", "127.0.0.1")]).allows("ANYONE", "127.0.0.1")
    assert parse_peers("PACS").calling_aets() == ["PACS"]
    with pytest.raises(ConfigError, match="needs an address"):
        parse_peers("*,PACS")


def test_serve_passes_the_command_lines_dicom_sql_to_its_services(tmp_path):
    """`pacsbridge --dicom-sql my.sql serve`: the worker it starts indexes with my.sql (an extra column),
    not with the shipped schema (its services used to get only the database and storage)."""
    from pacsbridge.shared.core.dicomsql import default_dicom_sql
    from sqlalchemy import create_engine, text

    sql = tmp_path / "my.sql"
    sql.write_text(default_dicom_sql().replace(
        '{ 0x0054, 0x0400, "ImageID", 16, SQL_C_CHAR, DT_STR },',
        '{ 0x0054, 0x0400, "ImageID", 16, SQL_C_CHAR, DT_STR },\n'
        ' { 0x0018, 0x0050, "SliceThickness", 16, SQL_C_CHAR, DT_STR },'))
    ds = make_instance(tmp_path / "one.dcm", SliceThickness="1.25")
    served = Served(tmp_path, global_args=("--dicom-sql", "my.sql"))  # relative to serve's folder
    engine = create_engine(f"sqlite:///{tmp_path / 'conquest.db'}")
    try:
        sent = subprocess.run(["storescu", "-aec", "PACSBRIDGE", "127.0.0.1", str(served.dicom_port),
                               str(tmp_path / "one.dcm")], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        deadline, row = time.monotonic() + 60, None
        while row is None and time.monotonic() < deadline:
            with engine.connect() as conn:
                row = conn.execute(text("select SliceThick from DICOMImages where SOPInstanc = :s"),
                                   {"s": ds.SOPInstanceUID}).first()
            time.sleep(0.3)
        assert row is not None and row[0] == "1.25", served.log.read_text()[-3000:]
    finally:
        engine.dispose()
        assert served.stop() == 0
