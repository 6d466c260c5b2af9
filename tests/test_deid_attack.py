"""A data protection officer's red team against the de-identification of issue 16: what a research
platform (a ``user`` token, a node marked ``identifiable: false``) could get or do that it should not.

Each test is one finding, reproduced with real parts (the index, storage, the map in the database,
the worker's runner, the API's test client); a finding not fixed yet is ``xfail(strict=True)`` with
the reason, so that its fix turns it into a failure to be unmarked."""

from __future__ import annotations

import io
import struct
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from pacsbridge.api import create_app
from pacsbridge.shared.deid.keys import KeyedIdentity, ProjectKey
from pacsbridge.shared.deid.options import ProjectConfig
from pacsbridge.shared.deid.outgoing import Outgoing
from pacsbridge.shared.deid.profile import Profile
from pacsbridge.shared.deid.projects import ProjectStore
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.index.context import open_context
from pacsbridge.shared.jobs.spec import validate
from pacsbridge.shared.jobs.store import JobStore
from pacsbridge.worker import runner

from .helpers import TEST_FILES
from .orthanc import free_port
from .test_api import TOKEN_SPEC, auth
from .test_push import load

SECRET = "0123456789abcdef0123456789abcdef-deid"


@pytest.fixture
def dctx(settings, tmp_path, request):
    duplicates = getattr(request, "param", "keep")
    context = open_context(settings.with_(deid_secret=SECRET, export_root=tmp_path / "export",
                                          results_root=tmp_path / "results", duplicates=duplicates))
    context.index.create()
    context.storage.ensure()
    yield context
    context.index.engine.dispose()


@pytest.fixture
def jobs(dctx) -> JobStore:
    return JobStore(dctx.index.engine)


