"""Cohorts end to end through the API (issue 17), against real Orthanc peers: a spreadsheet with found,
held, missing, ambiguous, malformed and duplicate rows; the dry run's report, exact in CSV, xlsx and
JSON; the transfer; the failed rows fixed and sent again; a project's cohort pushed de-identified to a
second Orthanc; bad files; 10,000 rows; cancel, resume and retry; who may do what.

The cohort job runs in-process (``runner.run_job`` with the app's own context), as a worker would run it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import openpyxl
import pytest

from pacsbridge.api import create_app
from pacsbridge.shared.core.config import Settings
from pacsbridge.shared.deid.options import ProjectConfig
from pacsbridge.shared.deid.projects import ProjectStore
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.index.importer import Importer
from pacsbridge.worker import runner

from .helpers import make_instance
from .orthanc import ConnectionSampler, Orthanc, free_port
from .test_api import TOKEN_SPEC, auth
from .test_cohort_job import make_hospital

SECRET = "0123456789abcdef0123456789abcdef-cohort"
LAB = "lab-token-0123456789abcdef"


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite, unless a test asks for both (``indirect`` parametrization): most tests here are about
    the API and the peers, not the database."""
    from .conftest import _pg_database

    if getattr(request, "param", "sqlite") == "sqlite":
        yield f"sqlite:///{tmp_path / 'cohort.db'}"
    else:
        yield from _pg_database()


