"""The index on SQLite and on the real PostgreSQL: import, idempotence, Conquest SQL."""

from __future__ import annotations

import io
import zipfile

import pydicom
import pytest
from sqlalchemy import text

from pacsbridge.shared.core.errors import QueryError
from pacsbridge.shared.index.importer import Importer

from .helpers import make_instance, pydicom_test_files, readable_test_files

# Queries from the seeds (pyconquest's README and its summary), unchanged
CONQUEST_QUERIES = [
    "select SeriesInst from DICOMSeries where Modality='CT'",
    "select seriesinst from dicomseries where modality='RTPLAN'",
    "select seriesinst,* from dicomseries where modality='CT'",
    "Select Objectfile from DICOMimages where ImagePat is not null",
    "select PatientID from dicompatients",
    "select distinct patientid ,(select count(*) from dicomseries where seriespat=patientid and modality='CT') "
    "as nrCT ,(select count(*) from dicomseries where seriespat=patientid and modality='MR') as nrMR "
    "from dicompatients order by nrCT",
    "select StudyInsta, StudyModal, PatientNam, PatientBir from DICOMStudies where StudyDate >= '19000101'",
    "select SOPInstanc, ImageNumbe, QRows, QColumns, PhotoMetri, ObjectFile, DeviceName from DICOMImages",
]


def rows_of(ctx, table):
    with ctx.index.engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(text(f"select * from {table}")))  # fixed names


def all_tables(ctx):
    return {t: rows_of(ctx, t) for t in ("DICOMPatients", "DICOMStudies", "DICOMSeries", "DICOMImages")}


def test_every_readable_pydicom_file_is_imported(ctx):
    files = pydicom_test_files()
    readable = readable_test_files()
    assert len(readable) > 40
    report = Importer(ctx.index, ctx.storage, workers=2).import_paths([str(f) for f in files])
    rejected = {f for f, _ in report.rejected}
    # nothing pydicom reads cleanly is rejected, unless it is truncated
    wrongly = [f for f in map(str, readable) if f in rejected and "truncated" not in f]
    assert wrongly == []
    for f, reason in report.rejected:
        assert reason, f
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID).strip()
            for f in readable if "truncated" not in f.name}
    indexed = {r[0] for r in ctx.index.run_sql("select SOPInstanc from DICOMImages")[1]}
    assert sops <= indexed
    # more is indexed only from files pydicom reads with force=True (no preamble / meta)
    forced = set()
    for f in files:
        try:
            forced.add(str(pydicom.dcmread(f, stop_before_pixels=True, force=True).SOPInstanceUID).strip())
        except Exception:
            pass
    assert indexed - sops <= forced
    # each stored file is the original byte for byte
    for sop, objfile, device in ctx.index.run_sql("select SOPInstanc, ObjectFile, DeviceName from DICOMImages")[1]:
        assert device == "MAG0"
        stored = ctx.storage.absolute(objfile)
        assert str(pydicom.dcmread(stored, stop_before_pixels=True, force=True).SOPInstanceUID).strip() == sop


def test_truncated_and_non_dicom_are_reported_and_harm_nothing(ctx, tmp_path):
    good = make_instance(tmp_path / "in" / "good.dcm", rows=64)
    Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path / "in"])
    before, files_before = all_tables(ctx), sorted(ctx.storage.walk())
    data = (tmp_path / "in" / "good.dcm").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.dcm").write_bytes(data[: len(data) - 100])
    (bad / "text.txt").write_text("hello")
    (bad / "empty.dcm").write_bytes(b"")
    make_instance(bad / "nouid.dcm", SeriesInstanceUID=None, SOPInstanceUID=good.SOPInstanceUID)
    # same SOP as the stored one, but truncated: must not replace anything
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([bad, tmp_path / "missing.dcm"])
    reasons = dict(report.rejected)
    assert "runs to byte" in reasons[str(bad / "truncated.dcm")]
    assert "not a DICOM file" in reasons[str(bad / "text.txt")]
    assert reasons[str(bad / "empty.dcm")] == "empty file"
    assert reasons[str(bad / "nouid.dcm")] == "no SeriesInstanceUID"
    assert reasons[str(tmp_path / "missing.dcm")] == "no such file or directory"
    assert all_tables(ctx) == before
    assert sorted(ctx.storage.walk()) == files_before


def test_indexing_is_idempotent(ctx):
    files = [str(f) for f in readable_test_files()]
    imp = Importer(ctx.index, ctx.storage, workers=1)
    imp.import_paths(files)
    first = all_tables(ctx)
    second_report = imp.import_paths(files)
    assert second_report.stored == 0
    assert all_tables(ctx) == first
    rebuilt = imp.rebuild()
    assert rebuilt.rejected == [] and rebuilt.indexed == len(ctx.storage.walk())
    after_rebuild = all_tables(ctx)
    # images come from the stored files either way; a key shared by files that disagree (the
    # empty PatientID of several test files) takes the values of whichever came last
    assert after_rebuild["DICOMImages"] == first["DICOMImages"]
    imp.rebuild()
    assert all_tables(ctx) == after_rebuild


def test_conquest_value_rules(ctx, tmp_path):
    study = pydicom.uid.generate_uid()
    make_instance(tmp_path / "a.dcm", StudyInstanceUID=study, Modality="CT", PatientName="A" * 100,
                  ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], StudyDescription="first")
    make_instance(tmp_path / "b.dcm", StudyInstanceUID=study, Modality="RTSTRUCT", StudyDescription=None,
                  PatientName=None, StudyDate="2024.01.02")
    make_instance(tmp_path / "c.dcm", StudyInstanceUID=study, Modality="CT", PatientName=None)
    Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path / "a.dcm"])
    Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path / "b.dcm", tmp_path / "c.dcm"])
    (mod, desc, name, date), = ctx.index.run_sql(
        "select StudyModal, StudyDescr, PatientNam, StudyDate from DICOMStudies")[1]
    assert mod == "CT\\RTSTRUCT"  # accumulated, no repeats
    assert desc == "first"  # an absent value does not erase a stored one
    assert name == "A" * 64  # truncated to the column length
    assert len(date) == 8
    types = {r[0] for r in ctx.index.run_sql("select ImageType from DICOMImages")[1]}
    assert types == {"ORIGINAL\\PRIMARY\\AXIAL"}
    assert ctx.index.count("Series") == 3 and ctx.index.count("Patient") == 1


