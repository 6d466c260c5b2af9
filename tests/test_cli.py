"""The ``pacsbridge`` command, run as a user runs it (a separate process)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from .conftest import cli_env
from .helpers import TEST_FILES, make_instance

EXE = [sys.executable, "-m", "pacsbridge.cli"]


def run(settings, *args, check_rc=None):
    proc = subprocess.run(EXE + list(map(str, args)), env=cli_env(settings), capture_output=True, text=True,
                          timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def test_help_for_every_verb(settings):
    for verb in ("init", "import", "rebuild", "sql", "summary", "export", "listener", "worker"):
        proc = run(settings, verb, "--help", check_rc=0)
        assert "usage: pacsbridge " + verb in proc.stdout


def test_import_query_summary_export(settings, tmp_path):
    run(settings, "init", check_rc=0)
    proc = run(settings, "import", TEST_FILES, "--format", "json")
    assert proc.returncode == 1  # some bundled files are not DICOM: reported, exit code 1
    report = json.loads(proc.stdout)
    assert report["stored"] > 40 and report["rejected"] == len(report["rejections"]) > 0
    assert all(r["reason"] for r in report["rejections"])

    proc = run(settings, "sql", "select SeriesInst from DICOMSeries where Modality='CT'", "--format", "csv",
               check_rc=0)
    lines = list(csv.reader(io.StringIO(proc.stdout)))
    assert lines[0][0].lower() == "seriesinst" and len(lines) > 2
    proc = run(settings, "sql", "select PatientID, PatientNam from DICOMPatients", "--format", "json", check_rc=0)
    assert any(r.get("PatientID", r.get("patientid")) == "4MR1" for r in json.loads(proc.stdout))
    proc = run(settings, "sql", "select nonsense from nowhere")
    assert proc.returncode == 2 and "query failed" in proc.stderr

    proc = run(settings, "summary", "--format", "json", check_rc=0)
    summary = {r["PatientID"]: r for r in json.loads(proc.stdout)}
    assert summary["4MR1"]["nrMR"] == 1

    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    dest = tmp_path / "out"
    run(settings, "export", "--series", ct.SeriesInstanceUID, "--dest", dest, check_rc=0)
    assert [p.name for p in dest.iterdir()] == [f"{ct.SOPInstanceUID}.dcm"]
    assert (dest / f"{ct.SOPInstanceUID}.dcm").read_bytes() == (TEST_FILES / "CT_small.dcm").read_bytes()
    dest2 = tmp_path / "out2"
    run(settings, "export", "--query", "select seriesinst from dicomseries where modality='CT'", "--dest", dest2,
        "--subdirs", check_rc=0)
    assert len(list(dest2.rglob("*.dcm"))) >= 5 and all(p.is_file() for p in dest2.rglob("*.dcm"))
    assert all(len(p.relative_to(dest2).parts) == 4 for p in dest2.rglob("*.dcm"))  # patient/study/series/sop
    proc = run(settings, "export", "--query", "select Modality from DICOMSeries", "--dest", tmp_path / "x")
    assert proc.returncode == 2 and "must return one of the columns" in proc.stderr
    proc = run(settings, "export", "--patient", "nobody", "--dest", tmp_path / "y")
    assert proc.returncode == 1 and "nothing matched" in proc.stderr


def test_hostile_patient_ids_stay_in_storage(settings, tmp_path):
    src = tmp_path / "src"
    for i, pid in enumerate(["../../x", "/etc/passwd", "..", "a\\..\\..\\b", "x" * 300, "Ωμέγα"]):
        make_instance(src / f"{i}.dcm", PatientID=pid)
    run(settings, "import", src, check_rc=0)
    root = settings.storage.resolve()
    stored = [p for p in root.rglob("*") if p.is_file() and ".incoming" not in p.parts]
    assert len(stored) == 6
    # (conquest.db.uid-lock: indexing's lock, next to the database so that every container sharing it sees it)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"src", "data"} <= names <= {"src", "data", "conquest.db", "conquest.db-wal", "conquest.db-shm",
                                        "conquest.db.uid-lock"}
    assert not (tmp_path / "x").exists() and not Path("/x").exists()
    for p in stored:
        assert root in p.resolve().parents
    proc = run(settings, "sql", "select ImagePat, ObjectFile from DICOMImages", "--format", "json", check_rc=0)
    rows = json.loads(proc.stdout)
    assert {r.get("ImagePat", r.get("imagepat")) for r in rows} >= {"../../x", "/etc/passwd", ".."}
    assert all(".." not in r.get("ObjectFile", r.get("objectfile")).split("/") for r in rows)


def test_move_removes_originals_only_when_stored(settings, tmp_path):
    src = tmp_path / "src"
    make_instance(src / "a.dcm")
    (src / "junk.dcm").write_bytes(b"not dicom at all")
    proc = run(settings, "import", "--move", src)
    assert proc.returncode == 1
    assert not (src / "a.dcm").exists() and (src / "junk.dcm").exists()


def test_config_errors_are_clear(settings, tmp_path):
    proc = run(settings, "--database", "mysql://x/y", "init")
    assert proc.returncode == 2 and "unsupported database" in proc.stderr
    proc = run(settings, "--dicom-sql", tmp_path / "missing.sql", "init")
    assert proc.returncode == 2 and "cannot read" in proc.stderr
    proc = run(settings, "import", "--template", "../{PatientID}", tmp_path)
    assert proc.returncode == 2 and "template" in proc.stderr
    proc = run(settings, "summary")
    assert proc.returncode == 2 and "pacsbridge init" in proc.stderr


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_database_down_is_a_clear_failure(settings, tmp_path):
    bad = settings.with_(database_url="postgresql+psycopg2://postgres@127.0.0.1:1/none")
    make_instance(tmp_path / "a.dcm")
    proc = run(bad, "import", tmp_path / "a.dcm")
    assert proc.returncode == 3 and "database error" in proc.stderr


def test_init_never_prints_the_database_password(tmp_path, pg_url):
    import uuid

    from sqlalchemy import create_engine, text

    from pacsbridge.shared.core.config import Settings

    role = f"pb_user_{uuid.uuid4().hex[:8]}"  # ours, not user input
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'hunter2-secret'"))
    try:
        url = pg_url.replace("postgres@", f"{role}:hunter2-secret@")
        settings = Settings(database_url=url, storage=tmp_path / "d", fsync=False)
        with admin.connect() as conn:
            conn.execute(text(f"GRANT ALL ON SCHEMA public TO {role}"))
        proc = run(settings, "init")
        assert "hunter2-secret" not in proc.stdout + proc.stderr
        assert f"{role}:***@" in proc.stderr.replace("\n", "")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_export_subdirs_writes_the_patient_study_series_tree(settings, tmp_path):
    """Issue 14 item 17: --subdirs without --layout wrote a flat folder; check the tree, not a count."""
    a = make_instance(tmp_path / "src" / "a.dcm", PatientID="SUB1")
    b = make_instance(tmp_path / "src" / "b.dcm", PatientID="SUB1", StudyInstanceUID=a.StudyInstanceUID)
    run(settings, "import", tmp_path / "src", check_rc=0)
    dest = tmp_path / "out"
    run(settings, "export", "--patient", "SUB1", "--dest", dest, "--subdirs", check_rc=0)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == sorted(f"SUB1/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
                         for ds in (a, b))
    flat = tmp_path / "flat"
    run(settings, "export", "--patient", "SUB1", "--dest", flat, check_rc=0)
    assert sorted(p.name for p in flat.iterdir()) == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in (a, b))
    study = tmp_path / "bystudy"
    run(settings, "export", "--patient", "SUB1", "--dest", study, "--layout", "study", check_rc=0)
    assert {p.relative_to(study).parts[0] for p in study.rglob("*.dcm")} == {a.StudyInstanceUID}


# -- the client's find, against the real API and a real Orthanc (issue 14 items 18 and 25) -----
class _FindSetup:
    def __init__(self, server, pacs) -> None:
        self.server, self.pacs = server, pacs

    def find(self, *args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
        from .test_api import TOKENS

        env = {**self.server.env, "PACSBRIDGE_API_URL": self.server.url, "PACSBRIDGE_API_TOKEN": TOKENS["user"],
               "COLUMNS": str(columns)}
        return subprocess.run(EXE + ["find", "pacs", *args], env=env, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def find_setup(tmp_path_factory):
    from .orthanc import Orthanc, free_port
    from .test_api import Server

    tmp = tmp_path_factory.mktemp("find")
    for i, date in enumerate(("20231231", "20240101", "20240615", "20250101")):
        make_instance(tmp / "files" / f"{i}.dcm", PatientID=f"FIND{i}", StudyDate=date,
                      PatientName=f"Find^Patient{i}", StudyDescription=f"Study number {i} of the find test",
                      AccessionNumber=f"ACC{i:04d}")
    server = Server(tmp)
    try:
        with Orthanc(tmp / "orthanc", modalities={"pb": ("PACSBRIDGE", "127.0.0.1", free_port())}) as pacs:
            pacs.upload(sorted((tmp / "files").glob("*.dcm")))
            status, _, _ = server.call("POST", "/api/v1/nodes", {"name": "pacs", "ae_title": pacs.aet,
                                                                 "host": "127.0.0.1", "port": pacs.dicom_port})
            assert status == 201
            yield _FindSetup(server, pacs)
    finally:
        server.close()


@pytest.mark.parametrize("value, patients", [
    ("2024-01-01", {"FIND1"}),  # refused as "min_study_date: '2024' is not a date" before
    ("20240101", {"FIND1"}),
    ("2024-01-01..2024-12-31", {"FIND1", "FIND2"}),
    ("20240101..20241231", {"FIND1", "FIND2"}),
    ("20240101-20241231", {"FIND1", "FIND2"}),
    ("2024-01-01/2024-12-31", {"FIND1", "FIND2"}),
    ("20240102-", {"FIND2", "FIND3"}),
    ("-20240101", {"FIND0", "FIND1"}),
    ("2024-06-15..", {"FIND2", "FIND3"}),
    ("..2023-12-31", {"FIND0"}),
])
def test_find_study_date_accepts_dicom_and_iso_dates_and_ranges(find_setup, value, patients):
    proc = find_setup.find("--PatientID", "FIND*", "--StudyDate", value, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert {r["PatientID"] for r in json.loads(proc.stdout)} == patients


@pytest.mark.parametrize("value", ["2024-13-01", "2024-01-01-2024-12-31", "yesterday", "20241231-20240101", "-"])
def test_find_bad_study_date_names_the_option(find_setup, value):
    proc = find_setup.find("--PatientID", "FIND*", "--StudyDate", value)
    assert proc.returncode == 2
    assert "--StudyDate" in proc.stderr and "min_study_date" not in proc.stderr, proc.stderr


def test_find_table_fits_the_terminal_and_says_what_it_left_out(find_setup):
    proc = find_setup.find("--PatientID", "FIND*", columns=80)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, proc.stdout
    header = next(line for line in lines if "PatientID" in line)
    assert "StudyDate" in header and "FIND1" in proc.stdout and "20240615" in proc.stdout
    # no column squeezed to a sliver: whole values, one row per study
    assert sum("FIND" in line for line in lines) == 4
    assert "--columns" in proc.stderr  # the columns left out are named, with how to get them
    wide = find_setup.find("--PatientID", "FIND*", columns=250)
    wide_header = next(line for line in wide.stdout.splitlines() if "PatientID" in line)
    assert wide_header.count("┃") > header.count("┃") >= 5  # more room, more columns


def test_find_columns_and_formats(find_setup):
    proc = find_setup.find("--PatientID", "FIND*", "--format", "csv", "--columns", "PatientID,StudyDate")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert rows[0] == ["PatientID", "StudyDate"] and sorted(rows[1:])[1] == ["FIND1", "20240101"]
    full = find_setup.find("--PatientID", "FIND*", "--format", "csv")
    assert len(next(csv.reader(io.StringIO(full.stdout)))) >= 10  # csv and json keep every column
    table = find_setup.find("--PatientID", "FIND*", "--columns", "AccessionNumber", columns=80)
    assert "ACC0002" in table.stdout and "StudyDate" not in table.stdout
    bad = find_setup.find("--PatientID", "FIND*", "--columns", "Nonsense")
    assert bad.returncode == 2 and "--columns" in bad.stderr


def test_find_without_match_says_so(find_setup):
    proc = find_setup.find("--PatientID", "NOBODY")
    assert proc.returncode == 0 and proc.stdout == ""
    assert "no match" in proc.stderr
    proc = find_setup.find("--PatientID", "NOBODY", "--format", "json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == [] and "no match" in proc.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_export_never_follows_a_link_inside_dest(settings, tmp_path):
    """Issue 14 item 13, the command's side: folders under --dest are made without following links."""
    a = make_instance(tmp_path / "src" / "a.dcm", PatientID="LNK1")
    b = make_instance(tmp_path / "src" / "b.dcm", PatientID="LNK2")
    run(settings, "import", tmp_path / "src", check_rc=0)
    dest, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    dest.mkdir()
    (dest / "LNK1").symlink_to(outside, target_is_directory=True)
    proc = run(settings, "export", "--query", "select PatientID from DICOMPatients", "--dest", dest,
               "--layout", "{PatientID}/{StudyInstanceUID}/{SOPInstanceUID}.dcm")
    assert proc.returncode == 1 and "symbolic link" in proc.stderr, proc.stderr
    assert list(outside.iterdir()) == []
    assert (dest / "LNK2" / b.StudyInstanceUID / f"{b.SOPInstanceUID}.dcm").is_file()
    assert a.SOPInstanceUID not in " ".join(str(p) for p in dest.rglob("*"))


