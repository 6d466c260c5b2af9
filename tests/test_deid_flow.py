"""De-identification on the way out and results coming home, end to end against real peers (issue 16):
a push to a real Orthanc under a project, a second job days later, a repack, the API's download, a SEG
made with highdicom on the de-identified images sent back through the API, and the refusals."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from pacsbridge.api import create_app
from pacsbridge.shared.core.schema import audit_table, deid_patients_table, deid_uids_table
from pacsbridge.shared.deid.options import ProjectConfig
from pacsbridge.shared.deid.projects import ProjectStore
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.index.context import open_context
from pacsbridge.shared.jobs.spec import validate
from pacsbridge.shared.jobs.store import JobStore
from pacsbridge.shared.nodes import pusher as pushmod
from pacsbridge.worker import runner

from .helpers import TEST_FILES
from .orthanc import Orthanc, free_port
from .test_api import TOKEN_SPEC, auth
from .test_push import load

SECRET = "0123456789abcdef0123456789abcdef-deid"
#: pydicom's files of one patient: CT, MR, and the RT objects that reference each other
FILES = ["CT_small.dcm", "MR_small.dcm", "rtstruct.dcm", "rtplan.dcm", "rtdose.dcm"]
#: what the originals carry and no de-identified byte may
ORIGINAL = {"PatientName": "DOE^JOHNATHAN", "PatientID": "MRN-770011", "AccessionNumber": "ACC-99812",
            "InstitutionName": "St Elsewhere General", "ReferringPhysicianName": "HOUSE^GREGORY"}


@pytest.fixture
def dctx(settings, tmp_path):
    context = open_context(settings.with_(deid_secret=SECRET, export_root=tmp_path / "export",
                                          results_root=tmp_path / "results"))
    context.index.create()
    context.storage.ensure()
    yield context
    context.index.engine.dispose()


@pytest.fixture
def jobs(dctx) -> JobStore:
    return JobStore(dctx.index.engine)


def _study(dctx, folder: Path, names=FILES) -> str:
    """pydicom's files made one study of one patient carrying :data:`ORIGINAL`, the RT objects made to
    reference each other and the CT (plan -> structure set -> CT, dose -> plan) as a planning system's do."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    ds = {name: pydicom.dcmread(TEST_FILES / name, force=True) for name in names}
    ct = ds.get("CT_small.dcm")
    for d in ds.values():
        if "TransferSyntaxUID" not in getattr(d, "file_meta", {}):  # rtstruct.dcm has no file meta
            d.file_meta = FileMetaDataset()
            d.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            d.file_meta.MediaStorageSOPClassUID = d.SOPClassUID
            d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
        d.StudyInstanceUID, d.StudyDate = study, "20240117"
        for keyword, value in ORIGINAL.items():
            setattr(d, keyword, value)
    if {"rtstruct.dcm", "rtplan.dcm", "rtdose.dcm"} <= set(ds) and ct is not None:
        struct, plan, dose = ds["rtstruct.dcm"], ds["rtplan.dcm"], ds["rtdose.dcm"]
        for_ref = struct.ReferencedFrameOfReferenceSequence[0]
        for_ref.FrameOfReferenceUID = ct.FrameOfReferenceUID
        rt_study = for_ref.RTReferencedStudySequence[0]
        rt_study.ReferencedSOPInstanceUID = study
        rt_series = rt_study.RTReferencedSeriesSequence[0]
        rt_series.SeriesInstanceUID = ct.SeriesInstanceUID
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = ct.SOPClassUID, ct.SOPInstanceUID
        rt_series.ContourImageSequence = [image]
        for roi in struct.StructureSetROISequence:
            roi.ReferencedFrameOfReferenceUID = ct.FrameOfReferenceUID
        plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID = struct.SOPInstanceUID
        del plan.ReferencedRTPlanSequence  # a plan that is not among these files
        dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = plan.SOPInstanceUID
    for name, d in ds.items():
        d.save_as(folder / name, enforce_file_format=True)
    load(dctx, folder)
    return study


