"""DICOMweb transfers through the jobs: WADO-RS / WADO-URI retrieve and STOW-RS push, against real Orthancs with
their DICOMweb plugin, and our misbehaving server (tests/webserver.py) for the faults.

Jobs run in this process (:func:`pacsbridge.worker.runner.run_job`). Until the node model has its DICOMweb
fields, :func:`web_node` sets them on the node (as an admin's PATCH would).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from pydicom.uid import generate_uid

from pacsbridge.shared.core.config import Settings
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.index.context import Context, open_context
from pacsbridge.shared.index.storage import OWN_FOLDERS
from pacsbridge.shared.jobs.store import JobStore
from pacsbridge.worker import runner

from .helpers import TEST_FILES, make_instance
from .orthanc import Orthanc
from .webserver import Handler, WebServer

COMPRESSED = ("JPEG2000.dcm", "MR_small_jp2klossless.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG-lossy.dcm",
              "MR_small_RLE.dcm", "CT_small.dcm")


@pytest.fixture
def both(settings: Settings) -> Iterator[Context]:
    """An index on SQLite, then on PostgreSQL (conftest's ``settings``)."""
    c = open_context(settings)
    c.index.create()
    c.storage.ensure()
    yield c
    c.index.engine.dispose()


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    """An index on SQLite (the PostgreSQL side is covered by the first test's ``both``)."""
    c = open_context(Settings(database_url=f"sqlite:///{tmp_path / 'idx.db'}", storage=tmp_path / "data",
                              fsync=False))
    c.index.create()
    c.storage.ensure()
    yield c
    c.index.engine.dispose()


def study_files(folder: Path, patient: str = "WEB1") -> list[Path]:
    """pydicom's files in several transfer syntaxes as one study, one series per file, plus a series of 5
    generated CT (pixel data and syntaxes untouched)."""
    study = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in COMPRESSED:
        ds = pydicom.dcmread(TEST_FILES / name)
        ds.StudyInstanceUID, ds.PatientID, ds.PatientName = study, patient, "Web^Patient"
        ds.SOPInstanceUID = generate_uid()
        out.append(folder / name)
        ds.save_as(out[-1], enforce_file_format=True)
    series = generate_uid()
    for i in range(5):
        out.append(folder / f"ct{i}.dcm")
        make_instance(out[-1], rows=16, PatientID=patient, PatientName="Web^Patient", StudyInstanceUID=study,
                      SeriesInstanceUID=series, InstanceNumber=i + 1)
    return out


def pacs_of(tmp_path: Path, ctx: Context, name: str = "orthanc", aet: str = "ORTHANC") -> Orthanc:
    """An Orthanc with its DICOMweb plugin that lets our AE C-FIND."""
    return Orthanc(tmp_path / name, aet=aet, modalities={"pb": (ctx.settings.ae_title, "127.0.0.1", 1)},
                   dicomweb=True)


def header(path: Path) -> Any:
    return pydicom.dcmread(path, stop_before_pixels=True)


def orthanc_id(pacs: Orthanc, sop: str) -> str:
    found = pacs.request("POST", "/tools/lookup", sop.encode(), "text/plain")
    return str(next(x["ID"] for x in found if x["Type"] == "Instance"))


def web_node(monkeypatch: pytest.MonkeyPatch, jobs: JobStore, fields: dict[str, dict[str, Any]]) -> None:
    """Give nodes their DICOMweb part (web_url ...) as an admin would (``PATCH /nodes/<name>``). The source
    ``pacs`` is searched by C-FIND (these tests' own servers answer WADO only; QIDO has tests of its own), its
    downloads by the job's mode; a destination prefers DICOMweb, so that a push to it goes by STOW-RS."""
    for name, values in fields.items():
        prefer = "c-get,c-move,wado-rs" if name == "pacs" else "wado-rs,c-get,c-move"
        jobs.update_node(name, {"prefer": prefer, **values})


def add_pacs(ctx: Context, pacs: Orthanc, name: str = "pacs", **kw: Any) -> JobStore:
    jobs = JobStore(ctx.index.engine)
    jobs.add_node(Node(name=name, ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port, **kw))
    return jobs


def stored(ctx: Context) -> dict[str, Path]:
    out = {}
    for p in ctx.settings.storage.rglob("*"):
        if p.is_file() and not set(p.parts) & set(OWN_FOLDERS) and p.suffix != ".db":
            out[str(header(p).SOPInstanceUID)] = p
    return out


def index_sops(ctx: Context) -> set[str]:
    return {r[0] for r in ctx.index.run_sql("select SOPInstanc from DICOMImages")[1]}


def assert_identical(ctx: Context, pacs: Orthanc, sops: set[str]) -> None:
    got = stored(ctx)
    assert set(got) == sops
    for sop, path in got.items():
        assert path.read_bytes() == pacs.get(f"/instances/{orthanc_id(pacs, sop)}/file"), sop
    assert index_sops(ctx) == sops
    assert not [p for p in ctx.storage.incoming.iterdir()], "nothing left in .incoming"


# -- retrieve --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["wado-rs", "wado-uri"])
def test_retrieve_a_study_byte_identical_and_indexed(both, tmp_path, monkeypatch, mode):
    ctx = both
    files = study_files(tmp_path / "src")
    sops = {str(header(f).SOPInstanceUID) for f in files}
    assert len({str(header(f).file_meta.TransferSyntaxUID) for f in files}) >= 4
    with pacs_of(tmp_path, ctx) as pacs:
        pacs.upload(files)
        jobs = add_pacs(ctx, pacs)
        web_node(monkeypatch, jobs, {"pacs": {"web_url": pacs.web_url, "wado_uri_url": pacs.url + "/wado"}})
        job, _ = jobs.submit("retrieve", {"query": {"PatientID": "WEB1"}, "mode": mode}, node="pacs")
        done = runner.run_job(job.id, ctx, jobs)
        assert done is not None and done.state == "succeeded", (done.error, done.result)
        assert_identical(ctx, pacs, sops)
    assert done.result["mode"] == mode
    assert done.result["suboperations"] == {"completed": len(files), "failed": 0, "warning": 0}
    assert done.result["repulls"] == 0 and done.result["indexed"] == len(files)
    rows = {r.series_uid: r for r in done.series}
    per_series = Counter(str(header(f).SeriesInstanceUID) for f in files)
    assert {uid: r.expected for uid, r in rows.items()} == dict(per_series)
    for r in rows.values():
        assert (r.state, r.received, r.indexed, r.failed) == ("done", r.expected, r.expected, 0), r


def test_a_long_series_is_indexed_in_batches_while_it_downloads_each_instance_once(ctx, tmp_path, monkeypatch):
    """A WADO-RS series of 230 instances is indexed in passes of 100 on a thread while the rest streams
    (wado._Indexing): the job ends with all 230 indexed, each once, with one arrival each, and the
    passes really ran during the download (more than one, the first before the last part arrived)."""
    from pacsbridge.shared.nodes import wado

    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(230):
        files.append(tmp_path / "src" / f"{i}.dcm")
        make_instance(files[-1], rows=8, PatientID="WEBLONG", StudyInstanceUID=study, SeriesInstanceUID=series,
                      InstanceNumber=i + 1)
    sops = {str(header(f).SOPInstanceUID) for f in files}
    passes: list[tuple[int, int]] = []  # (instances in the pass, instances stored when it started)
    real_index, real_append = wado._Store._index, wado._Indexing.append
    seen = {"stored": 0}

    def counting_append(self, item):  # type: ignore[no-untyped-def]
        seen["stored"] += 1
        real_append(self, item)
        time.sleep(0.005)  # the pace of a real series' parts (8x8 pixels stream faster than a thread starts)

    def recording_index(self, stored, request_id):  # type: ignore[no-untyped-def]
        passes.append((len(stored), seen["stored"]))
        real_index(self, stored, request_id)

    monkeypatch.setattr(wado._Indexing, "append", counting_append)
    monkeypatch.setattr(wado._Store, "_index", recording_index)
    with pacs_of(tmp_path, ctx) as pacs:
        pacs.upload(files)
        jobs = add_pacs(ctx, pacs)
        web_node(monkeypatch, jobs, {"pacs": {"web_url": pacs.web_url}})
        job, _ = jobs.submit("retrieve", {"query": {"PatientID": "WEBLONG"}, "mode": "wado-rs"}, node="pacs")
        done = runner.run_job(job.id, ctx, jobs)
    assert done is not None and done.state == "succeeded", (done.error, done.result)
    assert done.result["indexed"] == 230 and done.result["repulls"] == 0
    rows = ctx.index.run_sql("select SOPInstanc from DICOMImages")[1]
    assert len(rows) == 230 and {r[0] for r in rows} == sops
    assert sorted(n for n, _ in passes) == [30, 100, 100], passes
    assert passes[0][1] < 230, passes  # the first pass began while instances were still arriving
    arrivals = ctx.index.run_sql("select count(*) from pacsbridge_arrivals")[1][0][0]
    assert arrivals == 230


def test_a_dicomweb_only_node_is_searched_by_qido_and_pulled_by_its_first_preference(ctx, tmp_path):
    """A node with only a web_url (no AE title, no port) and no mode in the job: QIDO-RS finds the study,
    WADO-RS (its first ``prefer``) pulls it, byte for byte; no DIMSE is ever tried with such a node."""
    files = study_files(tmp_path / "src", patient="WEBONLY")
    sops = {str(header(f).SOPInstanceUID) for f in files}
    with pacs_of(tmp_path, ctx) as pacs:
        pacs.upload(files)
        jobs = JobStore(ctx.index.engine)
        jobs.add_node(Node.from_dict({"name": "web", "ae_title": "", "host": "", "port": 0,
                                      "web_url": pacs.web_url, "wado_uri_url": pacs.url + "/wado"}))
        job, _ = jobs.submit("retrieve", {"query": {"PatientID": "WEBONLY"}}, node="web")
        done = runner.run_job(job.id, ctx, jobs)
        assert done is not None and done.state == "succeeded", (done.error, done.result)
        assert done.result["mode"] == "wado-rs"
        assert_identical(ctx, pacs, sops)
        with pytest.raises(Exception, match="DICOMweb only"):  # nothing DIMSE is tried with it
            from pacsbridge.shared.dicom.dimse import associate

            with associate(jobs.get_node("web"), "PACSBRIDGE"):
                pass


class Proxy:
    """Our server in front of Orthanc's DICOMweb: passes requests on, and cuts chosen answers short."""

    def __init__(self, srv: WebServer, pacs: Orthanc) -> None:
        self.srv, self.pacs = srv, pacs
        self.cut: dict[str, int] = {}  # path -> bytes dropped from the end of its next answer
        self.lock = threading.Lock()

    def add(self, path: str) -> None:
        self.srv.route(path, self.route)

    def route(self, h: Handler) -> None:
        req = urllib.request.Request(self.pacs.url + h.path, headers={"Accept": h.headers.get("Accept", "")})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body, ctype = resp.read(), resp.headers.get("Content-Type", "")
        with self.lock:
            cut = self.cut.pop(h.path.split("?")[0], 0)
        if cut:
            h.send_body(200, body[:-cut], ctype, length=len(body))
        else:
            h.send_body(200, body, ctype)


def test_a_series_cut_short_is_completed_by_asking_only_the_missing_instances(ctx, tmp_path, monkeypatch):
    """The series' answer loses its end: the parts that arrived whole are kept, and only the instances still
    missing are asked again, one request each (instances of ~700 kB, so that the body spans several reads)."""
    study, series = generate_uid(), generate_uid()
    files = [tmp_path / "src" / f"{i}.dcm" for i in range(5)]
    for i, f in enumerate(files):
        f.parent.mkdir(exist_ok=True)
        make_instance(f, rows=600, PatientID="CUT1", StudyInstanceUID=study, SeriesInstanceUID=series,
                      InstanceNumber=i + 1)
    sops = [str(header(f).SOPInstanceUID) for f in files]
    with pacs_of(tmp_path, ctx) as pacs, WebServer() as srv:
        pacs.upload(files)
        proxy = Proxy(srv, pacs)
        series_path = f"/dicom-web/studies/{study}/series/{series}"
        proxy.add(series_path)
        for sop in sops:
            proxy.add(f"{series_path}/instances/{sop}")
        proxy.cut[series_path] = 100  # the last part loses its end and its closing delimiter
        jobs = add_pacs(ctx, pacs)
        web_node(monkeypatch, jobs, {"pacs": {"web_url": srv.url + "/dicom-web"}})
        job, _ = jobs.submit("retrieve", {"query": {"SeriesInstanceUID": [series]}, "mode": "wado-rs"},
                             node="pacs")
        done = runner.run_job(job.id, ctx, jobs)
        assert done is not None and done.state == "succeeded", (done.error, done.result)
        assert_identical(ctx, pacs, set(sops))
        asked = [s.path for s in srv.requests]
    assert asked[0] == series_path
    again = [a.rsplit("/", 1)[1] for a in asked[1:]]
    assert all(a.startswith(series_path + "/instances/") for a in asked[1:]), asked
    first = done.result["suboperations"]["completed"] - len(again)  # stored by the first request
    assert 1 <= len(again) < 5 and first == 5 - len(again) and len(set(again)) == len(again), (first, again)
    assert sops[-1] in again  # the part cut short
    assert done.result["repulls"] == 1
    assert [(r.expected, r.received, r.indexed, r.state) for r in done.series] == [(5, 5, 5, "done")]


def test_a_part_of_another_series_or_not_dicom_is_refused_and_the_series_ends_partial(ctx, tmp_path,
                                                                                     monkeypatch):
    """The node answers the series with one good instance, one of another series and one that is not DICOM
    (and then nothing better when asked again): the good one is stored, the others are counted failed with
    their reasons, nothing is left half-stored."""
    from .webserver import answers, multipart_answer

    study, series = generate_uid(), generate_uid()
    good = make_instance(tmp_path / "good.dcm", rows=8, PatientID="BAD1", StudyInstanceUID=study,
                         SeriesInstanceUID=series)
    other = make_instance(tmp_path / "other.dcm", rows=8, PatientID="BAD1", StudyInstanceUID=study)
    with pacs_of(tmp_path, ctx) as pacs, WebServer() as srv:
        # Orthanc lists 3 instances in the series (C-FIND), our server sends what it likes
        extra = [make_instance(tmp_path / f"e{i}.dcm", rows=8, PatientID="BAD1", StudyInstanceUID=study,
                               SeriesInstanceUID=series) for i in range(2)]
        pacs.upload([tmp_path / "good.dcm", tmp_path / "e0.dcm", tmp_path / "e1.dcm"])
        parts = [(tmp_path / "good.dcm").read_bytes(), (tmp_path / "other.dcm").read_bytes(), b"<html>oops</html>"]
        series_path = f"/dicom-web/studies/{study}/series/{series}"
        srv.route(series_path, answers(multipart_answer(parts)))
        for e in extra:
            srv.route(f"{series_path}/instances/{e.SOPInstanceUID}", answers(multipart_answer([b"DICM?"])))
        jobs = add_pacs(ctx, pacs)
        web_node(monkeypatch, jobs, {"pacs": {"web_url": srv.url + "/dicom-web"}})
        job, _ = jobs.submit("retrieve", {"query": {"SeriesInstanceUID": [series]}, "mode": "wado-rs"},
                             node="pacs")
        done = runner.run_job(job.id, ctx, jobs)
    assert done is not None and done.state == "partial", (done.state, done.error)
    assert index_sops(ctx) == {str(good.SOPInstanceUID)}
    assert set(stored(ctx)) == {str(good.SOPInstanceUID)}
    assert not list(ctx.storage.incoming.iterdir())
    [row] = done.series
    assert (row.expected, row.indexed, row.state) == (3, 1, "partial")
    assert "part(s) not stored; first: not a DICOM instance" in row.error, row.error
    notes = " ".join(done.result["notes"])
    assert str(other.SOPInstanceUID) in notes and "not a DICOM instance" in notes, notes


def test_wado_rs_406_to_transfer_syntax_star_asks_again_and_says_so(ctx, tmp_path, monkeypatch):
    files = study_files(tmp_path / "src")[len(COMPRESSED):][:2]
    study, series = str(header(files[0]).StudyInstanceUID), str(header(files[0]).SeriesInstanceUID)
    with pacs_of(tmp_path, ctx) as pacs, WebServer() as srv:
        pacs.upload(files)
        proxy = Proxy(srv, pacs)
        series_path = f"/dicom-web/studies/{study}/series/{series}"

        def route(h: Handler) -> None:
            if "transfer-syntax=*" in h.headers.get("Accept", ""):
                h.send_body(406, b"not acceptable", "text/plain")
            else:
                proxy.route(h)
        srv.route(series_path, route)
        jobs = add_pacs(ctx, pacs)
        web_node(monkeypatch, jobs, {"pacs": {"web_url": srv.url + "/dicom-web"}})
        job, _ = jobs.submit("retrieve", {"query": {"SeriesInstanceUID": [series]}, "mode": "wado-rs"},
                             node="pacs")
        done = runner.run_job(job.id, ctx, jobs)
    assert done is not None and done.state == "succeeded", done.error
    assert len(index_sops(ctx)) == 2
    assert any("406" in n for n in done.result["notes"]), done.result["notes"]
    assert [s.headers["accept"] for s in srv.requests] == [
        'multipart/related; type="application/dicom"; transfer-syntax=*',
        'multipart/related; type="application/dicom"']


def test_wado_uri_500s_end_the_series_failed_with_the_reason(ctx, tmp_path, monkeypatch):
    from pacsbridge.shared.nodes import webhttp

    files = study_files(tmp_path / "src")[len(COMPRESSED):]
    series = str(header(files[0]).SeriesInstanceUID)
    monkeypatch.setattr(webhttp.RetryPolicy, "backoff_delay", lambda self, attempt: 0.01)
    with pacs_of(tmp_path, ctx) as pacs, WebServer() as srv:
        pacs.upload(files)
        srv.route("/wado", lambda h: h.send_body(500, b"internal error", "text/plain"))
        jobs = add_pacs(ctx, pacs)
        web_node(monkeypatch, jobs, {"pacs": {"web_url": srv.url + "/dicom-web", "wado_uri_url": srv.url + "/wado"}})
        job, _ = jobs.submit("retrieve", {"query": {"SeriesInstanceUID": [series]}, "mode": "wado-uri"},
                             node="pacs")
        done = runner.run_job(job.id, ctx, jobs)
    assert done is not None and done.state == "failed", done.state
    assert "HTTP 500" in done.error, done.error
    assert not index_sops(ctx) and not stored(ctx) and not list(ctx.storage.incoming.iterdir())



def test_wado_uri_429_with_retry_after_is_waited_for_and_the_series_completes(ctx, tmp_path, monkeypatch):
    from .webserver import answers, status_answer

    files = study_files(tmp_path / "src")[len(COMPRESSED):]
    series = str(header(files[0]).SeriesInstanceUID)
    with pacs_of(tmp_path, ctx) as pacs, WebServer() as srv:
        pacs.upload(files)
        proxy = Proxy(srv, pacs)
        srv.route("/wado", answers(status_answer(429, {"Retry-After": "1"}), proxy.route))
        jobs = add_pacs(ctx, pacs)
        web_node(monkeypatch, jobs, {"pacs": {"web_url": srv.url + "/dicom-web", "wado_uri_url": srv.url + "/wado"}})
        job, _ = jobs.submit("retrieve", {"query": {"SeriesInstanceUID": [series]}, "mode": "wado-uri"},
                             node="pacs")
        done = runner.run_job(job.id, ctx, jobs)
        assert done is not None and done.state == "succeeded", done.error
        assert_identical(ctx, pacs, {str(header(f).SOPInstanceUID) for f in files})
        assert len(srv.requests) == len(files) + 1
        assert all(r.query["contentType"] == ["application/dicom"] and r.query["transferSyntax"] == ["*"]
                   for r in srv.requests)



def test_a_cancel_during_a_wado_rs_body_ends_the_job_cancelled_and_leaves_nothing_half_stored(ctx, tmp_path,
                                                                                            monkeypatch):
    """The node sends one instance and the start of the next, then goes silent: a cancel ends the job
    (at the node's read timeout at the latest), the whole instance is kept, the partial one is not."""
    import time

    files = study_files(tmp_path / "src")[len(COMPRESSED):][:2]
    study, series = str(header(files[0]).StudyInstanceUID), str(header(files[0]).SeriesInstanceUID)
    boundary = "b-cancel"

    def route(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + files[0].read_bytes()
                      + f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                      + files[1].read_bytes()[:500])
        h.wfile.flush()
        h.hang(20)

    with pacs_of(tmp_path, ctx) as pacs, WebServer() as srv:
        pacs.upload(files)
        srv.route(f"/dicom-web/studies/{study}/series/{series}", route)
        jobs = add_pacs(ctx, pacs)
        web_node(monkeypatch, jobs, {"pacs": {"web_url": srv.url + "/dicom-web", "web_timeout": 3}})
        job, _ = jobs.submit("retrieve", {"query": {"SeriesInstanceUID": [series]}, "mode": "wado-rs"},
                             node="pacs")
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(runner.run_job(job.id, ctx, jobs)), daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while not index_sops(ctx) and not stored(ctx) and time.monotonic() < deadline:
            if srv.requests:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        jobs.cancel(job.id)
        started = time.monotonic()
        t.join(30)
        assert not t.is_alive() and time.monotonic() - started < 15
    done = out[0]
    assert done is not None and done.state == "cancelled", (done.state, done.error)
    assert set(stored(ctx)) <= {str(header(files[0]).SOPInstanceUID)}
    assert not list(ctx.storage.incoming.iterdir())


# -- push by STOW-RS -----------------------------------------------------------------------------------------
def load_into(ctx: Context, folder: Path) -> None:
    from pacsbridge.shared.index.importer import Importer

    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([folder])
    assert not report.rejected, report.rejected


def push_job(jobs: JobStore, ctx: Context, node: str, selection: dict[str, Any], project: str | None = None,
             job_id: str | None = None) -> Any:
    from pacsbridge.shared.jobs.spec import validate

    if job_id is None:
        body: dict[str, Any] = {"kind": "push", "node": node, "selection": selection}
        if project:
            body["project"] = project
        kind, name, params, hook = validate(body)
        job_id = jobs.submit(kind, params, name, hook)[0].id
    return runner.run_job(job_id, ctx, jobs)


def test_push_a_study_by_stow_rs_in_chunks(ctx, tmp_path, monkeypatch):
    from pacsbridge.shared.nodes import stow

    monkeypatch.setattr(stow, "CHUNK_INSTANCES", 4)  # 11 instances: 3 requests
    files = study_files(tmp_path / "src", patient="STOW1")
    study = str(header(files[0]).StudyInstanceUID)
    load_into(ctx, tmp_path / "src")
    sops = {str(header(f).SOPInstanceUID): f for f in files}
    with pacs_of(tmp_path, ctx, "dest", aet="DEST") as dest:
        jobs = add_pacs(ctx, dest, name="dest")
        web_node(monkeypatch, jobs, {"dest": {"web_url": dest.web_url}})
        done = push_job(jobs, ctx, "dest", {"StudyInstanceUID": [study]})
        assert done is not None and done.state == "succeeded", (done.error, done.result)
        assert dest.sop_uids() == set(sops)
        for sop, path in stored(ctx).items():  # as stored here, byte for byte
            assert dest.get(f"/instances/{orthanc_id(dest, sop)}/file") == path.read_bytes(), sop
    r = done.result
    assert (r["protocol"], r["sent"], r["acknowledged"], r["failed"], r["associations"]) == \
        ("stow-rs", len(files), len(files), 0, 3)
    assert all(row.state == "succeeded" and row.pushed == row.expected for row in done.series)
    assert not list(ctx.storage.incoming.iterdir())


def stow_answer(sops: dict[str, str], refuse: set[str]) -> Any:
    """A STOW-RS route: each SOP of ``sops`` (uid -> class) found in the request body is referenced, or failed
    with 0xA900 when in ``refuse``."""
    def item(sop: str, cls: str, reason: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"00081150": {"vr": "UI", "Value": [cls]}, "00081155": {"vr": "UI", "Value": [sop]}}
        if reason is not None:
            out["00081197"] = {"vr": "US", "Value": [reason]}
        return out

    def route(h: Handler) -> None:
        import json

        sent = [s for s in sops if s.encode() in h.body]
        ok = [item(s, sops[s]) for s in sent if s not in refuse]
        failed = [item(s, sops[s], 0xA900) for s in sent if s in refuse]
        body: dict[str, Any] = {}
        if ok:
            body["00081199"] = {"vr": "SQ", "Value": ok}
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": failed}
        status = 200 if not failed else 202 if ok else 409
        h.send_body(status, json.dumps(body).encode(), "application/dicom+json")
    return route


def test_an_instance_the_node_fails_is_reported_with_its_reason_and_a_retry_sends_only_it(ctx, tmp_path,
                                                                                          monkeypatch):
    series = generate_uid()
    sops = {}
    for i in range(6):
        ds = make_instance(tmp_path / "in" / f"{i}.dcm", rows=8, PatientID="STOW2", SeriesInstanceUID=series,
                           InstanceNumber=i + 1)
        sops[str(ds.SOPInstanceUID)] = str(ds.SOPClassUID)
    load_into(ctx, tmp_path / "in")
    bad = sorted(sops)[2]
    refuse = {bad}
    with WebServer() as srv:
        srv.route("/dicom-web/studies", stow_answer(sops, refuse))
        jobs = JobStore(ctx.index.engine)
        jobs.add_node(Node(name="web", ae_title="WEB", host="127.0.0.1", port=1))
        web_node(monkeypatch, jobs, {"web": {"web_url": srv.url + "/dicom-web"}})
        done = push_job(jobs, ctx, "web", {"SeriesInstanceUID": [series]})
        assert done is not None and done.state == "partial", done.error
        assert [(f["sop"], f["status"]) for f in done.result["failures"]] == [(bad, "0xA900")]
        assert "0xA900" in done.error and "does not match SOP class" in done.error, done.error
        [row] = done.series
        assert (row.expected, row.pushed, row.failed, row.state) == (6, 5, 1, "partial")

        refuse.clear()
        first = len(srv.requests)
        jobs.retry(done.id)
        again = push_job(jobs, ctx, "web", {}, job_id=done.id)
        assert again is not None and again.state == "succeeded", again.error
        assert again.result["sent"] == 1 and again.result["already_acknowledged"] == 5
        resent = [s for r in srv.requests[first:] for s in sops if s.encode() in r.body]
        assert resent == [bad]


def test_a_project_push_by_stow_is_deidentified(tmp_path, monkeypatch):
    from sqlalchemy import select

    from pacsbridge.shared.core.schema import deid_patients_table
    from pacsbridge.shared.deid.options import ProjectConfig
    from pacsbridge.shared.deid.projects import ProjectStore

    secret = "0123456789abcdef0123456789abcdef-stow"
    ctx = open_context(Settings(database_url=f"sqlite:///{tmp_path / 'idx.db'}", storage=tmp_path / "data",
                                fsync=False, deid_secret=secret))
    try:
        ctx.index.create()
        ctx.storage.ensure()
        files = study_files(tmp_path / "src", patient="MRN-STOW3")
        for f in files[:len(COMPRESSED)]:  # pydicom's SC and US carry burned-in text: the policy withholds them
            f.unlink()
        files = files[len(COMPRESSED):]
        study = str(header(files[0]).StudyInstanceUID)
        load_into(ctx, tmp_path / "src")
        ProjectStore(ctx.index.engine).create("lung", ProjectConfig(), secret.encode(), created_by="test")
        with pacs_of(tmp_path, ctx, "dest", aet="DEST") as dest:
            jobs = add_pacs(ctx, dest, name="dest", project="lung", identifiable=False)
            web_node(monkeypatch, jobs, {"dest": {"web_url": dest.web_url}})
            done = push_job(jobs, ctx, "dest", {"StudyInstanceUID": [study]})
            assert done is not None and done.state == "succeeded", (done.error, done.result)
            patients = dest.get("/patients?expand")
            held = dest.sop_uids()
        with ctx.index.engine.connect() as conn:
            (row,) = conn.execute(select(deid_patients_table)).all()
        assert [p["MainDicomTags"]["PatientID"] for p in patients] == [row.pseudonym]
        assert row.patient_id == "MRN-STOW3" and "MRN-STOW3" not in str(patients)
        assert len(held) == len(files) and not held & {str(header(f).SOPInstanceUID) for f in files}
        assert done.result["protocol"] == "stow-rs" and done.result["project"] == "lung"
        assert not list(ctx.storage.incoming.iterdir())  # the de-identified temporary files are gone
    finally:
        ctx.index.engine.dispose()



def test_a_stow_request_that_fails_whole_fails_each_of_its_instances_with_the_reason(ctx, tmp_path, monkeypatch):
    from pacsbridge.shared.nodes import stow, webhttp

    monkeypatch.setattr(webhttp.RetryPolicy, "backoff_delay", lambda self, attempt: 0.01)
    monkeypatch.setattr(stow, "CHUNK_INSTANCES", 2)
    series = generate_uid()
    for i in range(3):
        make_instance(tmp_path / "in" / f"{i}.dcm", rows=8, PatientID="STOW4", SeriesInstanceUID=series)
    load_into(ctx, tmp_path / "in")
    with WebServer() as srv:
        srv.route("/dicom-web/studies", lambda h: h.send_body(500, b"database locked", "text/plain"))
        jobs = JobStore(ctx.index.engine)
        jobs.add_node(Node(name="web", ae_title="WEB", host="127.0.0.1", port=1, max_associations=1))
        web_node(monkeypatch, jobs, {"web": {"web_url": srv.url + "/dicom-web"}})
        done = push_job(jobs, ctx, "web", {"SeriesInstanceUID": [series]})
    assert done is not None and done.state == "failed", done.state
    assert done.result["failed"] == 3 and done.result["acknowledged"] == 0
    assert all("HTTP 500" in f["error"] and "database locked" in f["error"] and f["status"] is None
               for f in done.result["failures"])
    assert "HTTP 500" in done.error