BOTH_DBS = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def app(settings: Settings, tmp_path: Path):
    application = create_app({"SETTINGS": settings.with_(
        api_tokens=TOKEN_SPEC + f",lab:{LAB}:project=lung", broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        export_root=tmp_path / "export", listener_port=free_port(), deid_secret=SECRET), "TESTING": True})
    yield application
    application.extensions["pacsbridge"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def hospital(tmp_path):
    """The hospital PACS: three patients with a study and its prior (5 instances each), an accession
    two patients share, and a patient with a numeric ID and non-ASCII text."""
    files = tmp_path / "files"
    studies = make_hospital(files)
    for i in range(2):
        make_instance(files / f"num-{i}.dcm", PatientID="12345", PatientName="Müller^Jürgen",
                      StudyInstanceUID=NUM_STUDY, SeriesInstanceUID=NUM_SERIES, AccessionNumber="ÄCC",
                      StudyDate="20240501", StudyDescription="Thorax ärztlich", InstanceNumber=i + 1,
                      SpecificCharacterSet="ISO_IR 192")
    with Orthanc(tmp_path / "orthanc", modalities={"pb": ("PACSBRIDGE", "127.0.0.1", 11112)}) as pacs:
        pacs.upload(sorted(files.glob("*.dcm")))
        yield pacs, studies, files


NUM_STUDY = "1.2.826.0.1.3680043.8.498.77001"
NUM_SERIES = "1.2.826.0.1.3680043.8.498.77002"


def add_node(client, name: str, peer: Orthanc, **extra: Any) -> None:
    body = {"name": name, "ae_title": peer.aet, "host": "127.0.0.1", "port": peer.dicom_port, "retrieve": "get",
            **extra}
    resp = client.post("/api/v1/nodes", json=body, headers=auth("admin"))
    assert resp.status_code == 201, resp.get_data(as_text=True)


def run(app, cohort_id: str) -> dict[str, Any]:
    """Run the cohort job here, as a worker would; its finished job row (as the API shows it)."""
    st = app.extensions["pacsbridge"]
    done = runner.run_job(cohort_id, st.ctx, st.jobs)
    assert done is not None, "the job was not ours to run"
    return {"state": done.state, "error": done.error}


def csv_bytes(rows: list[list[str]], delimiter: str = ",") -> bytes:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode()


def submit_file(client, data: bytes, name: str, role: str = "user", **form: str):
    return client.post("/api/v1/cohorts", data={"file": (io.BytesIO(data), name), **form},
                       content_type="multipart/form-data", headers=auth(role))


def report(client, cid: str, fmt: str = "json", role: str = "read") -> Any:
    resp = client.get(f"/api/v1/cohorts/{cid}/report?format={fmt}", headers=auth(role))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp


def report_rows(client, cid: str) -> dict[int, dict[str, Any]]:
    return {int(r["row"]): r for r in json.loads(report(client, cid).data)}


def image_count(app) -> int:
    return int(app.extensions["pacsbridge"].ctx.index.count("Image"))


def jobs_of(app, kind: str) -> list[Any]:
    jobs, _ = app.extensions["pacsbridge"].jobs.list(kind=kind, limit=1000, offset=0)
    return list(jobs)


def load_files(app, folder: Path) -> int:
    ctx = app.extensions["pacsbridge"].ctx
    report_ = Importer(ctx.index, ctx.storage, workers=1).import_paths([folder])
    assert not report_.rejected, report_.rejected
    return int(report_.stored)


HEADERS = ["PatientID", "Accession Number"]


# -- 1 and 2: a spreadsheet, the dry run, the transfer, the failed rows sent again -----------------------
@BOTH_DBS
def test_spreadsheet_dry_run_transfer_and_failed_rows_resent(app, client, hospital, tmp_path):
    pacs, studies, files = hospital
    add_node(client, "pacs", pacs)
    held = tmp_path / "held"  # ACC1A is indexed here already
    held.mkdir()
    for f in files.glob("ACC1A-*.dcm"):
        shutil.copy(f, held / f.name)
    assert load_files(app, held) == 5
    stored_before = sorted(p.name for p in app.extensions["pacsbridge"].settings.storage.rglob("*.dcm"))

    # malformed: every problem by row and column, nothing written
    bad = csv_bytes([HEADERS + ["Study Date"], ["", "ACC0A", "2024-13-45"], ["", "", "20240101"],
                     ["A\\B", "ACC0B", ""]])
    jobs_before = len(jobs_of(app, "cohort"))
    resp = submit_file(client, bad, "cohort.csv", node="pacs")
    assert resp.status_code == 400, resp.get_data(as_text=True)
    problems = {(p["row"], p["column"]) for p in resp.get_json()["error"]["problems"]}
    assert ("2", "Study Date") in {(str(r), c) for r, c in problems}, problems
    assert 3 in {r for r, _ in problems} and (4, "PatientID") in problems, problems
    assert len(jobs_of(app, "cohort")) == jobs_before

    # fixed: accepted, a dry run
    rows = [HEADERS, ["", "ACC0A"],        # 2 found
            ["", "ACC1A"],                 # 3 held
            ["", "NOPE"],                  # 4 not found
            ["", "SHARED"],                # 5 ambiguous
            ["COH2", "ACC9X"],             # 6 not found: a wrong accession, fixed below
            ["", "ACC0A"]]                 # 7 duplicate of 2
    resp = submit_file(client, csv_bytes(rows, ";"), "cohort.csv", node="pacs")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    cid = resp.get_json()["id"]
    assert resp.headers["Location"] == f"/api/v1/cohorts/{cid}"
    assert run(app, cid)["state"] == "partial"
    assert image_count(app) == 5  # a dry run moves nothing

    expect = {2: ("found", 5, 0), 3: ("held", 5, 5), 4: ("not_found", 0, 0), 5: ("ambiguous", 0, 0),
              6: ("not_found", 0, 0), 7: ("duplicate", 0, 0)}
    got = report_rows(client, cid)
    assert {n: (r["state"], r["expected"], r["held"]) for n, r in got.items()} == expect, got
    assert got[2]["studies"] == studies["ACC0A"]["study"] and got[2]["patient_id"] == "COH0"
    assert got[2]["series"] == 2 and got[3]["studies"] == studies["ACC1A"]["study"]
    assert "2 patients" in got[5]["reason"] and "'pacs'" in got[4]["reason"]
    assert got[7]["reason"] == "the same as row 2"
    assert got[6]["PatientID"] == "COH2" and got[6]["Accession Number"] == "ACC9X"
    # the same report as CSV and xlsx
    text = report(client, cid, "csv").data.decode("utf-8-sig")
    table = list(csv.DictReader(io.StringIO(text)))
    assert [(int(r["row"]), r["state"], int(r["expected"])) for r in table] == [
        (n, s, e) for n, (s, e, _) in sorted(expect.items())]
    assert list(table[0])[:5] == ["row", "state", "reason", *HEADERS]
    book = openpyxl.load_workbook(io.BytesIO(report(client, cid, "xlsx").data), read_only=True)
    sheet = list(book.worksheets[0].iter_rows(values_only=True))
    head = list(sheet[0])
    assert head[:5] == ["row", "state", "reason", *HEADERS]
    assert [(int(r[0]), r[1], int(r[head.index("expected")])) for r in sheet[1:]] == [
        (n, s, e) for n, (s, e, _) in sorted(expect.items())]
    status = client.get(f"/api/v1/cohorts/{cid}", headers=auth("read")).get_json()
    assert status["stage"] == "queried" and status["rows"] == 6 and status["transfer"] is False
    assert status["states"] == {"found": 1, "held": 1, "not_found": 2, "ambiguous": 1, "duplicate": 1}

    # start: the found row is pulled, the held one is not
    resp = client.post(f"/api/v1/cohorts/{cid}/start", headers=auth("user"))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert resp.get_json()["stage"] == "transfer"  # queued to move: not the dry run's "queried" any more
    assert client.post(f"/api/v1/cohorts/{cid}/start", headers=auth("user")).status_code == 409
    assert run(app, cid)["state"] == "partial"
    assert _status(client, cid)[0]["stage"] == "transferred"
    got = report_rows(client, cid)
    assert {n: (r["state"], r["received"]) for n, r in got.items()} == {
        2: ("done", 5), 3: ("done", 5), 4: ("not_found", 0), 5: ("ambiguous", 0), 6: ("not_found", 0),
        7: ("duplicate", 0)}, got
    assert got[3]["jobs"] == ""  # held: no retrieve for it
    retrieves = jobs_of(app, "retrieve")
    assert len(retrieves) == 1 and retrieves[0].params["query"]["StudyInstanceUID"] == [studies["ACC0A"]["study"]]
    assert got[2]["jobs"] == retrieves[0].id
    assert image_count(app) == 10  # each instance once
    stored = sorted(p.name for p in app.extensions["pacsbridge"].settings.storage.rglob("*.dcm"))
    assert len(stored) == 10 and set(stored_before) <= set(stored)

    # retry: only the rows not done run again (and still find nothing); no new retrieve
    resp = client.post(f"/api/v1/cohorts/{cid}/retry", headers=auth("user"))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert run(app, cid)["state"] == "partial"
    again = report_rows(client, cid)
    assert {n: r["state"] for n, r in again.items()} == {n: r["state"] for n, r in got.items()}
    assert again[2]["jobs"] == got[2]["jobs"] and len(jobs_of(app, "retrieve")) == 1
    assert image_count(app) == 10

    # 2: the failed rows, in the input's own form: headers as written, the same delimiter
    resp = client.get(f"/api/v1/cohorts/{cid}/failed", headers=auth("read"))
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    text = resp.data.decode("utf-8-sig")
    assert text.splitlines()[0] == "PatientID;Accession Number", text
    failed = list(csv.reader(io.StringIO(text), delimiter=";"))
    assert failed[1:] == [["", "NOPE"], ["", "SHARED"], ["COH2", "ACC9X"]], failed
    fixed = [failed[0], ["COH0", "SHARED"], ["COH2", "ACC2A"], ["", "ACC0A"]]  # and a row done already
    resp = submit_file(client, csv_bytes(fixed, ";"), "failed.csv", node="pacs", start="1")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    cid2 = resp.get_json()["id"]
    result = run(app, cid2)
    assert result["state"] == "succeeded", result
    got = report_rows(client, cid2)
    assert {n: (r["state"], r["received"]) for n, r in got.items()} == {2: ("done", 1), 3: ("done", 5),
                                                                        4: ("done", 5)}, got
    assert got[4]["jobs"] == ""  # ACC0A was held: not pulled again
    assert image_count(app) == 16 and len(jobs_of(app, "retrieve")) == 3
    assert client.get(f"/api/v1/cohorts/{cid2}/failed", headers=auth("read")).data.decode(
        "utf-8-sig").splitlines() == ["PatientID;Accession Number"]


# -- 3: a project's cohort pushed de-identified to a second Orthanc ------------------------------------------
def _dest_studies(dest: Orthanc) -> dict[str, list[str]]:
    """PatientID -> the StudyDates of its studies, as the second Orthanc holds them."""
    out: dict[str, list[str]] = {}
    for sid in dest.get("/studies"):
        tags = dest.get(f"/studies/{sid}")
        out.setdefault(tags["PatientMainDicomTags"]["PatientID"], []).append(tags["MainDicomTags"]["StudyDate"])
    return {k: sorted(v) for k, v in out.items()}


def _day(text: str) -> dt.date:
    return dt.datetime.strptime(text, "%Y%m%d").date()


def test_project_cohort_pushes_deidentified_one_pseudonym_and_offset_per_patient(app, client, hospital, tmp_path):
    pacs, studies, _ = hospital
    st = app.extensions["pacsbridge"]
    projects = ProjectStore(st.ctx.index.engine)
    projects.create("lung", ProjectConfig(), SECRET.encode(), created_by="test")
    projects.open("lung", SECRET.encode()).identity.assign("", "COH1", "ASSIGNED-1")
    add_node(client, "pacs", pacs)
    with Orthanc(tmp_path / "dest", aet="PLATFORM") as dest:
        add_node(client, "platform", dest, identifiable=False, project="lung")
        rows = [["PatientID", "AccessionNumber", "Pseudonym"],
                ["COH0", "ACC0A", "SUBJ-A"],      # 2: a study
                ["COH0", "ACC0B", "SUBJ-A"],      # 3: its prior, the same pseudonym
                ["COH1", "ACC1A", "WRONG-1"],     # 4: the map says ASSIGNED-1: refused
                ["COH2", "ACC2A", ""]]            # 5: no pseudonym: the map makes one
        resp = submit_file(client, csv_bytes(rows), "lung.csv", node="pacs", project="lung", then="push:platform",
                           start="true")
        assert resp.status_code == 202, resp.get_data(as_text=True)
        cid = resp.get_json()["id"]
        assert resp.get_json()["project"] == "lung"
        result = run(app, cid)
        assert result["state"] == "partial", result
        got = report_rows(client, cid)
        assert {n: r["state"] for n, r in got.items()} == {2: "done", 3: "done", 4: "refused", 5: "done"}, got
        assert "another pseudonym" in got[4]["reason"]
        assert got[2]["sent"] == got[3]["sent"] == got[5]["sent"] == 5
        held = _dest_studies(dest)
        made = projects.open("lung", SECRET.encode()).identity.peek("", "COH2")
        assert made is not None and made.pseudonym not in ("", "SUBJ-A")
        assert set(held) == {"SUBJ-A", made.pseudonym}, held
        assert len(held["SUBJ-A"]) == 2  # the study and its prior, under one pseudonym
        prior, study = (_day(d) for d in held["SUBJ-A"])
        assert study - _day("20240315") == prior - _day("20230315") != dt.timedelta(0)  # one offset
        assert dest.instance_count() == 15
        tags = {json.dumps(dest.get(f"/instances/{i}/simplified-tags")) for i in dest.get("/instances")}
        assert not any("COH0" in t or "ACC0A" in t or "Pat^" in t for t in tags)
        # the report never shows the pseudonym the map made, in any format
        assert made.pseudonym not in report(client, cid, "csv").data.decode()
        assert made.pseudonym not in report(client, cid, "json").data.decode()
        for role in ("user", "admin"):  # the token that submitted it, and an admin, see what the rows supplied
            book = openpyxl.load_workbook(io.BytesIO(report(client, cid, "xlsx", role).data), read_only=True)
            cells = [str(c) for r in book.worksheets[0].iter_rows(values_only=True) for c in r]
            assert "SUBJ-A" in cells and not any(made.pseudonym in c for c in cells), role
        for path in (f"/api/v1/cohorts/{cid}?rows=1", f"/api/v1/cohorts/{cid}/failed",
                     f"/api/v1/cohorts/{cid}/failed?format=xlsx", "/api/v1/cohorts"):
            resp = client.get(path, headers=auth("user"))
            assert resp.status_code == 200 and made.pseudonym.encode() not in resp.data, path
        assert b"WRONG-1" in client.get(f"/api/v1/cohorts/{cid}/failed", headers=auth("user")).data
        # any other token (here a read token) sees no pseudonym at all: a supplied one next to its
        # PatientID is a line of the map too; the other cells and the counters stay
        for fmt in ("csv", "json", "xlsx"):
            data = report(client, cid, fmt, "read").data
            blob = data.decode("utf-8-sig") if fmt != "xlsx" else " ".join(
                str(c) for r in openpyxl.load_workbook(io.BytesIO(data), read_only=True).worksheets[0].iter_rows(
                    values_only=True) for c in r)
            assert "SUBJ-A" not in blob and "WRONG-1" not in blob and made.pseudonym not in blob, fmt
            assert "COH0" in blob and "ACC0A" in blob, fmt
        as_read = report_rows(client, cid)
        assert as_read[2]["Pseudonym"] == "" and as_read[2]["PatientID"] == "COH0" and as_read[2]["sent"] == 5
        for path in (f"/api/v1/cohorts/{cid}?rows=1", f"/api/v1/cohorts/{cid}/failed",
                     f"/api/v1/cohorts/{cid}/failed?format=json"):
            resp = client.get(path, headers=auth("read"))
            assert resp.status_code == 200 and b"SUBJ-A" not in resp.data and b"WRONG-1" not in resp.data, path
        items = client.get(f"/api/v1/cohorts/{cid}?rows=1", headers=auth("read")).get_json()["items"]
        assert [i["cells"]["Pseudonym"] for i in items] == ["", "", "", ""]
        assert [i["cells"]["AccessionNumber"] for i in items] == ["ACC0A", "ACC0B", "ACC1A", "ACC2A"]



def test_a_patients_supplied_pseudonym_wins_over_an_earlier_row_without_one(app, client, hospital, tmp_path):
    pacs, _, _ = hospital
    projects = ProjectStore(app.extensions["pacsbridge"].ctx.index.engine)
    projects.create("lung", ProjectConfig(), SECRET.encode(), created_by="test")
    add_node(client, "pacs", pacs)  # two rows at a time
    with Orthanc(tmp_path / "dest", aet="PLATFORM") as dest:
        add_node(client, "platform", dest, identifiable=False, project="lung")
        # a dry run that names COH1's pseudonym; the map makes another one for COH1 before it is started
        first = [["PatientID", "AccessionNumber", "Pseudonym"], ["COH1", "ACC1A", "SUBJ-E"]]
        resp = submit_file(client, csv_bytes(first), "first.csv", node="pacs", project="lung", then="push:platform")
        early = resp.get_json()["id"]
        assert run(app, early)["state"] == "succeeded"
        rows = [["PatientID", "AccessionNumber", "Pseudonym"],
                ["COH2", "ACC2A", ""],          # 2: no pseudonym, before the row that names the patient's
                ["COH2", "ACC2B", "SUBJ-C"],    # 3
                ["COH0", "ACC0A", "SUBJ-C"],    # 4: the same pseudonym for another patient: refused
                ["COH1", "ACC1B", ""]]          # 5: the map makes COH1 a pseudonym
        resp = submit_file(client, csv_bytes(rows), "lung.csv", node="pacs", project="lung", then="push:platform",
                           start="1")
        assert resp.status_code == 202, resp.get_data(as_text=True)
        cid = resp.get_json()["id"]
        assert run(app, cid)["state"] == "partial"
        got = report_rows(client, cid)
        assert {n: r["state"] for n, r in got.items()} == {2: "done", 3: "done", 4: "refused", 5: "done"}, [
            r["reason"] for r in got.values()]
        assert "row 3 gives the pseudonym 'SUBJ-C' to another patient" in got[4]["reason"]
        held = _dest_studies(dest)
        made = projects.open("lung", SECRET.encode()).identity.peek("", "COH1")
        assert made is not None and set(held) == {"SUBJ-C", made.pseudonym} and len(held["SUBJ-C"]) == 2, held
        prior, study = (_day(d) for d in held["SUBJ-C"])
        assert study - _day("20240515") == prior - _day("20230515")
        # started now, the dry run's row is refused, and its reason does not quote the map
        assert client.post(f"/api/v1/cohorts/{early}/start", headers=auth("user")).status_code == 202
        assert run(app, early)["state"] == "failed"
        row = report_rows(client, early)[2]
        assert row["state"] == "refused" and "another pseudonym already" in row["reason"], row
        for fmt in ("csv", "json"):
            assert made.pseudonym not in report(client, early, fmt).data.decode()
        assert _dest_studies(dest) == held

# -- 4: bad input ---------------------------------------------------------------------------------------------
def _xlsx(rows: list[list[Any]]) -> bytes:
    book = openpyxl.Workbook()
    sheet = book.active
    for row in rows:
        sheet.append(row)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def test_bad_files_are_refused_and_excel_cells_and_non_ascii_are_read(app, client, hospital):
    pacs, _, _ = hospital
    add_node(client, "pacs", pacs)

    def refused(data: bytes, name: str, status: int = 400) -> dict[str, Any]:
        resp = submit_file(client, data, name, node="pacs")
        assert resp.status_code == status, (name, resp.status_code, resp.get_data(as_text=True)[:500])
        return dict(resp.get_json()["error"])

    assert "empty" in refused(b"", "empty.csv")["message"]
    binary = refused(bytes(range(256)) * 40, "scan.csv")
    assert "not a text file" in binary["message"], binary
    big = b"PatientID\r\n" + b"P1234567\r\n" * (50 * 1024 * 1024 // 10)
    refused(big, "big.csv", 413)
    huge_json = client.post("/api/v1/cohorts", data=json.dumps({"node": "pacs", "rows": [{"PatientID": "P" * 60}]
                                                                * 400_000}),
                            content_type="application/json", headers=auth("user"))
    assert huge_json.status_code == 413
    # a formula openpyxl wrote has no cached value: its row and column are named
    formula = refused(_xlsx([["PatientID", "StudyDate"], ["COH0", "=TODAY()"]]), "f.xlsx")
    assert {(p["row"], p["column"]) for p in formula["problems"]} == {(2, "StudyDate")}, formula
    assert not jobs_of(app, "cohort")

    # a date cell and a numeric PatientID in Excel; a pattern and UTF-8 text in CSV; duplicate rows
    book = _xlsx([["Patient ID", "Study Date"], [12345, dt.date(2024, 5, 1)], [12345, dt.datetime(2024, 5, 1)]])
    resp = submit_file(client, book, "excel.xlsx", node="pacs", start="1")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    cid = resp.get_json()["id"]
    assert run(app, cid)["state"] == "succeeded"
    got = report_rows(client, cid)
    assert got[2]["Patient ID"] == "12345" and got[2]["Study Date"] == "20240501", got[2]
    assert (got[2]["state"], got[2]["received"], got[3]["state"]) == ("done", 2, "duplicate"), got
    assert image_count(app) == 2
    text = ("PatientID,StudyDescription,AccessionNumber\n12345,Thorax*,\n12345,Thorax ä*,\n,,ÄCC\n12345,Thorax*,\n"
            "COH0,Thörax*,\n")
    resp = submit_file(client, text.encode(), "utf8.csv", node="pacs", start="1")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    cid = resp.get_json()["id"]
    run(app, cid)
    got = report_rows(client, cid)
    assert {n: (r["state"], r["held"]) for n, r in got.items()} == {
        2: ("done", 2), 3: ("done", 2), 4: ("done", 2), 5: ("duplicate", 0), 6: ("not_found", 0)}, got
    assert got[3]["StudyDescription"] == "Thorax ä*" and got[4]["AccessionNumber"] == "ÄCC"
    assert image_count(app) == 2 and len(jobs_of(app, "retrieve")) == 1  # held, not pulled twice
    failed = client.get(f"/api/v1/cohorts/{cid}/failed", headers=auth("read")).data.decode("utf-8-sig")
    assert failed.splitlines() == ["PatientID,StudyDescription,AccessionNumber", "COH0,Thörax*,"], failed


# -- 5 and 6: 10,000 rows; status while running; cancel, resume -------------------------------------------------
def _status(client, cid: str) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    resp = client.get(f"/api/v1/cohorts/{cid}", headers=auth("read"))
    took = time.monotonic() - t0
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json(), took


def _run_in_thread(app, cid: str) -> threading.Thread:
    worker = threading.Thread(target=run, args=(app, cid), daemon=True)
    worker.start()
    return worker


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@BOTH_DBS
def test_ten_thousand_rows_status_fast_cancel_and_resume(app, client, hospital):
    pacs, _, _ = hospital
    add_node(client, "pacs", pacs, max_associations=2)
    rows = [{"AccessionNumber": f"NONE{i:05d}"} for i in range(10_000)]
    t0 = time.monotonic()
    resp = client.post("/api/v1/cohorts", json={"node": "pacs", "rows": rows}, headers=auth("user"))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    submitted = time.monotonic() - t0
    body = resp.get_json()
    cid = body["id"]
    assert body["rows"] == 10_000 and body["states"] == {"pending": 10_000} and body["state"] == "queued"
    assert submitted < 30, submitted

    # the PACS's side: the associations open to it, counted by the kernel while the rows are asked
    sampler = ConnectionSampler(pacs.dicom_port).__enter__()
    worker = _run_in_thread(app, cid)

    def queried() -> int:
        return int(_status(client, cid)[0]["states"].get("not_found", 0))

    _wait(lambda: queried() >= 20)
    slowest = 0.0
    for _ in range(5):
        status, took = _status(client, cid)
        slowest = max(slowest, took)
        assert status["state"] == "running" and status["rows"] == 10_000 and status["stage"] == "query"
        assert sum(status["states"].values()) == 10_000 and set(status["states"]) <= {"pending", "not_found"}
        page = client.get(f"/api/v1/cohorts/{cid}?rows=1&state=not_found&limit=5", headers=auth("read")).get_json()
        assert len(page["items"]) == 5 and all(r["state"] == "not_found" for r in page["items"])
    assert slowest < 1.0, slowest
    _wait(lambda: queried() >= 200)
    sampler.__exit__()
    # never more than the node's 2 at once (and the sampler did see them: it is not blind)
    assert sampler.busy > 0 and 1 <= sampler.most <= 2, (sampler.most, sampler.peak, sampler.busy, sampler.samples)

    # a running cohort cannot be retried or resumed; cancel stops it between rows
    assert client.post(f"/api/v1/cohorts/{cid}/retry", headers=auth("user")).status_code == 409
    assert client.post(f"/api/v1/cohorts/{cid}/resume", headers=auth("user")).status_code == 409
    resp = client.post(f"/api/v1/cohorts/{cid}/cancel", headers=auth("user"))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    worker.join(30)
    assert not worker.is_alive()
    status, _ = _status(client, cid)
    assert status["state"] == "cancelled", status
    stopped = status["states"].get("not_found", 0)
    assert 20 <= stopped < 10_000 and stopped + status["states"].get("pending", 0) == 10_000, status
    time.sleep(1)
    assert _status(client, cid)[0]["states"] == status["states"]  # nothing runs on

    # resume: goes on with the pending rows, the ones queried are not asked again
    resp = client.post(f"/api/v1/cohorts/{cid}/resume", headers=auth("user"))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    worker = _run_in_thread(app, cid)
    _wait(lambda: queried() >= stopped + 20)
    client.post(f"/api/v1/cohorts/{cid}/cancel", headers=auth("user"))
    worker.join(30)
    status, _ = _status(client, cid)
    assert status["state"] == "cancelled" and sum(status["states"].values()) == 10_000
    assert status["states"]["not_found"] >= stopped + 20


def _orthanc_study(pacs: Orthanc, study_uid: str) -> str:
    found = pacs.request("POST", "/tools/lookup", study_uid.encode(), "text/plain")
    return str(next(f["ID"] for f in found if f["Type"] == "Study"))


def test_cancel_resume_and_retry_run_only_the_rows_not_done(app, client, hospital):
    pacs, studies, files = hospital
    add_node(client, "pacs", pacs, max_associations=1)
    accessions = [a for a in sorted(studies) if not a.startswith("ACC2")]  # 2 patients x (study, prior)
    rows = [{"AccessionNumber": a} for a in accessions]

    # cancelled while it moves, then resumed: every row done, every instance once
    resp = client.post("/api/v1/cohorts", json={"node": "pacs", "rows": rows, "start": True}, headers=auth("user"))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    cid = resp.get_json()["id"]
    worker = _run_in_thread(app, cid)
    _wait(lambda: bool({"transferring", "done"} & set(_status(client, cid)[0]["states"])))
    assert _status(client, cid)[0]["stage"] == "transfer"
    assert client.post(f"/api/v1/cohorts/{cid}/cancel", headers=auth("user")).status_code == 200
    worker.join(60)
    assert not worker.is_alive()
    status = _status(client, cid)[0]
    assert status["state"] == "cancelled" and status["states"].get("found"), status  # rows left to move
    assert "transferring" not in status["states"]
    resp = client.post(f"/api/v1/cohorts/{cid}/resume", headers=auth("user"))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert run(app, cid)["state"] == "succeeded"
    got = report_rows(client, cid)
    assert {r["state"] for r in got.values()} == {"done"} and all(r["received"] == 5 for r in got.values()), got
    assert image_count(app) == 20

    # a study gone from the PACS between the dry run and the transfer: that row fails, the others are done;
    # back on the PACS, retry runs that row only
    gone = [f for f in files.glob("*.dcm") if f.name.startswith("ACC2B-")]
    resp = client.post("/api/v1/cohorts", json={"node": "pacs", "rows": [
        {"PatientID": "COH2", "AccessionNumber": a} for a in ("ACC2A", "ACC2B", "NOPE")]}, headers=auth("user"))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    cid = resp.get_json()["id"]
    assert run(app, cid)["state"] in ("succeeded", "partial")
    pacs.request("DELETE", f"/studies/{_orthanc_study(pacs, studies['ACC2B']['study'])}")
    assert client.post(f"/api/v1/cohorts/{cid}/start", headers=auth("user")).status_code == 202
    result = run(app, cid)
    got = report_rows(client, cid)
    assert result["state"] == "partial", (result, got)
    done_jobs = {n: r["jobs"] for n, r in got.items()}
    assert [got[n]["state"] for n in (1, 2, 3)] == ["done", "failed", "not_found"], got
    assert got[1]["received"] == 5 and got[2]["received"] == 0 and "retrieve" in got[2]["reason"], got
    pacs.upload(sorted(gone))
    assert client.post(f"/api/v1/cohorts/{cid}/retry", headers=auth("user")).status_code == 202
    assert run(app, cid)["state"] == "partial"
    again = report_rows(client, cid)
    assert [again[n]["state"] for n in (1, 2, 3)] == ["done", "done", "not_found"], again
    assert again[1]["jobs"] == done_jobs[1]  # the done row did not run again
    assert again[2]["received"] == 5 and len(again[2]["jobs"].split()) == 2  # the failed retrieve, the new one
    assert image_count(app) == 30



def test_rows_sharing_a_study_pull_it_once(app, client, hospital):
    """Three rows naming one study (a patient's row, its study UID, its accession), two at a time: one
    retrieve pulls it; the rows that waited for it find it held, and make no child retrieve for it."""
    pacs, studies, _ = hospital
    add_node(client, "pacs", pacs, max_associations=2)
    rows = [{"PatientID": "COH1"}, {"StudyInstanceUID": studies["ACC1A"]["study"]},
            {"PatientID": "COH1", "AccessionNumber": "ACC1A"}]
    resp = client.post("/api/v1/cohorts", json={"node": "pacs", "rows": rows, "start": True}, headers=auth("user"))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    cid = resp.get_json()["id"]
    assert run(app, cid)["state"] == "succeeded"
    got = report_rows(client, cid)
    assert {n: (r["state"], r["received"]) for n, r in got.items()} == {1: ("done", 11), 2: ("done", 5),
                                                                        3: ("done", 5)}, got
    # whichever row took the study's lock first pulled it; the C-GETs fetched each instance once
    retrieves = [app.extensions["pacsbridge"].jobs.get(j.id) for j in jobs_of(app, "retrieve")]
    asked = [uid for j in retrieves for uid in j.params["query"]["StudyInstanceUID"]]
    assert len(asked) == len(set(asked)) == 3 and len(retrieves) <= 2, asked
    assert sum(j.result["suboperations"]["completed"] for j in retrieves) == 11
    assert sum(bool(r["jobs"]) for r in got.values()) == len(retrieves) and got[3]["jobs"] == ""
    assert image_count(app) == 11


def test_start_of_a_cancelled_dry_run_is_refused_and_changes_nothing(app, client, hospital):
    pacs, _, _ = hospital
    add_node(client, "pacs", pacs)
    resp = client.post("/api/v1/cohorts", json={"node": "pacs", "rows": [{"PatientID": "COH2"}]}, headers=auth("user"))
    cid = resp.get_json()["id"]
    assert client.post(f"/api/v1/cohorts/{cid}/cancel", headers=auth("user")).get_json()["state"] == "cancelled"
    resp = client.post(f"/api/v1/cohorts/{cid}/start", headers=auth("user"))
    assert resp.status_code == 409 and "resume" in resp.get_json()["error"]["message"]
    assert _status(client, cid)[0]["transfer"] is False  # still a dry run
    assert client.post(f"/api/v1/cohorts/{cid}/resume", headers=auth("user")).status_code == 202
    assert run(app, cid)["state"] == "succeeded"
    assert _status(client, cid)[0]["states"] == {"found": 1} and image_count(app) == 0
    assert client.post(f"/api/v1/cohorts/{cid}/start", headers=auth("user")).status_code == 202
    assert run(app, cid)["state"] == "succeeded"
    assert report_rows(client, cid)[1]["received"] == 10 and image_count(app) == 10

# -- 7: who may do what ---------------------------------------------------------------------------------------------
def test_read_tokens_cannot_submit_and_project_tokens_reach_no_cohort_route(app, client):
    lab = {"Authorization": f"Bearer {LAB}"}
    data = csv_bytes([["PatientID"], ["COH0"]])
    assert submit_file(client, data, "c.csv", role="read", node="pacs").status_code == 403
    assert client.post("/api/v1/cohorts", json={"node": "pacs", "rows": [{"PatientID": "X"}]},
                       headers=auth("read")).status_code == 403
    app.extensions["pacsbridge"].jobs.add_node(Node("pacs", "ORTHANC", "127.0.0.1", free_port(), retrieve="get"))
    resp = client.post("/api/v1/cohorts", json={"node": "pacs", "rows": [{"PatientID": "X"}]}, headers=auth("user"))
    assert resp.status_code == 202, resp.get_data(as_text=True)
    cid = resp.get_json()["id"]
    for action in ("start", "cancel", "resume", "retry"):
        assert client.post(f"/api/v1/cohorts/{cid}/{action}", headers=auth("read")).status_code == 403, action
    routes = [r for r in app.url_map.iter_rules() if r.endpoint.startswith("cohorts.")]
    assert len(routes) >= 9
    for rule in routes:
        path = rule.rule.replace("<job_id>", cid)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            resp = client.open(path, method=method, headers=lab, json={"node": "pacs", "rows": [{"PatientID": "X"}]}
                               if method == "POST" else None)
            assert resp.status_code == 403, (method, path, resp.status_code)
            assert "serves project" in resp.get_json()["error"]["message"]
    # the read token may look
    assert client.get(f"/api/v1/cohorts/{cid}", headers=auth("read")).status_code == 200
    assert client.get("/api/v1/cohorts", headers=auth("read")).get_json()["total"] == 1