@pytest.mark.parametrize("args, option", [
    (["push", "pacs", "--PatientID", "P*"], "--PatientID"),
    (["repack", "--dest", "../out", "--PatientID", "P1"], "--dest"),
    (["repack", "--dest", "out", "--layout", "{PatientID|evil}", "--PatientID", "P1"], "--layout"),
    (["retrieve", "pacs", "--PatientID", "P1", "--include", "ReferencedSeriesSequence"], "--include"),
    (["find", "pacs", "--PatientName", "*"], "the query"),
    (["nodes", "add", "pacs", "--aet", "A\\B", "--host", "h", "--port", "104"], "--aet"),
    (["nodes", "add", "web", "--web-url", "http://h/dw", "--web-secret", "../x"], "--web-secret"),
    (["nodes", "add", "web"], "--aet"),
])
def test_the_client_checks_requests_with_the_apis_models_before_sending(args, option):
    """Issue 15 item 3: the CLI builds job specs, queries and nodes and checks them with the models the API
    and the worker use: refused here (exit 2, the option named), nothing sent (the API is not even up)."""
    from .test_listener import free_port

    env = {"PACSBRIDGE_API_URL": f"http://127.0.0.1:{free_port()}", "PACSBRIDGE_API_TOKEN": "t" * 20,
           "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    proc = subprocess.run(EXE + args, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert option in proc.stderr and "cannot reach" not in proc.stderr, proc.stderr


# -- pacsbridge cohort: the client against the real API, a real worker and a real Orthanc (issue 17) ----
class _CohortSetup:
    def __init__(self, server, pacs, tmp: Path) -> None:
        self.server, self.pacs, self.tmp = server, pacs, tmp

    def run(self, *args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        from .test_api import TOKENS

        env = {**self.server.env, "PACSBRIDGE_API_URL": self.server.url, "PACSBRIDGE_API_TOKEN": TOKENS["user"],
               "COLUMNS": "200"}
        return subprocess.run(EXE + ["cohort", *map(str, args)], env=env, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL, cwd=cwd)


@pytest.fixture(scope="module")
def cohort_setup(tmp_path_factory):
    from .orthanc import Orthanc, free_port
    from .test_api import Server

    tmp = tmp_path_factory.mktemp("cohort")
    for i in range(2):
        make_instance(tmp / "files" / f"{i}.dcm", PatientID=f"COHCLI{i}", StudyDate="20240301", Modality="CT",
                      AccessionNumber=f"CLIACC{i}")
    server = Server(tmp)
    try:
        with Orthanc(tmp / "orthanc", modalities={"pb": ("PACSBRIDGE", "127.0.0.1", free_port())}) as pacs:
            pacs.upload(sorted((tmp / "files").glob("*.dcm")))
            status, _, _ = server.call("POST", "/api/v1/nodes", {"name": "pacs", "ae_title": pacs.aet,
                                                                 "host": "127.0.0.1", "port": pacs.dicom_port,
                                                                 "retrieve": "get"})
            assert status == 201
            server.worker()
            yield _CohortSetup(server, pacs, tmp)
    finally:
        server.close()


def test_cohort_submit_wait_show_report_and_failed_rows(cohort_setup, tmp_path):
    sheet = tmp_path / "my cohort.csv"
    sheet.write_text("Patient ID;Accession\nCOHCLI0;\n;CLIACC1\nNOBODY;\n", encoding="utf-8")
    proc = cohort_setup.run("submit", sheet, "--node", "pacs")
    assert proc.returncode == 0, proc.stderr
    cid = proc.stdout.splitlines()[0].strip()
    assert cid.isalnum() and "pending" in proc.stdout and "3 rows" in proc.stdout, proc.stdout

    # a dry run with a row not found ends partial: wait says so with exit 1
    proc = cohort_setup.run("wait", cid, "--timeout", "120", "--interval", "0.3")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    proc = cohort_setup.run("show", cid, "--rows", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["state"] == "partial" and shown["states"] == {"found": 2, "not_found": 1}, shown
    assert [(r["row"], r["state"]) for r in shown["items"]] == [(2, "found"), (3, "found"), (4, "not_found")]
    rows_csv = list(csv.DictReader(io.StringIO(cohort_setup.run("show", cid, "--rows", "--format", "csv").stdout)))
    assert [(r["row"], r["state"], r["patient_id"]) for r in rows_csv] == [
        ("2", "found", "COHCLI0"), ("3", "found", "COHCLI1"), ("4", "not_found", "")], rows_csv
    table = cohort_setup.run("show", cid, "--state", "not_found")
    assert table.returncode == 0 and "NOBODY" in table.stdout and "COHCLI0" not in table.stdout, table.stdout
    listed = cohort_setup.run("list", "--format", "json")
    assert cid in {c["id"] for c in json.loads(listed.stdout)["items"]}

    report = tmp_path / "report.csv"
    proc = cohort_setup.run("report", cid, "-o", report)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(report.read_text(encoding="utf-8-sig"))))
    assert [(r["row"], r["state"], r["Patient ID"], r["Accession"]) for r in rows] == [
        ("2", "found", "COHCLI0", ""), ("3", "found", "", "CLIACC1"), ("4", "not_found", "NOBODY", "")]
    assert rows[1]["patient_id"] == "COHCLI1"

    # the failed rows: to the name the API proposes, in the current folder; the input's own form
    out = tmp_path / "out"
    out.mkdir()
    proc = cohort_setup.run("failed", cid, cwd=out)
    assert proc.returncode == 0, proc.stderr
    written = list(out.iterdir())
    assert [p.name for p in written] == [f"cohort-{cid[:8]}-failed.csv"]
    assert written[0].read_text(encoding="utf-8-sig").splitlines() == ["Patient ID;Accession", "NOBODY;"]
    again = cohort_setup.run("failed", cid, cwd=out)
    assert again.returncode == 2 and "exists" in again.stderr  # never over a file
    proc = cohort_setup.run("failed", cid, "--format", "json", "-o", "-")
    assert proc.returncode == 0 and json.loads(proc.stdout) == [{"Patient ID": "NOBODY", "Accession": ""}], \
        proc.stdout


def test_cohort_refused_file_prints_every_problem_by_row_and_column(cohort_setup, tmp_path):
    sheet = tmp_path / "bad.csv"
    sheet.write_text("PatientID,StudyUID,Colour\nP1,not-a-uid,red\n,,\nP*,1.2.3,blue\n", encoding="utf-8")
    proc = cohort_setup.run("submit", sheet, "--node", "pacs", "--format", "json")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    problems = json.loads(proc.stdout)
    assert {"row": 1, "column": "Colour"} in [{k: p[k] for k in ("row", "column")} for p in problems], problems
    assert {(p["row"], p["column"]) for p in problems} >= {(2, "StudyUID"), (4, "PatientID")}, problems
    assert "refused (400)" in proc.stderr
    table = cohort_setup.run("submit", sheet, "--node", "pacs")
    assert table.returncode == 2 and "Colour" in table.stdout and "StudyUID" in table.stdout, table.stdout
    assert "nothing was submitted" in table.stdout
    assert cohort_setup.run("list", "--format", "json").stdout.count("bad.csv") == 0
    # a bad mass transfer is refused here, before anything is sent
    proc = cohort_setup.run("mass", "--node", "pacs", "--from", "20240301", "--to", "20240201")
    assert proc.returncode == 2 and "from" in proc.stderr, proc.stderr


@pytest.mark.parametrize("header, expected", [
    ('attachment; filename="cohort-ab-report.csv"', "cohort-ab-report.csv"),
    ('attachment; filename="/etc/passwd"', "passwd"),
    ('attachment; filename="a\\\\b\\\\x.xlsx"', "x.xlsx"),
    ("", "fallback.csv"),
    ('attachment; filename="../../x.csv"', None),
    ('attachment; filename=".."', None),
    ('attachment; filename="ok/.."', None),
    ('attachment; filename=".hidden"', None),
])
def test_cohort_download_name_from_the_api_is_a_bare_base_name(header, expected):
    from pacsbridge.client import ClientError, safe_filename

    if expected is None:
        with pytest.raises(ClientError, match="refused"):
            safe_filename(header, "fallback.csv")
    else:
        assert safe_filename(header, "fallback.csv") == expected


def test_cohort_start_moves_what_the_dry_run_found_and_mass_chunks(cohort_setup, tmp_path):
    sheet = tmp_path / "start.json"
    sheet.write_text(json.dumps([{"PatientID": "COHCLI0"}, {"PatientID": "NOBODY2"}]), encoding="utf-8")
    cid = cohort_setup.run("submit", sheet, "--node", "pacs", "--follow", "--format", "json")
    assert cid.returncode == 1, cid.stderr  # the dry run: one row not found
    cohort = json.loads(cid.stdout)
    assert cohort["states"] == {"found": 1, "not_found": 1} and not cohort["transfer"]
    proc = cohort_setup.run("start", cohort["id"], "--follow", "--format", "json")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    done = json.loads(proc.stdout)
    assert done["transfer"] and done["states"] == {"done": 1, "not_found": 1}, done
    assert done["totals"]["received"] == 1
    again = cohort_setup.run("start", cohort["id"])
    assert again.returncode == 2 and "409" in again.stderr  # started already: resume or retry it

    # a mass transfer: one row per day, CT only (sent to the PACS)
    proc = cohort_setup.run("mass", "--node", "pacs", "--from", "2024-03-01", "--to", "2024-03-02", "--chunk", "day",
                            "--modality", "CT", "--follow", "--format", "json")
    assert proc.returncode == 0, proc.stdout  # an empty day is done, not a row to fix and send again
    mass = json.loads(proc.stdout)
    assert mass["rows"] == 2 and mass["states"] == {"found": 1, "done": 1}, mass


def test_cohort_submit_then_push_node_started_at_once(cohort_setup, tmp_path):
    """``cohort submit FILE --node PACS --then push NODE --start``: the issue's own command line (here the
    push goes back to the same Orthanc, which takes it as a node like any other)."""
    sheet = tmp_path / "push.csv"
    sheet.write_text("AccessionNumber\nCLIACC0\n", encoding="utf-8")
    bad = cohort_setup.run("submit", sheet, "--node", "pacs", "--then", "send", "pacs")
    assert bad.returncode == 2 and "expected push NODE or repack DIR" in bad.stderr, bad.stderr
    proc = cohort_setup.run("submit", sheet, "--node", "pacs", "--then", "push", "pacs", "--start", "--follow",
                            "--format", "json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    done = json.loads(proc.stdout)
    assert done["then"] == {"push": "pacs"} and done["transfer"] and done["states"] == {"done": 1}, done
    assert done["totals"]["sent"] == 1 and done["totals"]["expected"] == 1, done["totals"]
    report = json.loads(cohort_setup.run("report", done["id"], "--format", "json", "-o", "-").stdout)
    kinds = [cohort_setup.server.call("GET", f"/api/v1/jobs/{j}")[1]["kind"] for j in report[0]["jobs"].split()]
    assert kinds[-1] == "push" and report[0]["sent"] == 1, (kinds, report)


def test_sqlite_indexing_lock_is_shared_by_processes_with_their_own_temp_folders(tmp_path):
    """Worker containers on one SQLite index each have their own /tmp: the lock that keeps two of them
    from passing the study/series conflict check at once must be next to the database, where all see it.
    Held here by the test, an import in a process with another TMPDIR waits for it."""
    import fcntl
    import time

    from pacsbridge.shared.core.config import Settings
    from pacsbridge.shared.index.importer import Importer

    # SQLite only: PostgreSQL takes advisory locks in the database itself, which every worker shares
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'conquest.db'}", storage=tmp_path / "data", fsync=False)
    run(settings, "init", check_rc=0)
    make_instance(tmp_path / "free" / "a.dcm", PatientID="FREE")
    make_instance(tmp_path / "src" / "a.dcm", PatientID="LOCKED")
    database = str(settings.database_url).split("sqlite:///", 1)[1]
    env = {**cli_env(settings), "TMPDIR": str(tmp_path / "own-tmp")}
    (tmp_path / "own-tmp").mkdir()
    t0 = time.monotonic()
    subprocess.run(EXE + ["import", str(tmp_path / "free")], env=env, capture_output=True, check=True, timeout=120)
    alone = time.monotonic() - t0  # an import that waits for nobody
    with open(Importer.uid_lock_path(database), "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        proc = subprocess.Popen(EXE + ["import", str(tmp_path / "src")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(max(5.0, 3 * alone))
        assert proc.poll() is None, proc.communicate()  # still waiting for the lock
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "LOCKED" in run(settings, "sql", "select PatientID from DICOMPatients", check_rc=0).stdout