def _patient(dctx, folder: Path, patient_id: str, name: str, study_date: str = "20240117") -> pydicom.Dataset:
    """pydicom's CT_small.dcm made one study of its own patient (new UIDs), stored and indexed."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.PatientID, ds.PatientName, ds.StudyDate = patient_id, name, study_date
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(folder / f"{patient_id}.dcm", enforce_file_format=True)
    load(dctx, folder)
    return ds


def _send(dctx, project: str, *sops: str) -> dict[str, pydicom.Dataset]:
    """What a download under ``project`` gives the platform (the map written, as a job's)."""
    out = Outgoing(ProjectStore(dctx.index.engine).open(project, SECRET.encode()), "test", "download", "client")
    sent = {}
    for sop in sops:
        (row,) = dctx.index.files_for(sops=[sop])
        made = out(str(dctx.storage.absolute(row["ObjectFile"])))
        assert made.data is not None, made.reason
        sent[sop] = pydicom.dcmread(io.BytesIO(made.data))
    out.close()
    return sent


def _bring_home(dctx, jobs, project: str, ds: pydicom.Dataset):
    """The results route's work (the file under PACSBRIDGE_RESULTS_ROOT, a results job) run by a worker."""
    folder = Path(dctx.settings.results_root) / project
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    (folder / "back.dcm").write_bytes(buf.getvalue())
    job, _ = jobs.submit("results", {"project": project, "file": f"{project}/back.dcm"}, owner="platform")
    return runner.run_job(job.id, dctx, jobs)


@pytest.mark.parametrize("dctx", ["keep", "replace"], indirect=True)
def test_a_returned_instance_cannot_take_the_sop_instance_uid_of_an_original(dctx, jobs, tmp_path):
    """The platform sends back a de-identified image it received (altered: its pixels, its description):
    its SOP Instance and Series UIDs are in the map, so re-identification turned them into the
    original's, and the result was stored as the original image itself (with duplicates=replace the
    clinical original is overwritten by the platform's version; with keep the job says it succeeded and
    stored nothing). A result is a new object: its own SOP Instance UID must not be one the project made."""
    ct = _patient(dctx, tmp_path / "in", "MRN-1", "DOE^JOHN")
    ProjectStore(dctx.index.engine).create("p", ProjectConfig(), SECRET.encode(), created_by="test")
    deid = _send(dctx, "p", ct.SOPInstanceUID)[ct.SOPInstanceUID]
    (row,) = dctx.index.files_for(sops=[ct.SOPInstanceUID])
    original = dctx.storage.absolute(row["ObjectFile"]).read_bytes()
    deid.SeriesDescription = "altered by the platform"
    job = _bring_home(dctx, jobs, "p", deid)
    assert dctx.storage.absolute(row["ObjectFile"]).read_bytes() == original, "the original was overwritten"
    assert job.state == "failed" and ct.SOPInstanceUID not in job.error, (job.state, job.error)
    assert "SOPInstanceUID" in job.error
    assert len(dctx.index.files_for(sops=[ct.SOPInstanceUID])) == 1


def _result_of(deid: pydicom.Dataset) -> pydicom.Dataset:
    """A result made on ``deid``: the same header, a new instance in a new series, referencing it."""
    result = pydicom.dcmread(io.BytesIO(_bytes(deid)))
    result.SeriesInstanceUID, result.SeriesDescription = generate_uid(), "result"
    result.SOPInstanceUID = result.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ref = pydicom.Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = deid.SOPClassUID, deid.SOPInstanceUID
    result.SourceImageSequence = [ref]
    return result


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_result_cannot_mix_two_patients_of_the_project(dctx, jobs, tmp_path):
    """The platform names patient A (its pseudonym) on a result whose study (or source image) is patient
    B's: re-identification restored B's identity from B's stored study, moved the dates back by A's
    offset, and audited it as A's: a result filed under the wrong patient, with wrong dates, and an
    audit that names another patient than the one it was filed under."""
    a = _patient(dctx, tmp_path / "a", "MRN-A", "ALPHA^ANN")
    b = _patient(dctx, tmp_path / "b", "MRN-B", "BETA^BOB")
    ProjectStore(dctx.index.engine).create("p", ProjectConfig(), SECRET.encode(), created_by="test")
    sent = _send(dctx, "p", a.SOPInstanceUID, b.SOPInstanceUID)
    deid_a, deid_b = sent[a.SOPInstanceUID], sent[b.SOPInstanceUID]
    assert deid_a.PatientID != deid_b.PatientID

    mixed = _result_of(deid_b)  # B's study and source image ...
    mixed.PatientID = deid_a.PatientID  # ... under A's pseudonym
    job = _bring_home(dctx, jobs, "p", mixed)
    assert job.state == "failed", (job.state, job.error, job.result)
    assert not dctx.index.files_for(sops=[mixed.SOPInstanceUID])

    crossed = _result_of(deid_a)  # A's study, but its source image is B's
    crossed.SourceImageSequence[0].ReferencedSOPInstanceUID = deid_b.SOPInstanceUID
    job = _bring_home(dctx, jobs, "p", crossed)
    assert job.state == "failed", (job.state, job.error, job.result)
    assert "MRN" not in job.error and a.StudyInstanceUID not in job.error
    assert not dctx.index.files_for(sops=[crossed.SOPInstanceUID])

    honest = _result_of(deid_a)  # and the honest result still comes home under A
    job = _bring_home(dctx, jobs, "p", honest)
    assert job.state == "succeeded", (job.error, job.result)
    (row,) = dctx.index.files_for(sops=[honest.SOPInstanceUID])
    assert row["study"] == a.StudyInstanceUID


def test_a_project_job_read_by_a_non_admin_token_names_no_original_identifier(dctx, jobs, tmp_path):
    """A job under a project shows only admins its original identifiers (it showed any `read` token its
    series' UIDs, patient and failures); read and user tokens get the webhook's redacted view."""
    ct = _patient(dctx, tmp_path / "in", "MRN-770011", "DOE^JOHN")
    ProjectStore(dctx.index.engine).create("p", ProjectConfig(), SECRET.encode(), created_by="test")
    # a research node that is down: the job fails, as a push to a platform does when it is unreachable
    jobs.add_node(Node("platform", "PLATFORM", "127.0.0.1", free_port(), project="p", identifiable=False))
    kind, node, params, hook = validate({"kind": "push", "node": "platform",
                                         "selection": {"StudyInstanceUID": [ct.StudyInstanceUID]}})
    job = runner.run_job(jobs.submit(kind, params, node, hook, owner="uma")[0].id, dctx, jobs)
    assert job.state == "failed" and job.params["project"] == "p"
    app = create_app({"SETTINGS": dctx.settings.with_(api_tokens=TOKEN_SPEC, listener_port=free_port(),
                                                      broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}"),
                      "TESTING": True})
    try:
        client = app.test_client()
        for role in ("read", "user"):
            for path in (f"/api/v1/jobs/{job.id}", "/api/v1/jobs"):
                seen = client.get(path, headers=auth(role))
                assert seen.status_code == 200
                text = seen.get_data(as_text=True)
                for original in (ct.PatientID, ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID):
                    assert original not in text, (role, path, original)
        full = client.get(f"/api/v1/jobs/{job.id}", headers=auth("admin")).get_data(as_text=True)
        assert ct.StudyInstanceUID in full  # an admin sees the job as it is
    finally:
        app.extensions["pacsbridge"].close()


def test_a_platform_token_sends_results_home_and_reads_its_jobs_and_nothing_else(dctx, jobs, tmp_path):
    """``project=NAME`` tokens (a research platform's): results to their project and their own jobs,
    redacted; the identifiable index, files, other projects and other jobs are refused."""
    ct = _patient(dctx, tmp_path / "in", "MRN-770011", "DOE^JOHN")
    for name in ("p", "other"):
        ProjectStore(dctx.index.engine).create(name, ProjectConfig(), SECRET.encode(), created_by="test")
    lab = {"Authorization": "Bearer lab-token-0123456789abcdef"}
    app = create_app({"SETTINGS": dctx.settings.with_(
        api_tokens=TOKEN_SPEC + ",lab:lab-token-0123456789abcdef:project=p", listener_port=free_port(),
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}"), "TESTING": True})
    try:
        client = app.test_client()
        got = client.get(f"/api/v1/instances/{ct.SOPInstanceUID}/file?project=p", headers=auth("read"))
        assert got.status_code == 200
        for path in ("/api/v1/patients", "/api/v1/studies", f"/api/v1/instances/{ct.SOPInstanceUID}/file",
                     f"/api/v1/instances/{ct.SOPInstanceUID}/file?project=p", "/api/v1/jobs", "/api/v1/nodes",
                     "/api/v1/projects", "/api/v1/projects/p/map", "/api/v1/audit"):
            assert client.get(path, headers=lab).status_code == 403, path
        body = {**lab, "Content-Type": "application/dicom"}
        assert client.post("/api/v1/projects/other/results", data=got.data, headers=body).status_code == 403
        assert client.post("/api/v1/jobs", json={"kind": "repack", "selection": {"PatientID": "MRN-770011"},
                                                 "dest": "x"}, headers=lab).status_code == 403
        sent = client.post("/api/v1/projects/p/results", data=got.data, headers=body)
        assert sent.status_code == 202, sent.get_data(as_text=True)
        mine = client.get(f"/api/v1/jobs/{sent.get_json()['id']}", headers=lab)
        assert mine.status_code == 200 and mine.get_json()["params"] == {"project": "p"}
        assert ct.PatientID not in mine.get_data(as_text=True)
        theirs, _ = jobs.submit("import", {"path": "x"}, owner="uma")
        assert client.get(f"/api/v1/jobs/{theirs.id}", headers=lab).status_code == 404
    finally:
        app.extensions["pacsbridge"].close()


def test_a_result_for_a_patient_with_a_non_ascii_name_comes_home_with_the_name_intact(dctx, jobs, tmp_path):
    """The original names its patient in UTF-8 (ISO_IR 192); the platform's result says nothing of a
    character set (de-identified data are ASCII). The restored name must keep its characters (the
    result's SpecificCharacterSet follows what is restored), and the job may not fail on it, nor name
    the patient in its error."""
    folder = tmp_path / "in"
    folder.mkdir()
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID, ds.PatientName = "MRN-UTF", "MÜLLER^JÖRG^ŁUKASZ"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(folder / "utf.dcm", enforce_file_format=True)
    load(dctx, folder)
    ProjectStore(dctx.index.engine).create("p", ProjectConfig(), SECRET.encode(), created_by="test")
    deid = _send(dctx, "p", ds.SOPInstanceUID)[ds.SOPInstanceUID]
    result = _result_of(deid)
    if "SpecificCharacterSet" in result:
        del result.SpecificCharacterSet
    job = _bring_home(dctx, jobs, "p", result)
    assert "MÜLLER" not in job.error and "MRN-UTF" not in job.error
    assert job.state == "succeeded", (job.state, job.error)
    (row,) = dctx.index.files_for(sops=[result.SOPInstanceUID])
    back = pydicom.dcmread(dctx.storage.absolute(row["ObjectFile"]))
    assert str(back.PatientName) == "MÜLLER^JÖRG^ŁUKASZ"


def test_a_result_carries_only_the_original_patients_identity(dctx, jobs, tmp_path):
    """Patient attributes the platform wrote (other names, a birth name, an address, another issuer's
    IDs) stayed in the re-identified result next to the restored name and ID: a result filed under
    patient A that also names someone else, sent on to the clinical PACS. The Patient module comes
    from the stored original only."""
    a = _patient(dctx, tmp_path / "a", "MRN-A", "ALPHA^ANN")
    ProjectStore(dctx.index.engine).create("p", ProjectConfig(), SECRET.encode(), created_by="test")
    deid = _send(dctx, "p", a.SOPInstanceUID)[a.SOPInstanceUID]
    result = _result_of(deid)
    result.OtherPatientNames = "SMITH^JANE"
    result.PatientBirthName = "SMITH^JANE"
    result.PatientAddress = "1 Other Street"
    result.add_new(0x00101000, "LO", "OTHER-MRN-123")  # Other Patient IDs (retired, still read by PACS)
    job = _bring_home(dctx, jobs, "p", result)
    assert job.state == "succeeded", (job.state, job.error)
    (row,) = dctx.index.files_for(sops=[result.SOPInstanceUID])
    data = dctx.storage.absolute(row["ObjectFile"]).read_bytes()
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.PatientID == "MRN-A" and str(back.PatientName) == "ALPHA^ANN"
    for planted in (b"SMITH", b"Other Street", b"OTHER-MRN"):
        assert planted not in data, planted


def _un(tag: int, value: bytes) -> bytes:
    """An explicit VR little endian element of VR UN (as a PACS that does not know the tag keeps it)."""
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"UN", 0, len(value)) + value


def _implicit(tag: int, value: bytes) -> bytes:
    value += b" " * (len(value) % 2)
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


@pytest.mark.parametrize("tag", [0x00540016, 0x00089998],
                         ids=["standard", "unknown"])
def test_a_sequence_stored_with_vr_un_leaves_without_the_identifiers_inside(dctx, tmp_path, tag):
    """A sequence some peer wrote as UN (it did not know the tag): what is nested in it is de-identified."""
    folder = tmp_path / "in"
    folder.mkdir()
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.PatientID, ds.PatientName = "MRN-770011", "DOE^JOHNATHAN"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    raw = _bytes(ds)
    body = (_implicit(0x00081150, ds.SOPClassUID.encode()) + _implicit(0x00081155, ds.SOPInstanceUID.encode())
            + _implicit(0x00100010, b"DOE^JOHNATHAN") + _implicit(0x00100020, b"MRN-770011"))
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
    at = raw.rfind(b"\xe0\x7f\x10\x00")  # before the pixel data (the order does not matter to the profile)
    (folder / "un.dcm").write_bytes(raw[:at] + _un(tag, item) + raw[at:])
    load(dctx, folder)
    ProjectStore(dctx.index.engine).create("p", ProjectConfig(), SECRET.encode(), created_by="test")
    out = Outgoing(ProjectStore(dctx.index.engine).open("p", SECRET.encode()), "test", "download", "client")
    (row,) = dctx.index.files_for(sops=[ds.SOPInstanceUID])
    made = out(str(dctx.storage.absolute(row["ObjectFile"])))
    out.close()
    assert made.data is not None
    for original in (b"MRN-770011", b"DOE", ds.SOPInstanceUID.encode()):
        assert original not in made.data, original


def test_an_element_no_dictionary_knows_does_not_leave(dctx, tmp_path):
    """A standard-group element no dictionary knows (a vendor's, or a newer edition's) is removed: nothing
    says what it holds (it was kept byte for byte)."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.PatientID = "MRN-770011"
    ds.add_new(0x00089999, "LO", "MRN-770011 DOE JOHNATHAN")
    key = ProjectKey(SECRET.encode(), "p")
    made = Profile(ProjectConfig(), KeyedIdentity(key)).apply(_bytes(ds))
    assert made.data is not None and b"MRN-770011" not in made.data


def test_a_node_made_research_only_while_a_job_waits_gets_nothing_identifiable(dctx, jobs, tmp_path):
    """A push queued to a node that may receive identifiable data, the node then marked
    ``identifiable: false`` (with, then without, a default project) before a worker runs the job: the
    job de-identifies under the node's project, or refuses; nothing identifiable is sent or audited."""
    ct = _patient(dctx, tmp_path / "in", "MRN-770011", "DOE^JOHN")
    ProjectStore(dctx.index.engine).create("p", ProjectConfig(), SECRET.encode(), created_by="test")
    jobs.add_node(Node("platform", "PLATFORM", "127.0.0.1", free_port()))
    body = {"kind": "push", "node": "platform", "selection": {"StudyInstanceUID": [ct.StudyInstanceUID]}}
    kind, node, params, hook = validate(body)
    queued = jobs.submit(kind, params, node, hook)[0]
    assert "project" not in queued.params
    jobs.update_node("platform", {"identifiable": False})
    refused = runner.run_job(queued.id, dctx, jobs)
    assert refused.state == "failed" and "de-identified data only" in refused.error
    jobs.update_node("platform", {"identifiable": True})
    kind, node, params, hook = validate({**body, "selection": {"SeriesInstanceUID": [ct.SeriesInstanceUID]}})
    queued = jobs.submit(kind, params, node, hook)[0]
    assert "project" not in queued.params
    jobs.update_node("platform", {"identifiable": False, "project": "p"})
    done = runner.run_job(queued.id, dctx, jobs)
    assert done.result.get("project") == "p", (done.state, done.error, done.result)


@pytest.mark.parametrize("names", [[], ["ALICE", "BOB", "CAROL", "DAVE"]])
def test_new_patients_met_by_jobs_at_the_same_moment_get_one_pseudonym_each(dctx, names):
    """Four jobs (threads, each its own session as a worker's) meet two new patients at once, under a
    project that derives pseudonyms and under one that hands out names from its list: each patient
    gets one pseudonym, the same in every job, and no two patients share one."""
    import threading

    store = ProjectStore(dctx.index.engine)
    store.create("p", ProjectConfig.model_validate({"pseudonyms": {"names": names}} if names else {}),
                 SECRET.encode(), created_by="test")
    barrier = threading.Barrier(4)
    got: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def job(patient_id: str) -> None:
        identity = store.open("p", SECRET.encode()).identity
        barrier.wait()
        try:
            got.append((patient_id, identity.patient("", patient_id).pseudonym))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(pid,)) for pid in ("MRN-1", "MRN-2", "MRN-1", "MRN-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    mine = {pid: {p for q, p in got if q == pid} for pid in ("MRN-1", "MRN-2")}
    assert all(len(v) == 1 for v in mine.values()), mine
    assert mine["MRN-1"] != mine["MRN-2"]
    rows, total = store.map_rows("p")
    assert total == 2


def test_the_dates_mode_of_a_project_with_a_map_cannot_change(dctx, jobs, tmp_path):
    """A project that shifted its patients' dates switched to keeping them (allowed while it had a map):
    the platform then holds each patient's dates both shifted and true, so it learns every offset and
    can move back everything it was sent (the shift protects nothing); and a result made on the
    shifted data came home with its dates not moved back (re-identification reads the mode now, not
    the mode its data were sent under): filed in the clinical record off by the offset."""
    from pacsbridge.shared.core.errors import Conflict

    a = _patient(dctx, tmp_path / "a", "MRN-A", "ALPHA^ANN", study_date="20240117")
    store = ProjectStore(dctx.index.engine)
    store.create("p", ProjectConfig.model_validate({"options": {"dates": "shift"}}), SECRET.encode(),
                 created_by="test")
    deid = _send(dctx, "p", a.SOPInstanceUID)[a.SOPInstanceUID]
    assert deid.StudyDate != "20240117"
    for mode in ("keep", "remove"):
        with pytest.raises(Conflict, match="dates"):
            store.update("p", config={"options": {"dates": mode}})
    result = _result_of(deid)
    result.ContentDate = deid.StudyDate
    job = _bring_home(dctx, jobs, "p", result)
    assert job.state == "succeeded", (job.state, job.error)
    (row,) = dctx.index.files_for(sops=[result.SOPInstanceUID])
    back = pydicom.dcmread(dctx.storage.absolute(row["ObjectFile"]))
    assert back.ContentDate == "20240117" and back.StudyDate == "20240117"
    # a project without a map may change it
    store.create("q", ProjectConfig(), SECRET.encode(), created_by="test")
    assert store.update("q", config={"options": {"dates": "shift"}}).config.options.dates == "shift"



@pytest.mark.parametrize("dctx", ["replace"], indirect=True)
def test_a_results_job_that_cannot_store_names_no_original_in_its_error(dctx, jobs, tmp_path):
    """Storage refuses the re-identified result (disk full, read-only, a directory in the way): its
    error named the storage path, made of the original PatientID and study UID (the preset
    patient-study-series), in the job's error, which the platform reads."""
    from pacsbridge.shared.deid.reidentify import reidentify
    from pacsbridge.shared.index.records import read_header
    from pacsbridge.worker.kinds.results import _original_header

    a = _patient(dctx, tmp_path / "a", "MRN-770011", "ALPHA^ANN")
    ProjectStore(dctx.index.engine).create("p", ProjectConfig(), SECRET.encode(), created_by="test")
    deid = _send(dctx, "p", a.SOPInstanceUID)[a.SOPInstanceUID]
    result = _result_of(deid)
    session = ProjectStore(dctx.index.engine).open("p", SECRET.encode())
    back = reidentify(_bytes(result), "p", session.identity, False, lambda s: _original_header(dctx, s))
    target = dctx.storage.absolute(dctx.storage.path_for(read_header(back.data, "result")))
    target.mkdir(parents=True)  # where the result would go: a directory in the way
    job = _bring_home(dctx, jobs, "p", result)
    assert job.state == "failed", (job.state, job.error)
    assert "MRN-770011" not in job.error and a.StudyInstanceUID not in job.error, job.error
    assert "MRN-770011" not in json.dumps(job.result) and a.StudyInstanceUID not in json.dumps(job.result)


def test_a_malformed_result_is_refused_audited_and_removed(dctx, jobs, tmp_path):
    """A result with an element pydicom cannot convert (an FD of 3 bytes) made the results job end in an
    "unexpected error" with pydicom's message, leaving the file under PACSBRIDGE_RESULTS_ROOT for good
    (each such POST keeps up to 512 MB on disk) and nothing in the audit: it is refused like any other
    result that cannot come home."""
    a = _patient(dctx, tmp_path / "a", "MRN-A", "ALPHA^ANN")
    ProjectStore(dctx.index.engine).create("p", ProjectConfig(), SECRET.encode(), created_by="test")
    deid = _send(dctx, "p", a.SOPInstanceUID)[a.SOPInstanceUID]
    raw = _bytes(_result_of(deid))
    at = raw.rfind(b"\xe0\x7f\x10\x00")
    bad = raw[:at] + struct.pack("<HH2sH", 0x0018, 0x9087, b"FD", 3) + b"\x01\x00\x00" + raw[at:]
    folder = Path(dctx.settings.results_root) / "p"
    folder.mkdir(parents=True)
    (folder / "bad.dcm").write_bytes(bad)
    job, _ = jobs.submit("results", {"project": "p", "file": "p/bad.dcm"}, owner="platform")
    done = runner.run_job(job.id, dctx, jobs)
    assert done.state == "failed" and done.error.startswith("refused"), done.error
    assert not (folder / "bad.dcm").exists()
    rows, _ = ProjectStore(dctx.index.engine).audit_rows(action="reidentify_refused")
    assert len(rows) == 1


def test_a_research_node_is_not_an_allowed_c_store_peer_of_the_listener(dctx, jobs):
    """Every node was an allowed C-STORE peer of the listener, research nodes (``identifiable: false``)
    included: a platform could C-STORE anything into the archive (its de-identified data, or an
    instance naming any real patient), past the results route's checks, re-identification and audit."""
    import threading
    from types import SimpleNamespace

    from pacsbridge.listener.peers import parse_peers
    from pacsbridge.listener.server import _refresh_peers

    jobs.add_node(Node("clinical", "PACS", "127.0.0.1", 104))
    jobs.add_node(Node("platform", "PLATFORM", "127.0.0.1", 105, identifiable=False))
    holders = (SimpleNamespace(peers=None), SimpleNamespace(peers=None), SimpleNamespace(require_calling_aet=[]))
    stop = threading.Event()
    stop.set()  # one reading of the nodes, then back
    _refresh_peers(dctx.settings, parse_peers("STATIC@127.0.0.1"), holders, stop)
    peers = holders[0].peers
    assert peers.allows("PACS", "127.0.0.1")  # a node we retrieve from sends its sub-operations
    assert not peers.allows("PLATFORM", "127.0.0.1")


def test_a_project_token_names_one_valid_project():
    from pacsbridge.api.auth import parse_tokens
    from pacsbridge.shared.core.errors import ConfigError

    (token,) = parse_tokens("lab:lab-token-0123456789abcdef:project=lung-2026:2099-01-01")
    assert (token.role, token.project, str(token.expires)) == ("project", "lung-2026", "2099-01-01")
    for bad in ("project=", "project=../x", "project=a b", "projects=lung"):
        with pytest.raises(ConfigError, match="role"):
            parse_tokens(f"lab:lab-token-0123456789abcdef:{bad}")
