"""The settings model (shared/core/config.py): one declaration, its sources, its generated docs, and
global options reaching every child process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacsbridge.shared.core.config import Settings, load_settings, load_settings_with_sources
from pacsbridge.shared.core.dicomsql import default_dicom_sql
from pacsbridge.shared.core.errors import ConfigError

from .helpers import TEST_FILES, make_instance

ROOT = Path(__file__).resolve().parent.parent
PB = [sys.executable, "-m", "pacsbridge.cli"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env.update(extra)
    return env


def test_no_module_reads_a_setting_from_the_environment_itself():
    """Every PACSBRIDGE_* value is read through the model (config file, validation, `pacsbridge config`)."""
    offenders = []
    for folder in ("shared", "services", "pacsbridge"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "config.py" and path.parent.name == "core":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"""(environ\.get|getenv)\(\s*["']PACSBRIDGE_""", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_generated_reference_and_env_example_match_the_model():
    from pacsbridge.shared.core.configdoc import drift, env_example

    assert drift(ROOT) == [], "run: python -m pacsbridge.shared.core.configdoc --write"
    example = env_example()
    for name in Settings.model_fields:  # every setting is in the env example
        assert f"PACSBRIDGE_{name.upper()}" in example


def test_generated_files_drift_is_detected(tmp_path):
    from pacsbridge.shared.core.configdoc import FILES, drift, render

    for rel, kind in FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(render(kind))
    assert drift(tmp_path) == []
    doc = tmp_path / "docs" / "configuration.md"
    doc.write_text(doc.read_text().replace("PACSBRIDGE_FIND_LIMIT", "PACSBRIDGE_FIND_LIMITS"))
    assert drift(tmp_path) == ["docs/configuration.md"]


def test_sources_in_order_and_blank_is_unset(tmp_path):
    conf = tmp_path / "pb.env"
    conf.write_text("# a comment\nPACSBRIDGE_STORAGE=/from/file\nexport PACSBRIDGE_AE_TITLE='FILEAE'\n"
                    "PACSBRIDGE_LISTENER_PORT=104\nPACSBRIDGE_FIND_LIMIT=500\n")
    env = {"PACSBRIDGE_CONFIG": str(conf), "PACSBRIDGE_LISTENER_PORT": "11113", "PACSBRIDGE_FIND_LIMIT": " ",
           "PACSBRIDGE_STORAGE": "/from/env", "OTHER": "x"}
    s, sources = load_settings_with_sources(env, overrides={"storage": Path("/from/cli")})
    assert (s.storage, s.ae_title, s.listener_port, s.find_limit) == (Path("/from/cli"), "FILEAE", 11113, 500)
    assert sources["storage"] == "command line" and sources["listener_port"] == "environment"
    assert sources["ae_title"] == sources["find_limit"] == f"config file {conf}"
    assert sources["fsync"] == "default"
    assert Settings(fsync=False).listener_port == 11112  # built in code: nothing from the environment


@pytest.mark.parametrize("name, value, message", [
    ("PACSBRIDGE_LISTENER_PORT", "70000", "less than or equal to 65535"),
    ("PACSBRIDGE_RETRIEVE_WAIT_SECONDS", "soon", "valid number"),
    ("PACSBRIDGE_PUSH_PROCESSES", "2", "'0', '1' or 'auto'"),
    ("PACSBRIDGE_HEARTBEAT_SECONDS", "0", "greater than 0"),
    ("PACSBRIDGE_REACTOR", "spin", "'wait' or 'poll'"),
    # our own AE title takes the one rule of every AE title (a node's): pynetdicom refused these only
    # when the listener or a job made its AE, far from the variable
    ("PACSBRIDGE_AE_TITLE", "A\\B", "printable ASCII characters, no backslash"),
    ("PACSBRIDGE_AE_TITLE", "PACS\tBRIDGE", "printable ASCII characters, no backslash"),
    ("PACSBRIDGE_AE_TITLE", "ÄRZTE", "printable ASCII characters, no backslash"),
    ("PACSBRIDGE_AE_TITLE", "SEVENTEEN-LETTERS", "at most 16 characters"),
])
def test_a_bad_value_names_the_variable(name, value, message):
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})
    assert str(info.value).startswith(f"{name}={value!r}:") and message in str(info.value)


