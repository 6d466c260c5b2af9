"""The ``cohort`` job against a real Orthanc (issue 17), run in-process: rows resolved to found, held,
missing, ambiguous and duplicate; the dry run moves nothing; the transfer pulls what is missing only,
each study once; pseudonyms that contradict the map or each other are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from pacsbridge.shared.cohorts.store import CohortRow, CohortStore
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.jobs.store import JobStore
from pacsbridge.worker import runner

from .helpers import make_instance
from .orthanc import Orthanc


def make_hospital(root: Path) -> dict[str, dict[str, object]]:
    """Three patients with a study and its prior a year before (two series each), and an accession
    number that two patients share (a PACS that reuses them). ``{accession: {patient, study, n}}``."""
    out: dict[str, dict[str, object]] = {}
    for p in range(3):
        for year, acc in ((2024, f"ACC{p}A"), (2023, f"ACC{p}B")):
            study = generate_uid()
            n = 0
            for s, size in enumerate((3, 2)):
                series = generate_uid()
                for i in range(size):
                    make_instance(root / f"{acc}-{s}-{i}.dcm", PatientID=f"COH{p}", PatientName=f"Pat^{p}",
                                  AccessionNumber=acc, StudyInstanceUID=study, SeriesInstanceUID=series,
                                  StudyDate=f"{year}0{p + 3}15", SeriesNumber=s + 1, InstanceNumber=i + 1,
                                  Modality="CT" if s == 0 else "MR")
                    n += 1
            out[acc] = {"patient": f"COH{p}", "study": study, "n": n}
    shared = generate_uid()  # one accession, two patients
    for p in (0, 1):
        make_instance(root / f"shared-{p}.dcm", PatientID=f"COH{p}", AccessionNumber="SHARED",
                      StudyInstanceUID=generate_uid() if p else shared, StudyDate="20220101")
    return out


@pytest.fixture
def hospital(tmp_path):
    files = tmp_path / "files"
    studies = make_hospital(files)
    with Orthanc(tmp_path / "orthanc", modalities={"pb": ("PACSBRIDGE", "127.0.0.1", 11112)}) as pacs:
        pacs.upload(sorted(files.glob("*.dcm")))
        yield pacs, studies


def _cohort(jobs: JobStore, store: CohortStore, specs: list[dict], *, transfer: bool, then=None) -> str:
    job, _ = jobs.submit("cohort", {"rows": generate_uid()}, node="pacs")
    rows = [CohortRow(number=i + 2, cells={k: str(v) for k, v in s.items() if k != "dup"}, spec=s,
                      duplicate_of=s.get("dup")) for i, s in enumerate(specs)]
    store.create(job.id, format="csv", form={"headers": ["PatientID", "AccessionNumber"]}, rows=rows,
                 then=then or {}, transfer=transfer)
    return job.id


def test_query_then_transfer_each_study_once(ctx, hospital):
    pacs, studies = hospital
    jobs = JobStore(ctx.index.engine)
    jobs.add_node(Node("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port, retrieve="get"))
    store = CohortStore(ctx.index.engine)
    specs = [{"AccessionNumber": "ACC0A"},                       # 2: found
             {"PatientID": "COH1"},                              # 3: found, three studies
             {"AccessionNumber": "NOPE"},                        # 4: not found
             {"AccessionNumber": "SHARED"},                      # 5: ambiguous (two patients)
             {"AccessionNumber": "ACC0A", "dup": 2},             # 6: duplicate of row 2
             {"StudyInstanceUID": studies["ACC1A"]["study"]}]    # 7: a study row 3 also pulls
    cid = _cohort(jobs, store, specs, transfer=False)
    done = runner.run_job(cid, ctx, jobs)
    assert done is not None and done.state == "partial", (done.state, done.error)
    rows = {r.number: r for r in store.rows(cid)}
    assert [rows[n].state for n in range(2, 8)] == ["found", "found", "not_found", "ambiguous", "duplicate",
                                                    "found"], [(r.number, r.state, r.reason) for r in rows.values()]
    assert rows[2].expected == 5 and len(rows[2].studies) == 1 and rows[2].series == 2
    assert rows[3].expected == 11 and len(rows[3].studies) == 3  # the study, its prior, the shared accession
    assert rows[2].patient_id == "COH0"
    assert "2 patients" in rows[5].reason
    assert ctx.index.count("Image") == 0  # a dry run moves nothing

    store.set_transfer(cid, True)
    jobs.retry(cid, states=("partial",))
    done = runner.run_job(cid, ctx, jobs)
    assert done is not None and done.state == "partial", (done.state, done.error)
    rows = {r.number: r for r in store.rows(cid)}
    assert [rows[n].state for n in range(2, 8)] == ["done", "done", "not_found", "ambiguous", "duplicate", "done"]
    assert rows[2].received == 5 and rows[3].received + rows[7].received >= 11
    assert ctx.index.count("Image") == 16  # each instance once
    # row 7's study was pulled by row 3 (or the other way round): held by then, or pulled once
    assert rows[7].received == 5

    # a second cohort asking the same: everything is held, nothing pulled again
    again = _cohort(jobs, store, [{"AccessionNumber": "ACC0A"}], transfer=True)
    done = runner.run_job(again, ctx, jobs)
    assert done is not None and done.state == "succeeded", done.error
    row = store.rows(again)[0]
    assert row.state == "done" and row.held == 5 and not row.children


def test_a_mass_chunk_of_several_patients_is_found_not_ambiguous(ctx, hospital):
    """A mass-transfer chunk names a date range, no patient: the studies of every patient that day are what
    it asks for (each chunk of a busy day ended ``ambiguous`` before, and nothing moved)."""
    from pacsbridge.shared.cohorts.mass import MassRequest, chunk_rows

    pacs, _ = hospital
    jobs = JobStore(ctx.index.engine)
    jobs.add_node(Node("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port, retrieve="get"))
    store = CohortStore(ctx.index.engine)
    (cells, spec), = chunk_rows(MassRequest.model_validate({"from": "20220101", "to": "20220101", "chunk": "day"}))
    job, _ = jobs.submit("cohort", {"rows": generate_uid()}, node="pacs")
    store.create(job.id, format="json", form={"headers": list(cells), "dialect": {"wrapper": "list"}, "mass": True},
                 rows=[CohortRow(number=1, cells=cells, spec=spec)], then={}, transfer=False)
    done = runner.run_job(job.id, ctx, jobs)
    assert done is not None and done.state == "succeeded", (done.state, done.error)
    row = store.rows(job.id)[0]
    assert row.state == "found" and len(row.studies) == 2, (row.state, row.reason)  # COH0's and COH1's


def test_a_c_get_retrieve_waits_for_the_nodes_window_and_can_be_cancelled_meanwhile(ctx, hospital):
    """The move window is the PACS's: a C-GET retrieve (not only a C-MOVE) waits outside it, pulls
    nothing, says why in its log, and stops at once on a cancel."""
    import datetime as dt
    import threading
    import time

    pacs, studies = hospital
    hour = dt.datetime.now().hour
    closed = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"  # never now
    jobs = JobStore(ctx.index.engine)
    jobs.add_node(Node("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port, retrieve="get", move_window=closed))
    job, _ = jobs.submit("retrieve", {"query": {"AccessionNumber": "ACC0A"}}, node="pacs")
    done: list = []
    worker = threading.Thread(target=lambda: done.append(runner.run_job(job.id, ctx, jobs)))
    worker.start()
    time.sleep(3)
    assert jobs.get(job.id).state == "running" and ctx.index.count("Image") == 0  # waiting, nothing pulled
    jobs.cancel(job.id)
    worker.join(timeout=20)
    assert not worker.is_alive() and done and done[0].state == "cancelled"
    assert ctx.index.count("Image") == 0


def test_a_partly_held_study_pulls_only_what_is_missing(ctx, hospital, tmp_path):
    """Held is checked per SOP against the node's instance list, and only the missing instances move.

    ACC0A: its MR series (2) is indexed whole, its CT series (3) one instance of three: the study is not
    held, the MR series is not asked for, the CT series pulls its 2 missing instances. ACC1A: its CT
    series has 3 instances indexed, as many as the node lists, but one is not the node's (an instance the
    node never had, with the series' UID): counts alone would call it held; it pulls the 1 missing. Its
    MR series (2) is not here at all. 5 instances pulled in all, each once."""
    import pydicom

    from pacsbridge.shared.index.importer import Importer

    pacs, studies = hospital
    files = tmp_path / "files"
    held = tmp_path / "held"
    held.mkdir()
    for name in ("ACC0A-1-0", "ACC0A-1-1", "ACC0A-0-0", "ACC1A-0-0", "ACC1A-0-1"):
        (held / f"{name}.dcm").write_bytes((files / f"{name}.dcm").read_bytes())
    stranger = pydicom.dcmread(files / "ACC1A-0-2.dcm")
    stranger.SOPInstanceUID = generate_uid()  # the series' UID, the node does not have it
    stranger.file_meta.MediaStorageSOPInstanceUID = stranger.SOPInstanceUID
    stranger.save_as(held / "stranger.dcm")
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([held])
    assert report.stored == 6 and not report.rejected, report.rejected
    sops_before = {r[0] for r in ctx.index.run_sql("select SOPInstanc from DICOMImages")[1]}

    jobs = JobStore(ctx.index.engine)
    jobs.add_node(Node("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port, retrieve="get"))
    store = CohortStore(ctx.index.engine)
    cid = _cohort(jobs, store, [{"AccessionNumber": "ACC0A"}, {"AccessionNumber": "ACC1A"}], transfer=False)
    done = runner.run_job(cid, ctx, jobs)
    assert done is not None and done.state == "succeeded", (done.state, done.error)
    rows = {r.number: r for r in store.rows(cid)}
    assert [(rows[n].state, rows[n].expected, rows[n].held) for n in (2, 3)] == [("found", 5, 2), ("found", 5, 0)]
    series_held = {n: sorted((s["expected"], s["held"]) for st in rows[n].studies for s in st["series"])
                   for n in (2, 3)}
    assert series_held == {2: [(2, True), (3, False)], 3: [(2, False), (3, False)]}, series_held
    assert ctx.index.count("Image") == 6  # the dry run moved nothing

    store.set_transfer(cid, True)
    jobs.retry(cid, states=("succeeded",))
    done = runner.run_job(cid, ctx, jobs)
    assert done is not None and done.state == "succeeded", (done.state, done.error)
    rows = {r.number: r for r in store.rows(cid)}
    assert [(rows[n].state, rows[n].received) for n in (2, 3)] == [("done", 5), ("done", 5)], rows
    retrieves = [jobs.get(c) for n in (2, 3) for c in rows[n].children]
    assert len(retrieves) == 2 and all(j.kind == "retrieve" and j.state == "succeeded" for j in retrieves)
    # the MR series of ACC0A (held) was not asked for; C-GET moved the 5 missing instances, no more
    assert studies["ACC0A"]["study"] in retrieves[0].params["query"]["StudyInstanceUID"]
    assert len(retrieves[0].params["query"]["SeriesInstanceUID"]) == 1
    assert [j.result["suboperations"]["completed"] for j in retrieves] == [2, 3]
    sops = [r[0] for r in ctx.index.run_sql("select SOPInstanc from DICOMImages")[1]]
    assert len(sops) == len(set(sops)) == 11 and sops_before <= set(sops)


def test_rows_naming_series_modalities_and_dates(ctx, hospital, tmp_path):
    """The optional fields of a row, end to end: a study's one series, a series the node does not have,
    a modality (the series of it only), a date range (the prior only)."""
    from pydicom import dcmread

    pacs, studies = hospital
    ct = str(dcmread(tmp_path / "files" / "ACC0A-0-0.dcm").SeriesInstanceUID)
    jobs = JobStore(ctx.index.engine)
    jobs.add_node(Node("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port, retrieve="get"))
    store = CohortStore(ctx.index.engine)
    study = studies["ACC0A"]["study"]
    specs = [{"StudyInstanceUID": study, "SeriesInstanceUID": [ct]},                      # 2: its 3 CT
             {"StudyInstanceUID": study, "SeriesInstanceUID": [ct, "1.2.3.999"]},         # 3: one is not there
             {"StudyInstanceUID": study, "SeriesInstanceUID": ["1.2.3.999"]},             # 4: none there
             {"PatientID": "COH1", "Modality": ["MR"]},                                   # 5: the MR series, 2 x 2
             {"PatientID": "COH2", "min_date": "20230101", "max_date": "20231231"}]       # 6: the prior
    cid = _cohort(jobs, store, specs, transfer=True)
    done = runner.run_job(cid, ctx, jobs)
    assert done is not None and done.state == "partial", (done.state, done.error)
    rows = {r.number: r for r in store.rows(cid)}
    got = {n: (r.state, r.series, r.expected, r.received) for n, r in rows.items()}
    # row 3 moved what the node has, and is short of the series it does not: partial, with the reason
    assert got == {2: ("done", 1, 3, 3), 3: ("partial", 1, 3, 3), 4: ("not_found", 0, 0, 0),
                   5: ("done", 2, 4, 4), 6: ("done", 2, 5, 5)}, [(r.number, r.state, r.reason) for r in rows.values()]
    assert rows[3].reason == "series not on the node: 1.2.3.999", rows[3].reason
    assert rows[6].studies[0]["uid"] == studies["ACC2B"]["study"] and len(rows[6].studies) == 1
    assert ctx.index.count("Image") == 3 + 4 + 5


def test_a_node_that_cannot_be_asked_fails_each_row_with_the_reason(ctx):
    """Nothing listens where the node is: every row ends ``failed`` with the node's error, not
    ``not_found`` (which would say the PACS has nothing), and the dry run fails."""
    from .orthanc import free_port

    jobs = JobStore(ctx.index.engine)
    jobs.add_node(Node("pacs", "NOBODY", "127.0.0.1", free_port(), retrieve="get"))
    store = CohortStore(ctx.index.engine)
    cid = _cohort(jobs, store, [{"AccessionNumber": "ACC0A"}, {"PatientID": "COH1"}], transfer=False)
    done = runner.run_job(cid, ctx, jobs)
    assert done is not None and done.state == "failed", (done.state, done.error)
    assert "2 failed" in done.error
    rows = store.rows(cid)
    assert [r.state for r in rows] == ["failed", "failed"]
    assert all(r.reason.startswith("query failed: ") and "unreachable" in r.reason for r in rows), rows[0].reason


def test_a_cohort_asks_outside_the_move_window_and_pulls_only_inside_it(ctx, hospital):
    """The window is the PACS's for moves: the query stage runs outside it, the transfer waits (nothing
    pulled), and a cancel meanwhile leaves the row cancelled with what it found (resume moves it on)."""
    import datetime as dt
    import threading
    import time

    pacs, _ = hospital
    hour = dt.datetime.now().hour
    closed = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"  # never now
    jobs = JobStore(ctx.index.engine)
    jobs.add_node(Node("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port, retrieve="get", move_window=closed))
    store = CohortStore(ctx.index.engine)
    cid = _cohort(jobs, store, [{"AccessionNumber": "ACC0A"}], transfer=True)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(runner.run_job(cid, ctx, jobs)))
    worker.start()
    deadline = time.monotonic() + 30
    while store.rows(cid)[0].state != "transferring":
        assert time.monotonic() < deadline and worker.is_alive(), store.rows(cid)[0]
        time.sleep(0.1)
    row = store.rows(cid)[0]
    assert row.expected == 5 and len(row.children) == 1  # asked outside the window; its retrieve waits
    time.sleep(2)
    assert ctx.index.count("Image") == 0 and jobs.get(row.children[0]).state == "running"
    jobs.cancel(cid)
    worker.join(timeout=30)
    assert not worker.is_alive() and done and done[0].state == "cancelled"
    row = store.rows(cid)[0]
    assert row.state == "cancelled" and row.studies and ctx.index.count("Image") == 0
    assert jobs.get(row.children[0]).state == "cancelled"