def _push(jobs, dctx, node: str, study: str, project: str | None = None):
    body = {"kind": "push", "node": node, "selection": {"StudyInstanceUID": [study]}}
    if project:
        body["project"] = project
    kind, name, params, hook = validate(body)
    return runner.run_job(jobs.submit(kind, params, name, hook)[0].id, dctx, jobs)


def _orthanc_text(dest: Orthanc) -> str:
    """Every tag of every instance Orthanc holds, and its patient and study records, as one text."""
    out = [json.dumps(dest.get("/patients?expand")), json.dumps(dest.get("/studies?expand"))]
    for oid in dest.get("/instances"):
        out.append(json.dumps(dest.get(f"/instances/{oid}/tags?simplify")))
    return "\n".join(out)


@pytest.mark.parametrize("processes", ["0", "1"])
def test_a_deidentified_study_reaches_orthanc_complete_and_without_its_identity(dctx, jobs, tmp_path, monkeypatch,
                                                                                processes):
    """In the job's sender threads, and in sender processes (PACSBRIDGE_PUSH_PROCESSES=1), which
    de-identify there and send the map's rows back: the same promises."""
    monkeypatch.setattr(pushmod, "PROCESSES", processes)
    study = _study(dctx, tmp_path / "in")
    ProjectStore(dctx.index.engine).create("lung", ProjectConfig(), SECRET.encode(), created_by="test")
    with Orthanc(tmp_path / "orthanc") as dest:
        jobs.add_node(Node("platform", dest.aet, "127.0.0.1", dest.dicom_port, project="lung", identifiable=False))
        job = _push(jobs, dctx, "platform", study)  # the node's project applies
        assert job.state == "succeeded", (job.error, job.result)
        assert job.result["project"] == "lung" and job.result["sent"] == len(FILES)
        stats = dest.get("/statistics")
        assert (stats["CountStudies"], stats["CountSeries"], stats["CountInstances"]) == (1, len(FILES), len(FILES))
        text = _orthanc_text(dest)
        for value in ORIGINAL.values():
            assert value not in text and value.split("^")[0] not in text, value
        assert study not in text and "20240117" not in text
        # the map: one patient, the UIDs of what was sent; the audit: who sent which study where
        with dctx.index.engine.connect() as conn:
            (row,) = conn.execute(select(deid_patients_table)).all()
            audit = conn.execute(select(audit_table).where(audit_table.c.action == "push")).all()
            mapped = {r.new: r.level for r in conn.execute(select(deid_uids_table))}
        assert all(mapped.get(uid) == "instance" for uid in dest.sop_uids())  # the map has every UID sent
        assert row.patient_id == ORIGINAL["PatientID"] and row.pseudonym in text
        assert [(a.project, a.patient_id, a.study_uid, a.target) for a in audit] == [
            ("lung", ORIGINAL["PatientID"], study, "node platform")]

        # days later, another job: the same pseudonym and UIDs, so Orthanc keeps one copy of each
        before = dest.sop_uids()
        again = _push(jobs, dctx, "platform", study, project="lung")
        assert again.state == "succeeded" and dest.sop_uids() == before
        with dctx.index.engine.connect() as conn:
            (later,) = conn.execute(select(deid_patients_table)).all()
        assert later[:6] == row[:6] and later.last_used > row.last_used  # same pseudonym, offset, first use


def test_references_inside_the_study_resolve_after_deidentification(dctx, jobs, tmp_path):
    study = _study(dctx, tmp_path / "in")
    ProjectStore(dctx.index.engine).create("rt", ProjectConfig(), SECRET.encode(), created_by="test")
    kind, node, params, _ = validate({"kind": "repack", "selection": {"StudyInstanceUID": [study]}, "dest": "rt",
                                      "project": "rt"})
    job = runner.run_job(jobs.submit(kind, params, node)[0].id, dctx, jobs)
    assert job.state == "succeeded", (job.error, job.result)
    out = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in (tmp_path / "export" / "rt").rglob("*")
                                            if p.is_file())}
    assert len(out) == len(FILES)
    names = "\n".join(str(p) for p in (tmp_path / "export" / "rt").rglob("*"))
    assert ORIGINAL["PatientID"] not in names and "DOE" not in names  # pseudonymised names in the tree
    for ds in out.values():
        for item in [*ds.get("ReferencedRTPlanSequence", []), *ds.get("ReferencedStructureSetSequence", [])]:
            if item.ReferencedSOPInstanceUID not in out:
                pytest.fail(f"{ds.Modality} references {item.ReferencedSOPInstanceUID}, not among what was sent")
        assert ds.StudyInstanceUID != study and ds.PatientIdentityRemoved == "YES"


