"""What indexing sets aside (issue 14, items 2 and 5): bad values, instances that fail, UID conflicts."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import text

from pacsbridge.shared.index.importer import Importer

from .helpers import make_instance
from .test_api import api_settings, app, client  # noqa: F401 (fixtures)


def _sops(ctx) -> set[str]:
    return {r[0] for r in ctx.index.run_sql("select SOPInstanc from DICOMImages")[1]}


def _batch_with_nul(folder: Path) -> tuple[list, list]:
    """20 normal instances and two with a NUL inside an indexed text value (one batch)."""
    good = [make_instance(folder / f"good{i:02d}.dcm", PatientID="PNUL") for i in range(20)]
    bad = [make_instance(folder / "coil.dcm", PatientID="PNUL", ReceiveCoilName="Coil\x00X"),
           make_instance(folder / "pid.dcm", PatientID="A\x00B")]
    return good, bad


def test_nul_in_a_value_is_cleaned_and_blocks_nothing(ctx, tmp_path):
    """On PostgreSQL a NUL inside a value failed the whole batch (``A string literal cannot contain
    NUL``): the 20 normal instances of that batch were never indexed, and rebuild stopped at 0 rows."""
    good, bad = _batch_with_nul(tmp_path / "in")
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path / "in"])
    assert report.stored == 22 and report.rejected == []
    assert _sops(ctx) == {d.SOPInstanceUID for d in good + bad}
    coil, = ctx.index.run_sql("select ReceivingC from DICOMImages where ReceivingC is not null")[1]
    assert coil == ("Coil X",)
    assert sorted(r[0] for r in ctx.index.run_sql("select PatientID from DICOMPatients")[1]) == ["A B", "PNUL"]
    # the worker's path and rebuild, on the same files
    ctx.index.create(force=True)
    rel = ctx.storage.walk()
    assert Importer(ctx.index, ctx.storage, workers=1).reindex_files(rel).indexed == 22
    ctx.index.create(force=True)
    rebuilt = Importer(ctx.index, ctx.storage, workers=1).rebuild()
    assert rebuilt.indexed == 22 and rebuilt.rejected == [] and ctx.index.count() == 22


def _refuse_image_number(ctx, number: str) -> None:
    """Make the database itself refuse one instance: a trigger on the image table (a real refusal,
    as a value the database cannot hold would give)."""
    with ctx.index.engine.begin() as conn:
        if ctx.index.dialect == "postgresql":
            conn.execute(text(
                "CREATE OR REPLACE FUNCTION pb_test_refuse() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.imagenumbe = '{number}' THEN RAISE EXCEPTION 'refused by the test trigger'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"))
            conn.execute(text("CREATE TRIGGER pb_test_refuse BEFORE INSERT OR UPDATE ON dicomimages "
                              "FOR EACH ROW EXECUTE FUNCTION pb_test_refuse()"))
        else:
            conn.execute(text(f"CREATE TRIGGER pb_test_refuse BEFORE INSERT ON DICOMImages "
                              f"WHEN NEW.ImageNumbe = '{number}' "
                              "BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END"))


def test_a_refused_instance_is_isolated_recorded_and_skipped(ctx, tmp_path):
    """One instance the database refuses fails nothing else: its batch is split until it is alone,
    it is recorded (quarantine, index_failed, with the database's reason), the reconciler does
    not queue it again, rebuild reports and skips it, and indexes it once the database takes it."""
    from pacsbridge.listener.server import reconcile_once
    from pacsbridge.shared.index.quarantine import Quarantine

    from .servers import ThrowawayRedis

    good = [make_instance(tmp_path / "in" / f"g{i:02d}.dcm", PatientID="PISO", InstanceNumber=i) for i in range(20)]
    bad = make_instance(tmp_path / "in" / "bad.dcm", PatientID="PISO", InstanceNumber=666)
    _refuse_image_number(ctx, "666")
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path / "in"])
    assert report.stored == 20
    (path, reason), = report.rejected
    assert path.endswith("bad.dcm") and "refused by the test trigger" in reason
    assert _sops(ctx) == {d.SOPInstanceUID for d in good}
    quarantine = Quarantine(ctx.index.engine)
    (entry,), total = quarantine.list(reason="index_failed")
    assert total == 1 and entry["sop_uid"] == bad.SOPInstanceUID and entry["patient_id"] == "PISO"
    assert "refused by the test trigger" in entry["detail"] and not entry["resolved"]
    assert ctx.storage.absolute(entry["relpath"]).is_file()  # the file stays where it was stored

    # the worker's task on the same files: one entry still, counted twice
    report = Importer(ctx.index, ctx.storage, workers=1).reindex_files(ctx.storage.walk())
    assert report.indexed == 20 and len(report.rejected) == 1
    (entry,), _ = quarantine.list()
    assert entry["attempts"] == 2

    # the reconciler does not queue it for ever
    with ThrowawayRedis() as server:
        assert reconcile_once(ctx.settings.with_(broker_url=server.url), min_age=0) == 0

    # rebuild reports and skips it ...
    ctx.index.create(force=True)
    _refuse_image_number(ctx, "666")
    rebuilt = Importer(ctx.index, ctx.storage, workers=1).rebuild()
    assert rebuilt.indexed == 20 and len(rebuilt.rejected) == 1 and ctx.index.count() == 20
    # ... and indexes it once the database takes it, closing the entry
    with ctx.index.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER pb_test_refuse" + (" ON dicomimages" if ctx.index.dialect == "postgresql"
                                                          else "")))
    rebuilt = Importer(ctx.index, ctx.storage, workers=1).rebuild()
    assert rebuilt.indexed == 21 and rebuilt.rejected == []
    entry = quarantine.get(entry["id"])
    assert entry["resolved"] and entry["decision"] == "indexed"


def test_the_api_and_metrics_show_and_resolve_a_refused_instance(client, ctx, tmp_path):
    """GET /quarantine, GET /quarantine/<id>, POST .../resolve (admin only, audited), the gauge."""
    from .test_api import assert_error, auth

    make_instance(tmp_path / "in" / "ok.dcm", PatientID="PAPI", InstanceNumber=1)
    bad = make_instance(tmp_path / "in" / "bad.dcm", PatientID="PAPI", InstanceNumber=666)
    _refuse_image_number(ctx, "666")
    Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path / "in"])
    page = client.get("/api/v1/quarantine?reason=index_failed&resolved=false", headers=auth("read")).get_json()
    assert page["total"] == 1 and page["items"][0]["sop_uid"] == bad.SOPInstanceUID
    entry = page["items"][0]
    assert client.get(entry["path"], headers=auth("read")).get_json()["detail"] == entry["detail"]
    assert_error(client.get("/api/v1/quarantine/999999", headers=auth("read")), 404)
    assert_error(client.get("/api/v1/quarantine?reason=other", headers=auth("read")), 400, "reason")
    text_ = client.get("/metrics").get_data(as_text=True)
    assert 'pacsbridge_quarantine{reason="index_failed",state="open"} 1.0' in text_
    resolve = entry["path"] + "/resolve"
    assert_error(client.post(resolve, json={"decision": "retry"}, headers=auth("user")), 403)
    assert_error(client.post(resolve, json={"decision": "correct"}, headers=auth("admin")), 400, "decision")
    assert_error(client.post(resolve, json={"decision": "retry"}, headers=auth("admin")), 409)  # still refused
    with ctx.index.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER pb_test_refuse" + (" ON dicomimages" if ctx.index.dialect == "postgresql"
                                                          else "")))
    done = client.post(resolve, json={"decision": "retry"}, headers=auth("admin"))
    assert done.status_code == 200, done.get_json()
    body = done.get_json()
    assert body["resolved"] and body["decision"] == "retry" and body["resolved_by"] == "ada"
    assert bad.SOPInstanceUID in _sops(ctx)
    assert_error(client.post(resolve, json={"decision": "discard"}, headers=auth("admin")), 409)
    text_ = client.get("/metrics").get_data(as_text=True)
    assert 'pacsbridge_quarantine{reason="index_failed",state="resolved"} 1.0' in text_


# -- item 5: one UID, two patients -------------------------------------------------------------
def _context(settings, duplicates):
    from pacsbridge.shared.index.context import open_context

    ctx = open_context(settings.with_(duplicates=duplicates))
    ctx.index.create()
    ctx.storage.ensure()
    return ctx


def _tables(ctx):
    out = {}
    with ctx.index.engine.connect() as conn:
        for t in ("DICOMPatients", "DICOMStudies", "DICOMSeries", "DICOMImages"):
            out[t] = sorted(tuple(r)[:4] + (r[-2],) if t == "DICOMImages" else tuple(r)[:4]
                            for r in conn.execute(text(f"select * from {t}")))  # fixed names
    return out


def _patient_b(folder: Path, a, level: str):
    shared = {"study": {"StudyInstanceUID": a.StudyInstanceUID},
              "series": {"SeriesInstanceUID": a.SeriesInstanceUID},
              "image": {"SOPInstanceUID": a.SOPInstanceUID}}[level]
    return make_instance(folder / "b.dcm", PatientID="PATB", PatientName="B^B", **shared)


@pytest.mark.parametrize("duplicates", ["keep", "replace", "keep-both"])
@pytest.mark.parametrize("level", ["study", "series", "image"])
def test_a_uid_of_two_patients_is_set_aside_never_mixed(settings, tmp_path, level, duplicates):
    """Patient B's instance sharing A's Study / Series / SOP Instance UID took over A's rows (a repack
    of B exported A's image, one of A found nothing), and each re-index flipped them back and forth."""
    from pacsbridge.shared.index.quarantine import Quarantine

    ctx = _context(settings, duplicates)
    try:
        a1 = make_instance(tmp_path / "a" / "a1.dcm", PatientID="PATA", PatientName="A^A")
        a2 = make_instance(tmp_path / "a" / "a2.dcm", PatientID="PATA", PatientName="A^A",
                           StudyInstanceUID=a1.StudyInstanceUID, SeriesInstanceUID=a1.SeriesInstanceUID)
        imp = Importer(ctx.index, ctx.storage, workers=1)
        imp.import_paths([tmp_path / "a"])
        b = _patient_b(tmp_path / "b", a1, level)
        report = imp.import_paths([tmp_path / "b"])
        assert report.stored == 0 and len(report.rejected) == 1 and "quarantined" in report.rejected[0][1]
        (entry,), _ = Quarantine(ctx.index.engine).list(reason="uid_conflict")
        assert entry["level"] == level and entry["patient_id"] == "PATB" and entry["other_patient_id"] == "PATA"
        assert entry["sop_uid"] == b.SOPInstanceUID and entry["relpath"].startswith(".quarantine/")
        assert ctx.storage.absolute(entry["relpath"]).is_file()
        # a selection of B (what repack and push resolve) finds nothing, one of A finds A's two
        # files, with A's own data
        from pacsbridge.worker.selection import resolve

        assert resolve(ctx.index, ctx.storage, {"PatientID": "PATB"}).instances == []
        study = resolve(ctx.index, ctx.storage, {"StudyInstanceUID": a1.StudyInstanceUID}).instances
        assert len(study) == 2 and {i.patient_id for i in study} == {"PATA"}
        chosen = resolve(ctx.index, ctx.storage, {"PatientID": "PATA"}).instances
        assert sorted(i.sop_uid for i in chosen) == sorted([a1.SOPInstanceUID, a2.SOPInstanceUID])
        assert all(pydicom.dcmread(i.path).PatientID == "PATA" for i in chosen)
        assert ctx.index.files_for(patient="PATB") == []
        a_files = ctx.index.files_for(patient="PATA")
        assert sorted(f["sop"] for f in a_files) == sorted([a1.SOPInstanceUID, a2.SOPInstanceUID])
        for f in a_files:
            assert pydicom.dcmread(ctx.storage.absolute(f["ObjectFile"])).PatientID == "PATA"
        assert ctx.index.run_sql("select PatientID from DICOMPatients")[1] == [("PATA",)]
        before = _tables(ctx)
        # rebuild (twice, from nothing) gives the same index, and recognises the quarantine area
        for _ in range(2):
            ctx.index.create(force=True)
            rebuilt = Importer(ctx.index, ctx.storage, workers=1).rebuild()
            assert rebuilt.rejected == [] and rebuilt.quarantined == 0
            assert _tables(ctx) == before
        assert Quarantine(ctx.index.engine).list()[1] == 1
    finally:
        ctx.index.engine.dispose()


def test_a_conflict_inside_one_batch_and_a_lost_entry(ctx, tmp_path):
    """Two patients in one batch (the worker's task): the later one is set aside. The quarantine area
    is storage's: a rebuild on a new database records what it holds, and indexes none of it."""
    from pacsbridge.shared.index.quarantine import Quarantine

    a = make_instance(tmp_path / "in" / "a.dcm", PatientID="PATA")
    make_instance(tmp_path / "in" / "b.dcm", PatientID="PATB", StudyInstanceUID=a.StudyInstanceUID)
    for name in ("a.dcm", "b.dcm"):
        ctx.storage.store((tmp_path / "in" / name).read_bytes(), pydicom.dcmread(tmp_path / "in" / name))
    report = Importer(ctx.index, ctx.storage, workers=1).reindex_files(ctx.storage.walk())
    assert report.indexed == 1 and len(report.rejected) == 1
    assert ctx.index.run_sql("select PatientID from DICOMPatients")[1] == [("PATA",)]
    quarantine = Quarantine(ctx.index.engine)
    (entry,), _ = quarantine.list()
    assert entry["patient_id"] == "PATB" and entry["level"] == "study"
    with ctx.index.engine.begin() as conn:
        conn.execute(text("delete from pacsbridge_quarantine"))
    ctx.index.create(force=True)
    rebuilt = Importer(ctx.index, ctx.storage, workers=1).rebuild()
    assert rebuilt.indexed == 1 and rebuilt.quarantined == 1
    (found,), _ = quarantine.list()
    assert found["relpath"] == entry["relpath"] and found["patient_id"] == "PATB"
    assert ctx.index.run_sql("select PatientID from DICOMPatients")[1] == [("PATA",)]


def test_an_admin_resolves_uid_conflicts_each_audited(client, ctx, tmp_path, caplog):
    """correct (a merge resend: the newer PatientID wins, the whole study and its files follow, the
    rest of the resend is released), new-patient (a copy with new UIDs, the original untouched) and
    discard; who and when are in the entry and the log; a rebuild afterwards gives the same index."""
    import logging

    from pacsbridge.shared.index.quarantine import Quarantine

    from .test_api import assert_error, auth

    caplog.set_level(logging.WARNING)
    a = [make_instance(tmp_path / "a" / f"a{i}.dcm", PatientID="PATA", PatientName="A^A", InstanceNumber=i)
         for i in range(2)]
    a[1].StudyInstanceUID, a[1].SeriesInstanceUID = a[0].StudyInstanceUID, a[0].SeriesInstanceUID
    a[1].save_as(tmp_path / "a" / "a1.dcm", enforce_file_format=True)
    imp = Importer(ctx.index, ctx.storage, workers=1)
    imp.import_paths([tmp_path / "a"])
    # the PACS merged A into B and sends the study again: same UIDs, PatientID PATB
    (tmp_path / "b").mkdir()
    for i, d in enumerate(a):
        d.PatientID, d.PatientName = "PATB", "B^B"
        d.save_as(tmp_path / "b" / f"b{i}.dcm", enforce_file_format=True)
    imp.import_paths([tmp_path / "b"])
    page = client.get("/api/v1/quarantine?reason=uid_conflict", headers=auth("read")).get_json()
    assert page["total"] == 2 and {e["patient_id"] for e in page["items"]} == {"PATB"}
    first = page["items"][-1]
    assert_error(client.post(first["path"] + "/resolve", json={"decision": "correct"}, headers=auth("user")), 403)
    assert_error(client.post(first["path"] + "/resolve", json={"decision": "retry"}, headers=auth("admin")), 400,
                 "decision")
    done = client.post(first["path"] + "/resolve", json={"decision": "correct"}, headers=auth("admin"))
    assert done.status_code == 200, done.get_json()
    assert done.get_json()["decision"] == "correct" and done.get_json()["resolved_by"] == "ada"
    assert "decided by ada" in caplog.text
    # the whole study follows B, in the index and in its files; the rest of the resend is released
    assert ctx.index.files_for(patient="PATA") == []
    b_files = ctx.index.files_for(patient="PATB")
    assert sorted(f["sop"] for f in b_files) == sorted(d.SOPInstanceUID for d in a)
    for f in b_files:
        assert pydicom.dcmread(ctx.storage.absolute(f["ObjectFile"])).PatientID == "PATB"
    assert client.get("/api/v1/quarantine?resolved=false", headers=auth("read")).get_json()["total"] == 0
    assert not [p for p in (ctx.storage.root / ".quarantine").rglob("*") if p.is_file()]

    # another patient who reuses the study UID: kept as a new instance, the original untouched
    c = make_instance(tmp_path / "c" / "c.dcm", PatientID="PATC", StudyInstanceUID=a[0].StudyInstanceUID)
    imp.import_paths([tmp_path / "c"])
    (entry,), _ = Quarantine(ctx.index.engine).list(resolved=False)
    original = ctx.storage.absolute(entry["relpath"]).read_bytes()
    done = client.post(entry["path"] + "/resolve", json={"decision": "new-patient"}, headers=auth("admin"))
    assert done.status_code == 200, done.get_json()
    c_files = ctx.index.files_for(patient="PATC")
    assert len(c_files) == 1 and c_files[0]["sop"] != c.SOPInstanceUID and c_files[0]["study"] != c.StudyInstanceUID
    copy = pydicom.dcmread(ctx.storage.absolute(c_files[0]["ObjectFile"]))
    assert copy.PatientID == "PATC" and copy.file_meta.MediaStorageSOPInstanceUID == copy.SOPInstanceUID
    assert ctx.storage.absolute(entry["relpath"]).read_bytes() == original
    assert len(ctx.index.files_for(patient="PATB")) == 2

    # discard
    make_instance(tmp_path / "d" / "d.dcm", PatientID="PATD", SeriesInstanceUID=a[0].SeriesInstanceUID)
    imp.import_paths([tmp_path / "d"])
    entry = client.get("/api/v1/quarantine?resolved=false", headers=auth("read")).get_json()["items"][0]
    assert client.post(entry["path"] + "/resolve", json={"decision": "discard"},
                       headers=auth("admin")).status_code == 200
    assert not ctx.storage.absolute(entry["relpath"]).exists()
    text_ = client.get("/metrics").get_data(as_text=True)
    assert 'pacsbridge_quarantine{reason="uid_conflict",state="resolved"} 4.0' in text_
    assert 'pacsbridge_quarantine{reason="uid_conflict",state="open"} 0.0' in text_

    before = _tables(ctx)
    ctx.index.create(force=True)
    rebuilt = Importer(ctx.index, ctx.storage, workers=1).rebuild()
    assert rebuilt.rejected == [] and rebuilt.quarantined == 0
    assert _tables(ctx) == before


def test_the_quarantine_verb(settings, tmp_path):
    """``pacsbridge quarantine list|show|resolve``, run as a user runs it."""
    import json
    import subprocess
    import sys

    from .conftest import cli_env

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pacsbridge.cli", *map(str, args)], env=cli_env(settings),
                              capture_output=True, text=True, timeout=120)

    a = make_instance(tmp_path / "a" / "a.dcm", PatientID="PATA")
    make_instance(tmp_path / "b" / "b.dcm", PatientID="PATB", StudyInstanceUID=a.StudyInstanceUID)
    assert run("import", tmp_path / "a").returncode == 0
    proc = run("import", tmp_path / "b")
    assert proc.returncode == 1 and "quarantined" in proc.stderr
    (entry,) = json.loads(run("quarantine", "list", "--format", "json").stdout)
    assert entry["reason"] == "uid_conflict" and entry["patient_id"] == "PATB"
    shown = json.loads(run("quarantine", "show", entry["id"], "--format", "json").stdout)
    assert shown["other_patient_id"] == "PATA" and not shown["resolved"]
    proc = run("quarantine", "resolve", entry["id"], "retry")
    assert proc.returncode == 2 and "decision" in proc.stderr
    proc = run("quarantine", "resolve", entry["id"], "discard", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resolved_by"].startswith("cli:")
    assert json.loads(run("quarantine", "list", "--format", "json").stdout) == []
    assert len(json.loads(run("quarantine", "list", "--state", "all", "--format", "json").stdout)) == 1


def test_through_the_listener_and_a_worker_on_postgresql(tmp_path, pg_url):
    """The reported case, end to end: instances stored over DICOM (acknowledged), a NUL in two of
    them and a UID of another patient in one; the worker on the real PostgreSQL indexes every normal
    instance, sets the conflicting one aside, and the reconciler queues nothing again."""
    from pacsbridge.shared.index.context import open_context
    from pacsbridge.shared.index.quarantine import Quarantine

    from .servers import ThrowawayRedis
    from .test_listener import Stack, indexed_sops, storescu

    broker = ThrowawayRedis()
    broker.start()
    stack = Stack(tmp_path, database_url=pg_url, broker_url=broker.url)
    try:
        folder = tmp_path / "send"
        good, bad = _batch_with_nul(folder)
        other = make_instance(folder / "zz-other.dcm", PatientID="OTHER", StudyInstanceUID=good[0].StudyInstanceUID)
        stack.start("listener")
        stack.start("worker", "--concurrency", "1")
        proc = storescu(stack.port, *sorted(folder.iterdir()))
        assert proc.returncode == 0, proc.stderr
        expected = {d.SOPInstanceUID for d in good + bad}
        assert indexed_sops(stack.settings, 22, timeout=90) == expected
        ctx = open_context(stack.settings)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not Quarantine(ctx.index.engine).list()[1]:
            time.sleep(0.3)
        (entry,), _ = Quarantine(ctx.index.engine).list()
        assert entry["reason"] == "uid_conflict" and entry["sop_uid"] == other.SOPInstanceUID
        time.sleep(3)  # whatever the reconciler queued at start (min age 0 here) is done
        queued = "".join(p.read_text() for p in stack.logs.iterdir()).count("were not indexed; queued them")
        time.sleep(5)  # two more reconciler periods: nothing is queued again, nothing changes
        assert indexed_sops(stack.settings, 22, timeout=1) == expected
        assert Quarantine(ctx.index.engine).list()[1] == 1
        ctx.index.engine.dispose()
        logs = "".join(p.read_text() for p in stack.logs.iterdir())
        assert logs.count("were not indexed; queued them") == queued
    finally:
        stack.close()
        broker.stop()


def test_two_workers_indexing_two_patients_of_one_study_at_once(tmp_path, db_url):
    """Two index tasks at the same moment (two worker processes), one per patient, same Study UID:
    exactly one patient is indexed under the study, the other is set aside, every round."""
    import threading

    from pacsbridge.shared.core.config import Settings
    from pacsbridge.shared.index.context import open_context
    from pacsbridge.shared.index.quarantine import Quarantine

    settings = Settings(database_url=db_url, storage=tmp_path / "data", fsync=False)
    ctxs = [open_context(settings) for _ in range(2)]
    ctxs[0].index.create()
    ctxs[0].storage.ensure()
    try:
        for round_ in range(15):
            study = pydicom.uid.generate_uid()
            rels = []
            for who in ("A", "B"):
                path = tmp_path / "in" / f"{round_}{who}.dcm"
                ds = make_instance(path, PatientID=f"R{round_}{who}", StudyInstanceUID=study)
                rels.append([ctxs[0].storage.store(path, ds).relpath])
            barrier = threading.Barrier(2)
            errors = []

            def index(i):
                try:
                    imp = Importer(ctxs[i].index, ctxs[i].storage, workers=1)
                    barrier.wait()  # noqa: B023 (called and joined within the iteration)
                    imp.reindex_files(rels[i])  # noqa: B023 (called and joined within the iteration)
                except Exception as exc:  # reported below
                    errors.append(exc)  # noqa: B023 (called and joined within the iteration)

            threads = [threading.Thread(target=index, args=(i,)) for i in range(2)]
            [t.start() for t in threads]
            [t.join(60) for t in threads]
            assert errors == []
            owners = {r[0] for r in ctxs[0].index.run_sql(
                f"select PatientID from DICOMStudies where StudyInsta = '{study}'")[1]}  # a generated UID
            series_owners = {r[0] for r in ctxs[0].index.run_sql(
                f"select SeriesPat from DICOMSeries where StudyInsta = '{study}'")[1]}
            assert len(owners) == 1 and series_owners == owners, (round_, owners, series_owners)
        assert Quarantine(ctxs[0].index.engine).list(reason="uid_conflict")[1] == 15
    finally:
        for c in ctxs:
            c.index.engine.dispose()


def test_a_stored_file_that_is_not_an_instance_is_recorded_not_queued_for_ever(ctx, tmp_path):
    """A file in storage the worker rejects (truncated, not DICOM, a stray dot file now that the walk
    sees dot names) is recorded once; the reconciler then leaves it alone."""
    from pacsbridge.listener.server import reconcile_once
    from pacsbridge.shared.index.quarantine import Quarantine

    from .servers import ThrowawayRedis

    make_instance(tmp_path / "ok.dcm", PatientID="PSTRAY")
    Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path / "ok.dcm"])
    data = (ctx.storage.root / ctx.storage.walk()[0]).read_bytes()
    (ctx.storage.root / "PSTRAY" / "cut.dcm").write_bytes(data[:-100])
    (ctx.storage.root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    report = Importer(ctx.index, ctx.storage, workers=1).reindex_files(ctx.storage.walk())
    assert report.indexed == 1 and len(report.rejected) == 2
    entries, total = Quarantine(ctx.index.engine).list(reason="index_failed")
    assert total == 2 and {e["relpath"] for e in entries} == {"PSTRAY/cut.dcm", ".DS_Store"}
    assert any("runs to byte" in e["detail"] for e in entries)
    with ThrowawayRedis() as server:
        assert reconcile_once(ctx.settings.with_(broker_url=server.url), min_age=0) == 0


def test_a_conflict_indexed_in_place_is_never_moved_or_deleted(client, ctx, tmp_path):
    """``import --in-place``: the file is the user's, outside storage; it is set aside where it lies,
    and neither the conflict nor a discard moves or deletes it. A decision on an entry whose file is
    gone is a 409, not a 500."""
    from .test_api import assert_error, auth

    a = make_instance(tmp_path / "a" / "a.dcm", PatientID="PATA")
    Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path / "a"])
    b = tmp_path / "ext" / "b.dcm"
    make_instance(b, PatientID="PATB", StudyInstanceUID=a.StudyInstanceUID)
    before = b.read_bytes()
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path / "ext"], in_place=True)
    assert report.indexed == 0 and len(report.rejected) == 1
    entry = client.get("/api/v1/quarantine", headers=auth("read")).get_json()["items"][0]
    assert entry["relpath"] == str(b.resolve())
    assert client.post(entry["path"] + "/resolve", json={"decision": "discard"},
                       headers=auth("admin")).status_code == 200
    assert b.read_bytes() == before
    # an entry whose stored file was removed by hand
    c = make_instance(tmp_path / "c" / "c.dcm", PatientID="PATC", StudyInstanceUID=a.StudyInstanceUID)
    Importer(ctx.index, ctx.storage, workers=1).import_paths([tmp_path / "c"])
    entry = client.get("/api/v1/quarantine?resolved=false", headers=auth("read")).get_json()["items"][0]
    assert entry["sop_uid"] == c.SOPInstanceUID
    ctx.storage.absolute(entry["relpath"]).unlink()
    assert_error(client.post(entry["path"] + "/resolve", json={"decision": "correct"}, headers=auth("admin")), 409)
    assert client.post(entry["path"] + "/resolve", json={"decision": "discard"},
                       headers=auth("admin")).status_code == 200
