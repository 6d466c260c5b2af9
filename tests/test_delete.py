"""Deleting a patient, a study or a series: the job (rows in one transaction with the audit, then the files),
what a crash between the two leaves and how the job finishes it, ``rebuild`` agreeing afterwards, the API's
DELETE routes (admin only, hostile values) and the CLI, on SQLite and the real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacsbridge.shared.core.schema import arrivals_table, audit_table
from pacsbridge.shared.index import removal
from pacsbridge.shared.index.importer import Importer
from pacsbridge.shared.index.storage import OWN_FOLDERS
from pacsbridge.shared.jobs.store import JobStore
from pacsbridge.worker import runner

from .conftest import cli_env
from .helpers import make_instance
from .test_api import assert_error, auth

PB = [sys.executable, "-m", "pacsbridge.cli"]


def _archive(ctx, tmp_path: Path) -> dict[str, list]:
    """Two patients: A with a study of two series (3 + 2 instances) and a second study (1), B with one (2)."""
    src = tmp_path / "src"
    a1, a2, b1 = generate_uid(), generate_uid(), generate_uid()
    layout = {"A": [(a1, generate_uid(), 3), (a1, generate_uid(), 2), (a2, generate_uid(), 1)],
              "B": [(b1, generate_uid(), 2)]}
    out: dict[str, list] = {}
    for patient, series in layout.items():
        for study, uid, n in series:
            for i in range(n):
                ds = make_instance(src / f"{uid}-{i}.dcm", PatientID=patient, StudyInstanceUID=study,
                                   SeriesInstanceUID=uid, Modality="MR" if n == 2 else "CT")
                out.setdefault(patient, []).append(ds)
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([src])
    assert report.stored == 8
    return out


def _files(ctx) -> set[str]:
    root = ctx.storage.root
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
            and p.relative_to(root).parts[0] not in OWN_FOLDERS}


def _sops(ctx) -> set[str]:
    return {r[0] for r in ctx.index.run_sql("select SOPInstanc from DICOMImages")[1]}


def _count(ctx, table) -> int:
    with ctx.index.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _rebuild_agrees(ctx) -> None:
    """``rebuild --missing --prune``: nothing to prune (no row lost its file) and nothing to add (no file
    lost its rows)."""
    report = Importer(ctx.index, ctx.storage, workers=1).rebuild(missing_only=True, prune=True)
    assert report.pruned == 0 and report.indexed == 0 and report.stored == 0, report.as_dict()


def _run_delete(ctx, key: str, value: str, owner: str = "ops"):
    jobs = JobStore(ctx.index.engine)
    job, _ = jobs.submit("delete", {"selection": {key: [value]}}, owner=owner)
    return runner.run_job(job.id, ctx, jobs)


def test_delete_a_series_then_a_study_then_a_patient(ctx, tmp_path):
    held = _archive(ctx, tmp_path)
    a = held["A"]
    series = a[0].SeriesInstanceUID
    before = _files(ctx)
    done = _run_delete(ctx, "SeriesInstanceUID", series)
    assert done.state == "succeeded", done.error
    assert done.result["instances"] == 3 and done.result["files_removed"] == 3 and done.result["studies"] == 0
    assert [s.state for s in done.series] == ["done"] and done.series[0].expected == 3
    assert _sops(ctx) == {d.SOPInstanceUID for d in a[3:] + held["B"]}
    assert len(before - _files(ctx)) == 3 and not (ctx.storage.root / "A" / a[0].StudyInstanceUID / series).exists()
    # the study keeps its other series, and its modalities follow (MR only now)
    mods = ctx.index.run_sql(f"select StudyModal from DICOMStudies where StudyInsta = '{a[0].StudyInstanceUID}'")[1]
    assert mods == [("MR",)]
    _rebuild_agrees(ctx)

    done = _run_delete(ctx, "StudyInstanceUID", a[0].StudyInstanceUID)
    assert done.state == "succeeded" and done.result["studies"] == 1 and done.result["patients"] == 0
    assert _sops(ctx) == {d.SOPInstanceUID for d in a[5:] + held["B"]}

    done = _run_delete(ctx, "PatientID", "A")
    assert done.state == "succeeded" and done.result["patients"] == 1
    assert _sops(ctx) == {d.SOPInstanceUID for d in held["B"]}
    assert ctx.index.count("Patient") == 1 and ctx.index.count("Study") == 1 and ctx.index.count("Series") == 1
    assert not (ctx.storage.root / "A").exists()  # emptied folders go too
    assert len(_files(ctx)) == 2
    _rebuild_agrees(ctx)
    with ctx.index.engine.connect() as conn:
        audit = conn.execute(select(audit_table).where(audit_table.c.action == "delete")).all()
        left = conn.execute(select(func.count()).select_from(arrivals_table)
                            .where(arrivals_table.c.patient_id == "A")).scalar_one()
    assert left == 0
    assert len(audit) == 3 and {r.actor for r in audit} == {"ops"}
    assert sum(len(json.loads(r.detail)["files"]) for r in audit) == 6

    assert _run_delete(ctx, "PatientID", "A").state == "failed"  # nothing left: said, nothing else touched
    assert len(_files(ctx)) == 2


def test_a_crash_between_rows_and_files_is_finished_by_the_next_run(ctx, tmp_path, monkeypatch):
    """Rows go first (with the audit naming the files), files second: a crash in between leaves files without
    rows, never rows without files (rebuild --prune has nothing to do), and the retried job unlinks them."""
    held = _archive(ctx, tmp_path)
    real = removal.unlink_files

    def crash(*args, **kwargs):  # the worker dies after the commit, before any unlink
        raise SystemExit("killed")

    monkeypatch.setattr(removal, "unlink_files", crash)
    jobs = JobStore(ctx.index.engine)
    job, _ = jobs.submit("delete", {"selection": {"PatientID": ["B"]}}, owner="ops")
    with pytest.raises(SystemExit):
        runner.run_job(job.id, ctx, jobs)
    monkeypatch.setattr(removal, "unlink_files", real)
    assert _sops(ctx) == {d.SOPInstanceUID for d in held["A"]}  # B's rows are gone
    assert len(_files(ctx)) == 8  # its files are still there
    assert all((ctx.storage.root / f).is_file() for f in ctx.index.object_files())  # no row lost its file
    from sqlalchemy import update

    from pacsbridge.shared.core.schema import jobs_table

    with ctx.index.engine.begin() as conn:  # as the sweeper does with a job whose worker died
        conn.execute(update(jobs_table).where(jobs_table.c.id == job.id).values(state="queued", worker=""))
    done = runner.run_job(job.id, ctx, jobs)
    assert done.state == "succeeded" and done.result["finished_earlier"] == 2  # the files the first run left
    assert len(_files(ctx)) == 6 and ctx.index.count("Patient") == 1 and ctx.index.count("Study") == 2
    _rebuild_agrees(ctx)


def test_a_job_using_the_study_keeps_it(ctx, tmp_path):
    held = _archive(ctx, tmp_path)
    jobs = JobStore(ctx.index.engine)
    push, _ = jobs.submit("repack", {"selection": {"StudyInstanceUID": [held["B"][0].StudyInstanceUID]},
                                     "dest": "x", "template": "px-repack", "link": False})
    done = _run_delete(ctx, "PatientID", "B")
    assert done.state == "failed" and push.id in done.error and "nothing was deleted" in done.error
    assert len(_sops(ctx)) == 8 and len(_files(ctx)) == 8


def test_a_row_pointing_outside_the_storage_is_not_followed(ctx, tmp_path):
    held = _archive(ctx, tmp_path)
    outside = tmp_path / "precious.dcm"
    outside.write_bytes(b"keep me")
    sop = held["B"][0].SOPInstanceUID
    ctx.index.run_sql(f"update DICOMImages set ObjectFile = '../precious.dcm' where SOPInstanc = '{sop}'", write=True)
    (ctx.storage.root / "B" / "link").symlink_to(tmp_path)
    other = held["B"][1].SOPInstanceUID
    ctx.index.run_sql(f"update DICOMImages set ObjectFile = 'B/link/precious.dcm' where SOPInstanc = '{other}'",
                      write=True)
    done = _run_delete(ctx, "PatientID", "B")
    assert done.state == "partial" and done.result["files_refused"] == 2, done.result
    assert outside.read_bytes() == b"keep me"
    assert _sops(ctx) == {d.SOPInstanceUID for d in held["A"]}


# -- the API ----------------------------------------------------------------------------
@pytest.fixture
def api(settings, tmp_path):
    from pacsbridge.api import create_app

    from .test_api import TOKEN_SPEC
    from .test_listener import free_port

    app = create_app({"SETTINGS": settings.with_(api_tokens=TOKEN_SPEC, listener_port=free_port(),
                                                 broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}"),
                      "TESTING": True})
    yield app
    app.extensions["pacsbridge"].close()


def test_delete_routes_admin_only_hostile_values_and_a_job(api, tmp_path):
    st = api.extensions["pacsbridge"]
    held = _archive(st.ctx, tmp_path)
    client = api.test_client()
    study = held["A"][0].StudyInstanceUID
    files = _files(st.ctx)
    for role in ("read", "user"):
        assert_error(client.delete(f"/api/v1/studies/{study}", headers=auth(role)), 403)
    hostile = ["/api/v1/studies/..", "/api/v1/studies/..%2F..%2Fetc", "/api/v1/series/1.2.3%00",
               "/api/v1/studies/1.2.3%2F..%2F..", "/api/v1/patients/..%5C..%5Cx", "/api/v1/patients/A*",
               "/api/v1/studies/1.2.999999", "/api/v1/patients/NOBODY", f"/api/v1/series/{study}.1",
               "/api/v1/studies/" + "1." * 40 + "1"]
    for path in hostile:
        resp = client.delete(path, headers=auth("admin"))
        assert resp.status_code in (400, 404, 405), (path, resp.status_code)
    assert st.jobs.list()[1] == 0 and _files(st.ctx) == files  # no job, nothing deleted

    resp = client.delete(f"/api/v1/studies/{study}", headers=auth("admin"))
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    assert body["job"]["kind"] == "delete" and body["job"]["params"] == {"selection": {"StudyInstanceUID": [study]}}
    again = client.delete(f"/api/v1/studies/{study}", headers=auth("admin"))
    assert again.status_code == 200 and again.get_json()["id"] == body["id"]  # the same deletion, queued
    done = runner.run_job(body["id"], st.ctx, st.jobs)
    assert done.state == "succeeded" and done.owner == "ada"
    assert _sops(st.ctx) == {d.SOPInstanceUID for d in held["A"][5:] + held["B"]}
    assert_error(client.post(f"/api/v1/jobs/{body['id']}/retry", headers=auth("user")), 403)
    audit = client.get("/api/v1/audit?action=delete_request", headers=auth("admin")).get_json()
    assert [e["target"] for e in audit["items"]] == [f"job {body['id']}"] and audit["items"][0]["actor"] == "ada"
    # a POST /jobs with kind delete is not a way around the admin role
    assert_error(client.post("/api/v1/jobs", json={"kind": "delete", "selection": {"PatientID": "B"}},
                             headers=auth("user")), 400, "kind")


def test_cli_delete_offline(settings, ctx, tmp_path):
    held = _archive(ctx, tmp_path)
    env = cli_env(settings)
    proc = subprocess.run(PB + ["delete", "--series", held["B"][0].SeriesInstanceUID, "--offline", "--yes",
                                "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["instances"] == 2 and report["files_removed"] == 2 and report["patients"] == 1
    assert _sops(ctx) == {d.SOPInstanceUID for d in held["A"]}
    proc = subprocess.run(PB + ["delete", "--patient", "NOBODY", "--offline", "--yes"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "nothing in the index matches" in proc.stderr
    _rebuild_agrees(ctx)


# -- the retention policy ---------------------------------------------------------------------
def test_retention_purges_what_was_delivered_long_ago_and_nothing_else(ctx, tmp_path):
    """A real repack job delivers study A1 (two series); one of them grows afterwards. Ten days on, with
    PACSBRIDGE_RETENTION_DAYS=10, only the delivered series that did not grow goes; what was never
    delivered (A2, B) and what grew stay. The next pass reads nothing twice."""
    import time

    from pacsbridge.shared.jobs import retention

    held = _archive(ctx, tmp_path)
    ctx = ctx._replace(settings=ctx.settings.with_(export_root=tmp_path / "export"))
    jobs = JobStore(ctx.index.engine)
    a1 = held["A"][0].StudyInstanceUID
    repack, _ = jobs.submit("repack", {"selection": {"StudyInstanceUID": [a1]}, "dest": "out",
                                       "template": "px-repack", "link": False})
    assert runner.run_job(repack.id, ctx, jobs).state == "succeeded"
    grown = held["A"][3].SeriesInstanceUID  # the MR series of A1 (2 instances delivered)
    kept_whole = held["A"][0].SeriesInstanceUID  # the CT series of A1 (3 delivered)
    late = tmp_path / "late"
    make_instance(late / "x.dcm", PatientID="A", StudyInstanceUID=a1, SeriesInstanceUID=grown, Modality="MR")
    Importer(ctx.index, ctx.storage, workers=1).import_paths([late])

    submitted = []

    def submit(params):
        job, _ = jobs.submit("delete", params, owner=retention.OWNER)
        submitted.append(job.id)
        return job.id

    soon = retention.run_pass(ctx.index.engine, ctx.index, 10, submit, now=time.time() + 5 * 86400)
    assert soon.jobs == 0 and submitted == [] and retention.checkpoint(ctx.index.engine) == 0.0  # not due yet
    found = retention.run_pass(ctx.index.engine, ctx.index, 10, submit, now=time.time() + 11 * 86400)
    assert found.series == [kept_whole] and found.jobs == 1 and len(submitted) == 1
    done = runner.run_job(submitted[0], ctx, jobs)
    assert done.state == "succeeded" and done.owner == "retention"
    left = _sops(ctx)
    assert not left & {d.SOPInstanceUID for d in held["A"][:3]}
    assert {d.SOPInstanceUID for d in held["A"][3:] + held["B"]} <= left and len(left) == 6
    again = retention.run_pass(ctx.index.engine, ctx.index, 10, submit, now=time.time() + 11 * 86400)
    assert again.jobs == 0 and len(submitted) == 1  # the checkpoint moved past the repack job
    _rebuild_agrees(ctx)


def test_the_sweeper_runs_the_retention_pass(settings, tmp_path):
    from pacsbridge.worker.main import retention_once

    class Broker:
        sent: list = []

        def send_task(self, name, args):
            self.sent.append((name, args))

    from pacsbridge.shared.index.context import open_context

    ctx = open_context(settings)
    ctx.index.create()
    try:
        jobs = JobStore(ctx.index.engine)
        found = retention_once(settings.with_(retention_days=1), Broker(), jobs)
        assert found.jobs == 0 and found.series == [] and Broker.sent == []  # nothing delivered: nothing to do
    finally:
        ctx.index.engine.dispose()


def test_cli_delete_through_a_real_api_and_worker(pg_url, tmp_path):
    """`pacsbridge delete --study UID --follow` with an admin token: the API process submits the job, a
    worker process runs it; a user token is refused (403, exit 2) and deletes nothing. PostgreSQL."""
    from pacsbridge.shared.core.config import Settings
    from pacsbridge.shared.index.context import open_context

    from .test_api import TOKENS, Server

    server = Server(tmp_path, database_url=pg_url)
    try:
        server.worker()
        ctx = open_context(Settings(database_url=pg_url, storage=tmp_path / "data", fsync=False))
        ctx.index.create()
        held = _archive(ctx, tmp_path)
        study = held["A"][0].StudyInstanceUID
        env = {**server.env, "PACSBRIDGE_API_URL": server.url}
        refused = subprocess.run(PB + ["delete", "--study", study, "--token", TOKENS["user"]], env=env,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "403" in refused.stderr and len(_sops(ctx)) == 8
        proc = subprocess.run(PB + ["delete", "--study", study, "--follow", "--format", "json", "--token",
                                    TOKENS["admin"]], env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert _sops(ctx) == {d.SOPInstanceUID for d in held["A"][5:] + held["B"]}
        assert len(_files(ctx)) == 3
        _rebuild_agrees(ctx)
        ctx.index.engine.dispose()
    finally:
        server.close()


def test_a_study_row_without_series_goes_with_its_patient(ctx):
    ctx.index.run_sql("insert into DICOMPatients (PatientID) values ('EMPTY')", write=True)
    ctx.index.run_sql("insert into DICOMStudies (StudyInsta, PatientID) values ('1.2.3.4', 'EMPTY')", write=True)
    done = _run_delete(ctx, "PatientID", "EMPTY")
    assert done.state == "succeeded" and done.result["studies"] == 1 and done.result["patients"] == 1
    assert ctx.index.count("Patient") == 0 and ctx.index.count("Study") == 0