def test_a_seg_made_on_the_deidentified_images_comes_home_under_the_original_patient(dctx, jobs, tmp_path):
    import highdicom as hd
    import numpy as np

    study = _study(dctx, tmp_path / "in", ["CT_small.dcm"])
    original_ct = pydicom.dcmread(tmp_path / "in" / "CT_small.dcm")
    ProjectStore(dctx.index.engine).create("seg", ProjectConfig(), SECRET.encode(), created_by="test")
    app = create_app({"SETTINGS": dctx.settings.with_(api_tokens=TOKEN_SPEC, listener_port=free_port(),
                                                      broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}"),
                      "TESTING": True})
    client = app.test_client()
    try:
        got = client.get(f"/api/v1/instances/{original_ct.SOPInstanceUID}/file?project=seg", headers=auth("read"))
        assert got.status_code == 200, got.get_data(as_text=True)
        deid = pydicom.dcmread(io.BytesIO(got.data))
        assert deid.PatientID != ORIGINAL["PatientID"] and deid.StudyInstanceUID != study
        mask = np.zeros((1, deid.Rows, deid.Columns), dtype=bool)
        mask[0, 10:40, 10:40] = True
        seg = hd.seg.Segmentation(
            source_images=[deid], pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[hd.seg.SegmentDescription(
                segment_number=1, segment_label="lesion",
                segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
                segmented_property_type=hd.sr.CodedConcept("4147007", "SCT", "Mass"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
            series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="research platform", manufacturer_model_name="model", software_versions="1",
            device_serial_number="1")
        buf = io.BytesIO()
        seg.save_as(buf)
        home = client.post("/api/v1/projects/seg/results", data=buf.getvalue(),
                           headers={**auth("user"), "Content-Type": "application/dicom"})
        assert home.status_code == 202, home.get_data(as_text=True)
        job = runner.run_job(home.get_json()["id"], dctx, jobs)
        assert job.state == "succeeded", (job.error, job.result)
        # what the platform may read of its job: nothing of the original patient or study
        assert ORIGINAL["PatientID"] not in json.dumps(job.to_dict()) and study not in json.dumps(job.to_dict())
        stored = dctx.index.files_for(sops=[seg.SOPInstanceUID])
        assert len(stored) == 1 and stored[0]["study"] == study
        back = pydicom.dcmread(dctx.storage.absolute(stored[0]["ObjectFile"]))
        assert back.PatientName == ORIGINAL["PatientName"] and back.AccessionNumber == ORIGINAL["AccessionNumber"]
        assert back.PatientID == ORIGINAL["PatientID"]
        assert back.StudyDate == "20240117" and back.PatientIdentityRemoved == "NO"
        ref = back.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == original_ct.SeriesInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == original_ct.SOPInstanceUID
        assert back.FrameOfReferenceUID == original_ct.FrameOfReferenceUID
        assert not list((dctx.settings.results_root / "seg").iterdir())  # the file sent home is gone

        # something that references what the project never sent is refused, with the reason, and audited
        stray = pydicom.dcmread(io.BytesIO(buf.getvalue()))
        stray.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = "2.25.1234"
        stray.SOPInstanceUID = stray.file_meta.MediaStorageSOPInstanceUID = hd.UID()
        out = io.BytesIO()
        stray.save_as(out)
        sent = client.post("/api/v1/projects/seg/results", data=out.getvalue(),
                           headers={**auth("user"), "Content-Type": "application/dicom"})
        assert sent.status_code == 202
        refused = runner.run_job(sent.get_json()["id"], dctx, jobs)
        assert refused.state == "failed" and "2.25.1234" in refused.error
        assert not dctx.index.files_for(sops=[stray.SOPInstanceUID])
        with dctx.index.engine.connect() as conn:
            actions = [r.action for r in conn.execute(select(audit_table).order_by(audit_table.c.id))]
        assert actions == ["download", "reidentify", "reidentify_refused"]
        # a patient the project never had: refused at once; a project that does not exist: 404
        stray.PatientID = "NOT-A-PSEUDONYM"
        out = io.BytesIO()
        stray.save_as(out)
        unknown = client.post("/api/v1/projects/seg/results", data=out.getvalue(),
                              headers={**auth("user"), "Content-Type": "application/dicom"})
        assert unknown.status_code == 400 and "NOT-A-PSEUDONYM" in unknown.get_data(as_text=True)
        assert client.post("/api/v1/projects/nope/results", data=out.getvalue(), headers={
            **auth("user"), "Content-Type": "application/dicom"}).status_code == 404
        assert client.post("/api/v1/projects/seg/results", data=b"not dicom", headers={
            **auth("user"), "Content-Type": "application/dicom"}).status_code == 400
        # a body larger than the API's 1 MB JSON limit is streamed to disk, checked, and nothing is left
        big = client.post("/api/v1/projects/seg/results", data=b"\x00" * (3 << 20), headers={
            **auth("user"), "Content-Type": "application/octet-stream"})
        assert big.status_code == 400 and "not a DICOM instance" in big.get_data(as_text=True)
        assert not list((dctx.settings.results_root / "seg").iterdir())
    finally:
        app.extensions["pacsbridge"].close()


def test_a_risky_instance_is_withheld_and_listed_and_a_missing_secret_fails_clearly(dctx, jobs, tmp_path,
                                                                                   settings):
    study = _study(dctx, tmp_path / "in", ["CT_small.dcm", "SC_rgb_rle.dcm"])
    ProjectStore(dctx.index.engine).create("strict", ProjectConfig(), SECRET.encode(), created_by="test")
    with Orthanc(tmp_path / "orthanc") as dest:
        jobs.add_node(Node("platform", dest.aet, "127.0.0.1", dest.dicom_port))
        job = _push(jobs, dctx, "platform", study, project="strict")
        assert job.state == "partial" and "withheld" in job.error
        assert job.result["sent"] == 1 and job.result["withheld"] == 1
        (withheld,) = job.result["withheld_instances"]
        assert withheld["action"] == "quarantine" and withheld["reason"]
        assert dest.instance_count() == 1
        assert sum(s.quarantined for s in jobs.get(job.id).series) == 1

        # a worker without the secret: the job fails with the setting named, nothing is sent
        bare = open_context(settings.with_(export_root=tmp_path / "export"))
        try:
            kind, name, params, hook = validate({"kind": "push", "node": "platform", "project": "strict",
                                                 "selection": {"StudyInstanceUID": [study]}})
            failed = runner.run_job(jobs.submit(kind, params, name, hook)[0].id, bare, JobStore(bare.index.engine))
            assert failed.state == "failed" and "PACSBRIDGE_DEID_SECRET" in failed.error
        finally:
            bare.index.engine.dispose()
        assert dest.instance_count() == 1


def test_the_offline_export_writes_deidentified_files_and_every_export_is_audited(dctx, tmp_path):
    import subprocess
    import sys

    from .conftest import cli_env

    study = _study(dctx, tmp_path / "in", ["CT_small.dcm", "MR_small.dcm"])
    ProjectStore(dctx.index.engine).create("offline", ProjectConfig(), SECRET.encode(), created_by="test")
    env = {**cli_env(dctx.settings), "PACSBRIDGE_DEID_SECRET": SECRET}

    def export(dest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pacsbridge.cli", "export", "--study", study, "--dest", str(dest),
                               "--subdirs", *extra], env=env, capture_output=True, text=True, timeout=120)

    done = export(tmp_path / "deid", "--project", "offline")
    assert done.returncode == 0, done.stderr
    files = [p for p in (tmp_path / "deid").rglob("*") if p.is_file()]
    assert len(files) == 2
    for path in files:
        data = path.read_bytes()
        assert ORIGINAL["PatientID"].encode() not in data and b"DOE" not in data and study.encode() not in data
        assert ORIGINAL["PatientID"] not in str(path) and "DOE" not in str(path)
    assert export(tmp_path / "plain").returncode == 0  # identifiable: allowed, and audited
    wrong = subprocess.run([sys.executable, "-m", "pacsbridge.cli", "export", "--study", study, "--dest",
                            str(tmp_path / "x"), "--project", "offline"],
                           env={**env, "PACSBRIDGE_DEID_SECRET": "another-secret-of-at-least-32-characters"},
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "not the secret" in wrong.stderr and not (tmp_path / "x").exists()
    with dctx.index.engine.connect() as conn:
        rows = conn.execute(select(audit_table).where(audit_table.c.action == "export")
                            .order_by(audit_table.c.id)).all()
    assert [(r.project, r.patient_id, r.study_uid, json.loads(r.detail)["identifiable"]) for r in rows] == [
        ("offline", ORIGINAL["PatientID"], study, False), ("", ORIGINAL["PatientID"], study, True)]
    assert all(r.actor.startswith("cli:") for r in rows)


def test_a_jobs_worker_with_the_wrong_secret_refuses_to_start(dctx, tmp_path):
    import subprocess
    import sys

    from .conftest import cli_env

    ProjectStore(dctx.index.engine).create("guarded", ProjectConfig(), SECRET.encode(), created_by="test")
    env = {**cli_env(dctx.settings), "PACSBRIDGE_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
           "PACSBRIDGE_DEID_SECRET": "another-secret-of-at-least-32-characters"}
    done = subprocess.run([sys.executable, "-m", "pacsbridge.cli", "worker", "--queues", "jobs"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "not the secret" in done.stderr and "guarded" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("processes", ["0", "1"])
def test_a_deidentified_push_over_two_associations_sends_each_instance_once_and_maps_it(dctx, jobs, tmp_path,
                                                                                       monkeypatch, processes):
    """Two associations, each de-identifying the file it sends next while it waits for the node (threads),
    or in its sender process: every instance reaches the node once, under a new UID the map holds, and
    the audit counts each once."""
    from .helpers import make_instance
    from .test_push import RecordingSCP

    monkeypatch.setattr(pushmod, "PROCESSES", processes)
    series = [generate_uid() for _ in range(3)]
    for i in range(60):
        make_instance(tmp_path / "in" / f"{i}.dcm", PatientID="MRN-2A", SeriesInstanceUID=series[i % 3],
                      InstanceNumber=i)
    load(dctx, tmp_path / "in")
    ProjectStore(dctx.index.engine).create("two", ProjectConfig(), SECRET.encode(), created_by="test")
    scp = RecordingSCP()
    try:
        jobs.add_node(scp.node("two", max_associations=2, project="two", identifiable=False))
        kind, name, params, hook = validate({"kind": "push", "node": "two", "selection": {"PatientID": ["MRN-2A"]}})
        job = runner.run_job(jobs.submit(kind, params, name, hook)[0].id, dctx, jobs)
    finally:
        scp.close()
    assert job.state == "succeeded", (job.error, job.result)
    assert job.result["sent"] == 60 and job.result["associations"] == 2
    assert len(scp.received) == 60 and all(len(v) == 1 for v in scp.received.values())
    with dctx.index.engine.connect() as conn:
        mapped = {r.new: r.level for r in conn.execute(select(deid_uids_table))}
        audit = conn.execute(select(audit_table).where(audit_table.c.action == "push")).all()
    assert all(mapped.get(uid) == "instance" for uid in scp.received)
    assert sum(json.loads(a.detail)["sent"] for a in audit) == 60
    assert "MRN-2A" not in {ds[0].PatientID for ds in scp.received.values()}