def test_a_bad_value_fails_at_start_up_not_at_import(tmp_path):
    env = _clean_env(PACSBRIDGE_RETRIEVE_WAIT_SECONDS="soon", PACSBRIDGE_LEASE_SECONDS="-1",
                     PACSBRIDGE_HEARTBEAT_SECONDS="5")
    code = ("from pacsbridge.worker.kinds import retrieve; from pacsbridge.worker import runner; "
            "from pacsbridge.shared.nodes import throttle; "
            "print(retrieve.WAIT_SECONDS, throttle.LEASE_SECONDS, runner.HEARTBEAT_SECONDS)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["120.0", "30.0", "5.0"]  # the bad ones at their default, the good one taken
    proc = subprocess.run(PB + ["config"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert "PACSBRIDGE_RETRIEVE_WAIT_SECONDS='soon'" in proc.stderr and "PACSBRIDGE_LEASE_SECONDS='-1'" in proc.stderr


def test_config_prints_effective_settings_masked_with_their_source(tmp_path):
    secret = "s3cr3t-webhook-key-0123456789"
    conf = tmp_path / "pb.env"
    conf.write_text(f"PACSBRIDGE_WEBHOOK_SECRET={secret}\n"
                    "PACSBRIDGE_BROKER_URL=redis://:brokerpass@127.0.0.1:6379/0\nPACSBRIDGE_FIND_LIMIT=9\n")
    env = _clean_env(PACSBRIDGE_CONFIG=str(conf), PACSBRIDGE_DATABASE_URL="postgresql://pb:dbpass@db/pb",
                     PACSBRIDGE_API_TOKENS="ops:0123456789abcdef0123:admin",
                     PACSBRIDGE_API_TOKEN="clienttoken-0123456789")
    proc = subprocess.run(PB + ["--storage", str(tmp_path / "st"), "config", "--all", "--format", "json"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["setting"]: r for r in json.loads(proc.stdout)}
    assert len(rows) == len(Settings.model_fields)
    for word in (secret, "dbpass", "brokerpass", "0123456789abcdef0123", "clienttoken"):
        assert word not in proc.stdout
    assert rows["PACSBRIDGE_DATABASE_URL"] == {"setting": "PACSBRIDGE_DATABASE_URL", "value": "postgresql://pb:***@db/pb",
                                               "source": "environment"}
    assert rows["PACSBRIDGE_BROKER_URL"]["value"] == "redis://:***@127.0.0.1:6379/0"
    assert rows["PACSBRIDGE_BROKER_URL"]["source"] == f"config file {conf}"
    assert rows["PACSBRIDGE_WEBHOOK_SECRET"]["value"] == "***"
    assert rows["PACSBRIDGE_API_TOKENS"]["value"] == "ops:***:admin"
    assert rows["PACSBRIDGE_STORAGE"] == {"setting": "PACSBRIDGE_STORAGE", "value": str(tmp_path / "st"),
                                          "source": "command line"}
    assert rows["PACSBRIDGE_FIND_LIMIT"]["value"] == "9"
    assert rows["PACSBRIDGE_HEARTBEAT_SECONDS"] == {"setting": "PACSBRIDGE_HEARTBEAT_SECONDS", "value": "10.0",
                                                    "source": "default"}
    short = subprocess.run(PB + ["config", "--format", "json"], env=env, capture_output=True, text=True, timeout=60,
                           cwd=tmp_path)
    names = {r["setting"] for r in json.loads(short.stdout)}  # without --all: what is set, and the essentials
    assert "PACSBRIDGE_FIND_LIMIT" in names and "PACSBRIDGE_HEARTBEAT_SECONDS" not in names


def test_config_reference_is_the_generated_file(tmp_path):
    proc = subprocess.run(PB + ["config", "--reference", "env"], env=_clean_env(), capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout == (ROOT / "deploy" / "pacsbridge.env.example").read_text()


def test_dimse_timeout_is_the_listeners_and_the_client_has_its_own():
    """PACSBRIDGE_DIMSE_TIMEOUT: the listener's; PACSBRIDGE_SCU_DIMSE_TIMEOUT: retrieve's and push's."""
    env = _clean_env(PACSBRIDGE_DIMSE_TIMEOUT="99", PACSBRIDGE_SCU_DIMSE_TIMEOUT="7")
    code = ("from pacsbridge.shared.core.config import load_settings\n"
            "from pacsbridge.listener.server import make_ae\nfrom pacsbridge.listener.peers import parse_peers\n"
            "from pacsbridge.shared.nodes import pusher as push\nfrom pacsbridge.shared.nodes import sources\n"
            "ae = make_ae(load_settings(), parse_peers('X'))\n"
            "print(ae.dimse_timeout, push.TIMEOUT, sources.DIMSE_TIMEOUT)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["99.0", "7.0", "7.0"]


def test_environ_round_trip(tmp_path):
    s = Settings(storage=tmp_path / "d", dicom_sql=Path("my.sql"), special_columns=True, heartbeat_seconds=2.5,
                 push_processes="auto", webhook_secret="x" * 20)
    env = s.environ()
    assert "PACSBRIDGE_WEBHOOK_SECRET" not in env  # secrets stay where they were read
    assert env["PACSBRIDGE_DICOM_SQL"] == str(Path("my.sql").absolute())  # a child may run elsewhere
    back = load_settings(env)
    assert back.with_(webhook_secret="x" * 20) == s.with_(dicom_sql=Path("my.sql").absolute())
    import pickle

    assert pickle.loads(pickle.dumps(s)) == s  # the listener hands its settings to spawned receivers


# -- global options reach the children ---------------------------------------------------------
def _user_dicom_sql(path: Path) -> Path:
    """A user dicom.sql with an extra DICOMImages column: SliceThickness (SliceThick)."""
    path.write_text(default_dicom_sql().replace(
        '{ 0x0054, 0x0400, "ImageID", 16, SQL_C_CHAR, DT_STR },',
        '{ 0x0054, 0x0400, "ImageID", 16, SQL_C_CHAR, DT_STR },\n'
        ' { 0x0018, 0x0050, "SliceThickness", 16, SQL_C_CHAR, DT_STR },'))
    return path


def _slice_thickness(db: str, sop: str, deadline: float) -> str | None:
    from sqlalchemy import create_engine, text

    engine = create_engine(db)
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                try:
                    row = conn.execute(text("select SliceThick from DICOMImages where SOPInstanc = :s"),
                                       {"s": sop}).first()
                except Exception:  # tables not there yet
                    row = None
            if row is not None:
                return row[0]
            time.sleep(0.3)
        return None
    finally:
        engine.dispose()


def test_worker_children_index_with_the_command_lines_dicom_sql(tmp_path):
    """`pacsbridge --dicom-sql my.sql --special-columns worker`: the worker's children (--queues all starts
    one per queue, Celery forks its pool) used to rebuild their settings from the environment and index
    with the shipped schema, leaving the extra column and the special ones empty."""
    import shutil

    import pydicom
    from pacsbridge.listener.server import make_sender

    sql = _user_dicom_sql(tmp_path / "my.sql")
    db = f"sqlite:///{tmp_path / 'idx.db'}"
    env = _clean_env(PACSBRIDGE_DATABASE_URL=db, PACSBRIDGE_STORAGE=str(tmp_path / "data"), PACSBRIDGE_FSYNC="0",
                     PACSBRIDGE_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    flags = ["--dicom-sql", str(sql), "--special-columns"]
    subprocess.run(PB + [*flags, "init"], env=env, check=True, capture_output=True, timeout=120)
    ds = make_instance(tmp_path / "data" / "in" / "a.dcm", SliceThickness="2.5")
    shutil.copy(TEST_FILES / "rtplan.dcm", tmp_path / "data" / "in" / "plan.dcm")
    plan = pydicom.dcmread(TEST_FILES / "rtplan.dcm")
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(PB + [*flags, "worker", "--concurrency", "1"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        settings = load_settings(env)
        make_sender(settings)(["in/a.dcm", "in/plan.dcm"])
        got = _slice_thickness(db, ds.SOPInstanceUID, time.monotonic() + 90)
        assert got == "2.5", (tmp_path / "worker.log").read_text()[-3000:]
        from sqlalchemy import create_engine, text

        engine = create_engine(db)
        deadline, row = time.monotonic() + 60, None
        while row is None and time.monotonic() < deadline:
            with engine.connect() as conn:
                row = conn.execute(text("select ElementCount from DICOMImages where SOPInstanc = :s"),
                                   {"s": plan.SOPInstanceUID}).first()
            time.sleep(0.3)
        engine.dispose()
        assert row is not None and row[0] == str(len(plan.BeamSequence))  # a special column, filled
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        log.close()