@pytest.mark.parametrize("query", CONQUEST_QUERIES)
def test_conquest_queries_run_unchanged(ctx, query):
    Importer(ctx.index, ctx.storage, workers=1).import_paths([str(f) for f in readable_test_files()])
    columns, rows = ctx.index.run_sql(query)
    assert columns and rows


def test_ct_query_returns_the_ct_series(ctx):
    Importer(ctx.index, ctx.storage, workers=1).import_paths([str(f) for f in readable_test_files()])
    expected = set()
    for f in readable_test_files():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.get("Modality") == "CT" and "truncated" not in f.name:
            expected.add(str(ds.SeriesInstanceUID))
    got = {r[0] for r in ctx.index.run_sql("select SeriesInst from DICOMSeries where Modality='CT'")[1]}
    assert got == expected and got


def test_sql_is_read_only_unless_asked(ctx, tmp_path):
    make_instance(tmp_path / "a.dcm")
    Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path])
    ctx.index.run_sql("delete from DICOMImages")
    assert ctx.index.count() == 1
    with pytest.raises(QueryError):
        ctx.index.run_sql("select nosuchcolumn from DICOMImages")
    ctx.index.run_sql("delete from DICOMImages", write=True)
    assert ctx.index.count() == 0


def test_rebuild_missing_and_prune(ctx, tmp_path):
    for i in range(3):
        make_instance(tmp_path / f"{i}.dcm", PatientID=f"P{i}")
    Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path])
    ctx.index.create(force=True)
    assert ctx.index.count() == 0
    report = Importer(ctx.index, ctx.storage, workers=1).rebuild(missing_only=True)
    assert report.indexed == 3 and ctx.index.count() == 3
    assert Importer(ctx.index, ctx.storage, workers=1).rebuild(missing_only=True).indexed == 0
    victim = ctx.storage.walk()[0]
    ctx.storage.absolute(victim).unlink()
    report = Importer(ctx.index, ctx.storage, workers=1).rebuild(missing_only=True, prune=True)
    assert report.pruned == 1 and ctx.index.count() == 2


def test_zip_move_and_in_place(ctx, tmp_path):
    src = tmp_path / "src"
    a = make_instance(src / "a.dcm")
    b = make_instance(src / "b.dcm")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(src / "a.dcm", "x/a.dcm")
        zf.writestr("x/readme.txt", "not dicom")
    (tmp_path / "z.zip").write_bytes(buf.getvalue())
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path / "z.zip"], move=True)
    assert report.stored == 1 and len(report.rejected) == 1
    assert (tmp_path / "z.zip").exists()  # a member was rejected: the zip is kept
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([src / "b.dcm"], move=True)
    assert report.stored == 1 and report.removed == 1 and not (src / "b.dcm").exists()
    ext = tmp_path / "ext"
    c = make_instance(ext / "c.dcm")
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([ext], in_place=True)
    assert report.indexed == 1 and (ext / "c.dcm").exists()
    found = ctx.index.lookup_sop([a.SOPInstanceUID, b.SOPInstanceUID, c.SOPInstanceUID])
    assert found[c.SOPInstanceUID] == (str((ext / "c.dcm").resolve()), "EXTERN")
    assert found[a.SOPInstanceUID][1] == found[b.SOPInstanceUID][1] == "MAG0"


def test_special_columns(tmp_path, db_url):
    from pacsbridge.shared.core.config import Settings
    from pacsbridge.shared.index.context import open_context
    from .helpers import TEST_FILES

    ctx = open_context(Settings(database_url=db_url, storage=tmp_path / "d", fsync=False, special_columns=True))
    ctx.index.create()
    Importer(ctx.index, ctx.storage, workers=1).import_paths(
        [TEST_FILES / "rtplan.dcm", TEST_FILES / "rtdose.dcm", TEST_FILES / "CT_small.dcm"])
    rows = dict((r[0], r[1:]) for r in ctx.index.run_sql(
        "select s.Modality, i.ElementCount, i.ElementList, i.ReferencedSOPUID, i.Nfractions "
        "from DICOMImages i join DICOMSeries s on s.SeriesInst = i.SeriesInst")[1])
    plan = pydicom.dcmread(TEST_FILES / "rtplan.dcm")
    assert rows["RTPLAN"][0] == str(len(plan.BeamSequence))
    assert rows["RTPLAN"][1] == "\\".join(b.BeamName for b in plan.BeamSequence)
    assert rows["RTPLAN"][2] == plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID
    dose = pydicom.dcmread(TEST_FILES / "rtdose.dcm", stop_before_pixels=True)
    assert rows["RTDOSE"][2] == dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID
    assert rows["CT"] == (None, None, None, None)
    ctx.index.engine.dispose()


def test_tables_created_by_several_processes_at_once(db_url):
    """Two API processes (gunicorn workers) or a worker and the listener start together: each
    creates the tables; none fails because another created one first."""
    import subprocess
    import sys

    code = ("import sys; from pacsbridge.shared.core.config import Settings; "
            "from pacsbridge.shared.index.context import open_context; "
            "open_context(Settings(database_url=sys.argv[1])).index.create()")
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
