"""Repack jobs: px-repack trees, hard links, hostile values and destinations, no overwrite."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from pacsbridge.worker import runner
from pacsbridge.shared.index.context import open_context
from pacsbridge.shared.core.errors import Conflict, InvalidRequest
from pacsbridge.shared.index.importer import Importer
from pacsbridge.shared.jobs.store import JobStore, SeriesProgress
from pacsbridge.shared.jobs.spec import validate
from pacsbridge.worker.selection import resolve

from .helpers import make_instance


@pytest.fixture
def rctx(settings, tmp_path):
    context = open_context(settings.with_(export_root=tmp_path / "export"))
    context.index.create()
    context.storage.ensure()
    yield context
    context.index.engine.dispose()


@pytest.fixture
def jobs(rctx) -> JobStore:
    return JobStore(rctx.index.engine)


def _import(ctx, folder: Path, datasets) -> None:
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([folder])
    assert report.stored + report.indexed == len(datasets), report.rejected


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _submit(jobs, body):
    kind, node, params, webhook = validate(body)
    job, _ = jobs.submit(kind, params, node=node, webhook=webhook)
    return job


def test_px_repack_tree_and_a_hostile_patient_stay_inside_the_export_root(rctx, jobs, tmp_path):
    study = pydicom.uid.generate_uid()
    good = [make_instance(tmp_path / "in" / f"g{i}.dcm", StudyInstanceUID=study, SeriesInstanceUID=s,
                          InstanceNumber=i, StudyDescription="Chest CT", AccessionNumber="A1",
                          SeriesDescription="Axial/2mm")
            for i, s in enumerate([pydicom.uid.generate_uid()] * 3)]
    evil = [make_instance(tmp_path / "in" / f"e{i}.dcm", PatientID="../../x", PatientName="../../../etc^passwd",
                          StudyDescription="..", SeriesDescription="/abs/../../y", AccessionNumber="\\..\\z")
            for i in range(2)]
    _import(rctx, tmp_path / "in", good + evil)
    before = _files(tmp_path)

    job = _submit(jobs, {"kind": "repack", "selection": {"PatientID": ["PB0001", "../../x"]}, "dest": "cohort-1"})
    done = runner.run_job(job.id, rctx, jobs)
    assert done.state == "succeeded", (done.error, done.result)
    assert done.result["placed"] == 5 and done.result["failed"] == 0

    base = (tmp_path / "export" / "cohort-1").resolve()
    written = _files(tmp_path / "export")
    assert len(written) == 5
    assert all(base in p.resolve().parents for p in written)
    # nothing appeared anywhere else (the hostile values did not climb out)
    assert {p for p in _files(tmp_path) - before - written if not p.name.startswith("conquest.db")} == set()
    # px-repack's layout: patient-name-birthdate / description-accession-date / series / instance
    rels = sorted(str(p.relative_to(base)) for p in written)
    assert any(r.startswith("PB0001-test_patient-19700101/Chest_CT-A1-20240102/00003-Axial_2mm-") for r in rels)
    assert all(".." not in Path(r).parts for r in rels)
    for p in written:  # copies, byte for byte
        sop = pydicom.dcmread(p).SOPInstanceUID
        (obj, _), = [rctx.index.lookup_sop([sop])[sop]]
        assert p.read_bytes() == rctx.storage.absolute(obj).read_bytes()
        assert p.stat().st_ino != rctx.storage.absolute(obj).stat().st_ino
    series = {s.series_uid: s for s in jobs.get(job.id).series}
    assert len(series) == 3 and all(s.state == "succeeded" and s.pushed == s.expected for s in series.values())


def test_link_makes_hard_links_and_a_second_run_overwrites_nothing(rctx, jobs, tmp_path):
    uids = {"StudyInstanceUID": pydicom.uid.generate_uid(), "SeriesInstanceUID": pydicom.uid.generate_uid()}
    items = [make_instance(tmp_path / "in" / f"{i}.dcm", InstanceNumber=i, **uids) for i in range(3)]
    _import(rctx, tmp_path / "in", items)
    series = items[0].SeriesInstanceUID
    body = {"kind": "repack", "selection": {"SeriesInstanceUID": [series]}, "dest": "linked",
            "template": "{PatientID}/{InstanceNumber:03d}.dcm", "link": True}
    done = runner.run_job(_submit(jobs, body).id, rctx, jobs)
    assert done.state == "succeeded", done.error
    base = tmp_path / "export" / "linked" / "PB0001"
    for ds in items:
        target = base / f"{ds.InstanceNumber:03d}.dcm"
        obj, _ = rctx.index.lookup_sop([ds.SOPInstanceUID])[ds.SOPInstanceUID]
        assert os.path.samefile(target, rctx.storage.absolute(obj))  # same inode
        assert target.stat().st_nlink >= 2

    # someone replaced one name with a different file: it is reported, never overwritten
    victim = base / "001.dcm"
    victim.unlink()
    victim.write_bytes(b"not the same file")
    again = runner.run_job(_submit(jobs, body).id, rctx, jobs)
    assert again.state == "partial"
    assert again.result["already"] == 2 and again.result["failed"] == 1
    assert again.result["failures"][0]["sop"] == items[1].SOPInstanceUID
    assert "different file exists" in again.result["failures"][0]["error"]
    assert victim.read_bytes() == b"not the same file"
    row = {s.series_uid: s for s in jobs.get(again.id).series}[series]
    assert (row.pushed, row.failed, row.state) == (2, 1, "partial") and "001.dcm" in row.error


def test_hostile_destinations_are_refused_and_write_nothing(rctx, jobs, tmp_path):
    items = [make_instance(tmp_path / "in" / "a.dcm")]
    _import(rctx, tmp_path / "in", items)
    for dest in ("../outside", "/tmp/x", "a/../../b", ""):
        with pytest.raises(InvalidRequest) as info:
            validate({"kind": "repack", "selection": {"PatientID": "PB0001"}, "dest": dest})
        assert info.value.field == "dest"
    # a symlink inside the export root that points out of it
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "export").mkdir(exist_ok=True)
    (tmp_path / "export" / "evil").symlink_to(outside)
    done = runner.run_job(_submit(jobs, {"kind": "repack", "selection": {"PatientID": "PB0001"},
                                         "dest": "evil/sub"}).id, rctx, jobs)
    assert done.state == "failed" and "outside PACSBRIDGE_EXPORT_ROOT" in done.error
    assert list(outside.iterdir()) == []
    # a malformed template: refused at submit (400), and by the runner for a row written before that check
    with pytest.raises(InvalidRequest) as info:
        validate({"kind": "repack", "selection": {"PatientID": "PB0001"}, "dest": "t", "template": "{Patient ID}/x"})
    assert info.value.field == "template"
    old, _ = jobs.submit("repack", {"selection": {"PatientID": ["PB0001"]}, "dest": "t", "link": False,
                                    "template": "{Patient ID}/x.dcm"})
    bad = runner.run_job(old.id, rctx, jobs)
    assert bad.state == "failed" and bad.error.startswith("template:")
    # nothing matches
    none = runner.run_job(_submit(jobs, {"kind": "repack", "selection": {"PatientID": "nobody"}, "dest": "n"}).id,
                          rctx, jobs)
    assert none.state == "failed" and "no stored instance" in none.error
    assert _files(tmp_path / "export") == set()


def test_selection_by_job_and_rows_that_escape_storage(rctx, jobs, tmp_path):
    a = make_instance(tmp_path / "in" / "a.dcm")
    b = make_instance(tmp_path / "in" / "b.dcm")
    _import(rctx, tmp_path / "in", [a, b])
    job, _ = jobs.submit("import", {"path": "x"})
    jobs.set_series(job.id, [SeriesProgress(a.SeriesInstanceUID)])
    with pytest.raises(Conflict):  # still queued: what it brings is not complete yet
        resolve(rctx.index, rctx.storage, {"job": job.id}, jobs)
    jobs.finish(job.id, "succeeded")
    sel = resolve(rctx.index, rctx.storage, {"job": job.id}, jobs)
    assert [i.sop_uid for i in sel.instances] == [a.SOPInstanceUID] and sel.rejected == []
    assert sel.instances[0].sop_class == a.SOPClassUID and sel.instances[0].path.is_file()
    # an index row tampered with to point out of storage is rejected with a reason, not followed
    img = rctx.index.tables["Image"]
    key = rctx.index.schema["Image"].key.column
    with rctx.index.engine.begin() as conn:
        conn.execute(img.update().where(img.c[key] == b.SOPInstanceUID).values(ObjectFile="../../etc/passwd"))
    sel = resolve(rctx.index, rctx.storage, {"SeriesInstanceUID": [b.SeriesInstanceUID]})
    assert sel.instances == [] and sel.rejected[0][0] == b.SOPInstanceUID
    done = runner.run_job(_submit(jobs, {"kind": "repack", "selection": {"PatientID": "PB0001"},
                                         "dest": "d"}).id, rctx, jobs)
    assert done.state == "partial" and done.result["placed"] == 1
    assert done.result["failures"][0]["sop"] == b.SOPInstanceUID


def test_a_link_inside_the_export_root_makes_no_folder_outside(rctx, jobs, tmp_path):
    """Issue 14 item 13: a symlink at a folder the template renders into made the folders below it outside
    the root (mkdir followed the link; the later check only kept the file from being written)."""
    victim = make_instance(tmp_path / "in" / "v.dcm", PatientID="VICTIM")
    other = make_instance(tmp_path / "in" / "o.dcm", PatientID="OTHER")
    _import(rctx, tmp_path / "in", [victim, other])
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "export" / "cohort").mkdir(parents=True)
    (tmp_path / "export" / "cohort" / "VICTIM").symlink_to(outside, target_is_directory=True)
    body = {"kind": "repack", "selection": {"PatientID": ["VICTIM", "OTHER"]}, "dest": "cohort",
            "template": "{PatientID}/{StudyInstanceUID}/{SOPInstanceUID}.dcm"}
    done = runner.run_job(_submit(jobs, body).id, rctx, jobs)
    assert list(outside.iterdir()) == []  # no folder made outside the root
    assert done.state == "partial" and done.result["placed"] == 1, (done.error, done.result)
    (failure,) = done.result["failures"]
    assert failure["sop"] == victim.SOPInstanceUID and "symbolic link" in failure["error"]
    placed = tmp_path / "export" / "cohort" / "OTHER" / other.StudyInstanceUID / f"{other.SOPInstanceUID}.dcm"
    assert placed.is_file() and not placed.is_symlink()
    # a link at the file name itself is never written through either
    target = tmp_path / "target.dcm"
    target.write_bytes(b"precious")
    placed.unlink()
    placed.symlink_to(target)
    again = runner.run_job(_submit(jobs, {**body, "selection": {"PatientID": ["OTHER"]}}).id, rctx, jobs)
    assert again.state == "failed" and target.read_bytes() == b"precious"
    assert "different file exists" in again.result["failures"][0]["error"]
