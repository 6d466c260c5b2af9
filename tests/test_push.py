"""Push jobs against real peers: Orthanc, in-process pynetdicom SCPs that refuse or fail, a real worker."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts

from pacsbridge.worker.kinds import push as pushmod
from pacsbridge.worker import runner
from pacsbridge.shared.index.context import open_context
from pacsbridge.shared.index.importer import Importer
from pacsbridge.shared.jobs.store import JobStore
from pacsbridge.shared.dicom.node import Node
from pacsbridge.shared.jobs.spec import validate
from pacsbridge.worker.selection import resolve

from .helpers import TEST_FILES, make_instance
from .orthanc import Orthanc, free_port

#: pydicom's bundled files in several transfer syntaxes
MIXED = ["CT_small.dcm", "MR_small_implicit.dcm", "image_dfl.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG-lossy.dcm",
         "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "MR_small_jp2klossless.dcm",
         "MR_small_RLE.dcm", "SC_rgb_rle.dcm", "rtdose_rle_1frame.dcm"]


@pytest.fixture
def pctx(settings):
    context = open_context(settings)
    context.index.create()
    context.storage.ensure()
    yield context
    context.index.engine.dispose()


@pytest.fixture
def jobs(pctx) -> JobStore:
    return JobStore(pctx.index.engine)


def study_from(folder: Path, names, patient: str = "PUSH1", generated: int = 0) -> str:
    """Copies of bundled files (and generated CT) made one study with fresh UIDs; pixel data untouched."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    for i, name in enumerate(names):
        ds = pydicom.dcmread(TEST_FILES / name)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = patient
        ds.save_as(folder / f"{i:02d}-{name}", enforce_file_format=True)
    series = generate_uid()
    for i in range(generated):
        make_instance(folder / f"ct{i:03d}.dcm", rows=64, PatientID=patient, StudyInstanceUID=study,
                      SeriesInstanceUID=series, InstanceNumber=i + 1,
                      PixelData=np.random.default_rng(i).integers(0, 4095, 64 * 64, dtype=np.uint16).tobytes())
    return study


def load(ctx, folder: Path) -> int:
    report = Importer(ctx.index, ctx.storage, workers=1).import_paths([folder])
    assert not report.rejected, report.rejected
    return report.stored


def submit(jobs, node: str, selection) -> str:
    kind, node_name, params, hook = validate({"kind": "push", "node": node, "selection": selection})
    return jobs.submit(kind, params, node_name, hook)[0].id


def stored_files(ctx) -> dict[str, bytes]:
    """SOP UID -> bytes of our stored file."""
    out = {}
    for sop, obj in ctx.index.run_sql("select SOPInstanc, ObjectFile from DICOMImages")[1]:
        out[sop] = ctx.storage.absolute(obj).read_bytes()
    return out


def _pixels(data: bytes) -> tuple[str, bytes]:
    from io import BytesIO
    ds = pydicom.dcmread(BytesIO(data))
    return str(ds.file_meta.TransferSyntaxUID), ds.PixelData


class RecordingSCP:
    """A pynetdicom C-STORE SCP in this process (a real peer on a real port).

    ``syntaxes``: the transfer syntaxes it accepts; ``status(ds) -> int`` decides each answer.
    """

    def __init__(self, syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian), status=lambda ds: 0x0000):
        self.port = free_port()
        self.received: dict[str, list] = {}
        self.status = status
        self.lock = threading.Lock()
        ae = AE(ae_title="STRICT")
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, list(syntaxes))
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.setdefault(ds.SOPInstanceUID, []).append(ds)
        return self.status(ds)

    def node(self, name: str = "strict", **kw) -> Node:
        return Node(name=name, ae_title="STRICT", host="127.0.0.1", port=self.port, **kw)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp_factory():
    made = []

    def make(**kw):
        scp = RecordingSCP(**kw)
        made.append(scp)
        return scp

    yield make
    for scp in made:
        scp.close()


# -- Orthanc ---------------------------------------------------------------------
def test_push_a_mixed_study_to_orthanc_arrives_identical(pctx, jobs, tmp_path):
    study = study_from(tmp_path / "in", MIXED, generated=20)
    assert load(pctx, tmp_path / "in") == len(MIXED) + 20
    ours = stored_files(pctx)
    with Orthanc(tmp_path / "orthanc") as dest:
        jobs.add_node(Node("orthanc", dest.aet, "127.0.0.1", dest.dicom_port, max_associations=3))
        job = runner.run_job(submit(jobs, "orthanc", {"StudyInstanceUID": [study]}), pctx, jobs)
        assert job.state == "succeeded", (job.error, job.result)
        assert job.result["acknowledged"] == len(ours) and job.result["decompressed"] == 0
        assert dest.instance_count() == len(ours)
        for sop, data in ours.items():
            (found,) = dest.request("POST", "/tools/lookup", sop.encode(), "text/plain")
            theirs = dest.get(f"/instances/{found['ID']}/file")
            # same transfer syntax (sent as stored, never transcoded) and the same pixel data bytes
            assert _pixels(theirs) == _pixels(data), sop
        series = jobs.get(job.id).series
        assert len(series) == len(MIXED) + 1
        assert all(s.pushed == s.expected and s.failed == 0 and s.state == "succeeded" for s in series)
        # a second push of the same job is not needed; a new job sends again and Orthanc keeps one copy
        again = runner.run_job(submit(jobs, "orthanc", {"PatientID": ["PUSH1"]}), pctx, jobs)
        assert again.state == "succeeded" and dest.instance_count() == len(ours)


# -- a peer that refuses compressed syntaxes ------------------------------------
def test_refused_compressed_syntaxes_fall_back_to_decompressed(pctx, jobs, tmp_path, scp_factory):
    names = ["MR_small_RLE.dcm", "SC_rgb_rle.dcm", "rtdose_rle_1frame.dcm", "CT_small.dcm",
             "MR_small_implicit.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
    study = study_from(tmp_path / "in", names)
    load(pctx, tmp_path / "in")
    originals = {}
    for f in (tmp_path / "in").iterdir():
        ds = pydicom.dcmread(f)
        originals[ds.SOPInstanceUID] = (f.name.split("-", 1)[1], ds)
    scp = scp_factory()  # explicit and implicit little endian only
    jobs.add_node(scp.node(max_associations=2))
    job = runner.run_job(submit(jobs, "strict", {"StudyInstanceUID": study}), pctx, jobs)

    jpeg_ok = get_decoder(JPEGBaseline8Bit).is_available
    jpeg_sop = next(s for s, (n, _) in originals.items() if n == "SC_rgb_jpeg_dcmtk.dcm")
    for sop, (name, ds) in originals.items():
        if sop == jpeg_sop and not jpeg_ok:
            assert sop not in scp.received
            continue
        (got,) = scp.received[sop]
        assert got.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        assert got.SOPInstanceUID == sop  # decompressing kept the instance UID
        assert np.array_equal(got.pixel_array, ds.pixel_array), name
    assert job.result["decompressed"] == 3 + int(jpeg_ok)
    if jpeg_ok:  # pragma: no cover - depends on an optional decoder
        assert job.state == "succeeded"
    else:  # this machine has no JPEG decoder: reported, with the reason, never dropped
        assert job.state == "partial"
        (failure,) = job.result["failures"]
        assert failure["sop"] == jpeg_sop and "cannot be decompressed" in failure["error"]
        assert "JPEG Baseline" in failure["error"]
        row = {s.series_uid: s for s in jobs.get(job.id).series}[originals[jpeg_sop][1].SeriesInstanceUID]
        assert (row.pushed, row.failed, row.state) == (0, 1, "failed") and "decompressed" in row.error


# -- failure statuses, retry --------------------------------------------------------
def test_failure_statuses_make_a_partial_job_and_retry_resends_only_those(pctx, jobs, tmp_path, scp_factory):
    series = generate_uid()
    sops = []
    for i in range(8):
        ds = make_instance(tmp_path / "in" / f"{i}.dcm", SeriesInstanceUID=series, InstanceNumber=i + 1)
        sops.append(ds.SOPInstanceUID)
    load(pctx, tmp_path / "in")
    refuse = set(sops[1::3])
    scp = scp_factory(status=lambda ds: 0xA700 if ds.SOPInstanceUID in refuse else 0x0000)
    jobs.add_node(scp.node(max_associations=2))
    job_id = submit(jobs, "strict", {"SeriesInstanceUID": [series]})
    job = runner.run_job(job_id, pctx, jobs)
    assert job.state == "partial", job.error
    assert {f["sop"] for f in job.result["failures"]} == refuse
    assert {f["status"] for f in job.result["failures"]} == {"0xA700"}
    assert "0xA700" in job.error
    (row,) = jobs.get(job_id).series
    assert (row.expected, row.pushed, row.failed, row.state) == (8, 8 - len(refuse), len(refuse), "partial")
    assert pushmod.acknowledged(pctx.index.engine, job_id) == set(sops) - refuse

    refuse.clear()  # the peer has room again
    jobs.retry(job_id)
    again = runner.run_job(job_id, pctx, jobs)
    assert again.state == "succeeded", again.error
    assert again.result["sent"] == 3 and again.result["already_acknowledged"] == 5
    # acknowledged instances were not sent twice; the refused ones twice
    assert {s: len(v) for s, v in scp.received.items()} == {s: 2 if s in sops[1::3] else 1 for s in sops}
    (row,) = jobs.get(job_id).series
    assert (row.pushed, row.failed, row.state) == (8, 0, "succeeded")


# -- the destination is down, or not a push target -------------------------------
def test_destination_down_or_not_allowed_fails_clearly_and_changes_nothing(pctx, jobs, tmp_path):
    study_from(tmp_path / "in", ["CT_small.dcm", "MR_small.dcm"])
    load(pctx, tmp_path / "in")
    before = {p: p.stat().st_mtime_ns for p in pctx.storage.root.rglob("*") if p.is_file()}
    rows = pctx.index.run_sql("select SOPInstanc, ObjectFile from DICOMImages order by SOPInstanc")[1]
    jobs.add_node(Node("down", "NOBODY", "127.0.0.1", free_port(), max_associations=2))
    jobs.add_node(Node("readonly", "RO", "127.0.0.1", free_port(), allow_store=False))
    started = time.monotonic()
    job = runner.run_job(submit(jobs, "down", {"PatientID": "PUSH1"}), pctx, jobs)
    assert time.monotonic() - started < 30
    assert job.state == "failed" and "unreachable" in job.error and "down" in job.error
    assert job.result["failed"] == 2 and job.result["acknowledged"] == 0
    assert all(s.state == "failed" and s.failed == 1 for s in jobs.get(job.id).series)
    ro = runner.run_job(submit(jobs, "readonly", {"PatientID": "PUSH1"}), pctx, jobs)
    assert ro.state == "failed" and "allow_store is false" in ro.error
    nothing = runner.run_job(submit(jobs, "down", {"PatientID": "nobody"}), pctx, jobs)
    assert nothing.state == "failed" and "no stored instance" in nothing.error
    after = {p: p.stat().st_mtime_ns for p in pctx.storage.root.rglob("*") if p.is_file()}
    assert after == before
    assert pctx.index.run_sql("select SOPInstanc, ObjectFile from DICOMImages order by SOPInstanc")[1] == rows


def test_a_file_missing_from_storage_is_reported_not_skipped(pctx, jobs, tmp_path, scp_factory):
    series = generate_uid()
    items = [make_instance(tmp_path / "in" / f"{i}.dcm", SeriesInstanceUID=series) for i in range(3)]
    load(pctx, tmp_path / "in")
    obj, _ = pctx.index.lookup_sop([items[0].SOPInstanceUID])[items[0].SOPInstanceUID]
    pctx.storage.absolute(obj).unlink()
    scp = scp_factory()
    jobs.add_node(scp.node())
    job = runner.run_job(submit(jobs, "strict", {"SeriesInstanceUID": series}), pctx, jobs)
    assert job.state == "partial"
    assert [f["sop"] for f in job.result["failures"]] == [items[0].SOPInstanceUID]
    assert "cannot read" in job.result["failures"][0]["error"]
    assert set(scp.received) == {d.SOPInstanceUID for d in items[1:]}


# -- through the real worker process ------------------------------------------------
def test_push_job_runs_in_the_real_worker(tmp_path):
    from pacsbridge.shared.core.celeryapp import RUN_JOB_TASK, make_celery

    from .test_listener import Stack

    stack = Stack(tmp_path)
    ctx = open_context(stack.settings)
    ctx.index.create()
    ctx.storage.ensure()
    study = study_from(tmp_path / "in", ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"], generated=10)
    load(ctx, tmp_path / "in")
    jobs = JobStore(ctx.index.engine)
    try:
        with Orthanc(tmp_path / "orthanc") as dest:
            jobs.add_node(Node("orthanc", dest.aet, "127.0.0.1", dest.dicom_port, max_associations=2))
            job_id = submit(jobs, "orthanc", {"StudyInstanceUID": [study]})
            stack.start("worker", "--concurrency", "1")
            app = make_celery(stack.settings.with_(broker_url=stack.env["PACSBRIDGE_BROKER_URL"]))
            app.send_task(RUN_JOB_TASK, [job_id])
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and jobs.get(job_id).state in ("queued", "running"):
                time.sleep(0.3)
            job = jobs.get(job_id)
            assert job.state == "succeeded", (job.error, (stack.logs / "worker-0.log").read_text()[-3000:])
            assert job.result["acknowledged"] == 13 and dest.instance_count() == 13
            assert job.worker.split(":")[-1] != str(os.getpid())  # run by the worker process
    finally:
        stack.close()
        ctx.index.engine.dispose()


# -- limits and cancel ----------------------------------------------------------------
def test_parallel_associations_stay_within_the_node_limit_and_cancel_stops_between_instances(pctx, jobs, tmp_path):
    series = generate_uid()
    for i in range(24):
        make_instance(tmp_path / "in" / f"{i}.dcm", SeriesInstanceUID=series, InstanceNumber=i + 1)
    load(pctx, tmp_path / "in")
    open_now, peak, lock = [0], [0], threading.Lock()
    all_open = threading.Event()

    def opened(event):
        with lock:
            open_now[0] += 1
            peak[0] = max(peak[0], open_now[0])
            if open_now[0] >= 3:
                all_open.set()

    def closed(event):
        with lock:
            open_now[0] -= 1

    def slow(ds):
        all_open.wait(20)  # no answer before every allowed association is open (one sender cannot do it all)
        return 0x0000

    scp = RecordingSCP(status=slow)
    scp.server.bind(evt.EVT_ACCEPTED, opened)
    scp.server.bind(evt.EVT_RELEASED, closed)
    scp.server.bind(evt.EVT_ABORTED, closed)
    try:
        node = scp.node(max_associations=3)
        jobs.add_node(node)
        sel = resolve(pctx.index, pctx.storage, {"SeriesInstanceUID": [series]})
        report = pushmod.push(node, sel.instances, "PACSBRIDGE", pctx.index.engine)
        assert report.acknowledged == 24 and not report.failed
        assert peak[0] == 3 and report.associations == 3  # parallel, and never more than the node allows

        cancel = threading.Event()
        sent = []

        def stop_after_five(batch):
            sent.extend(batch)

        scp.status = lambda ds: (cancel.set() if len(scp.received) >= 5 else None) or 0x0000
        scp.received.clear()
        report = pushmod.push(scp.node(max_associations=1), sel.instances, "PACSBRIDGE", pctx.index.engine,
                              cancel=cancel, on_results=stop_after_five)
        assert report.cancelled and 5 <= report.acknowledged <= 6 and not report.failed
        assert len(scp.received) == report.acknowledged == len(sent)  # what went out is what is reported
    finally:
        scp.close()


# -- the lean C-STORE path (shared/dicom/sender.py) --------------------------------------------
def test_fast_command_set_is_pynetdicoms_encoding():
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from pacsbridge.shared.dicom import sender

    for sop_class, sop, msg_id in [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", 7),
                                   ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.56", 65535)]:
        req = C_STORE()
        req.MessageID, req.Priority = msg_id, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop
        req._dataset_path = (Path("x"), 0)  # a data set follows, as for a file send
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        msg.command_set.CommandDataSetType = 0x0001
        assert sender.command_set(sop_class, sop, msg_id) == encode(msg.command_set, True, True)


def test_fast_pdus_fragment_like_pynetdicom():
    from pacsbridge.shared.dicom import sender

    data = memoryview(bytes(range(256)) * 100)  # 25,600 bytes
    out = sender.pdus(3, b"CMD!", data, 4096)
    heads, bodies = out[0::2], out[1::2]
    assert [bytes(b) for b in bodies[1:]] == [bytes(data[i:i + 4090]) for i in range(0, len(data), 4090)]
    assert bytes(bodies[0]) == b"CMD!"
    controls = [h[-1] for h in heads]
    assert controls == [0x03] + [0x00] * 6 + [0x02]
    for h, b in zip(heads, bodies):
        assert h[0] == 0x04 and int.from_bytes(h[2:6], "big") == len(b) + 6 <= 4096 and h[10] == 3
    whole = sender.pdus(1, b"C", data, 0)
    assert len(whole) == 4 and bytes(whole[3]) == bytes(data)


@pytest.mark.parametrize("max_pdu", [4096, 0])
def test_fast_path_sends_each_file_byte_for_byte_and_counts_every_series(pctx, jobs, tmp_path, max_pdu):
    """Several series over 3 parallel associations into a peer with small or unlimited PDUs."""
    from pacsbridge.shared.dicom import sender

    series = [generate_uid() for _ in range(3)]
    for i in range(30):
        make_instance(tmp_path / "in" / f"{i}.dcm", rows=64, SeriesInstanceUID=series[i % 3], InstanceNumber=i,
                      PixelData=np.random.default_rng(i).integers(0, 4095, 64 * 64, dtype=np.uint16).tobytes())
    load(pctx, tmp_path / "in")
    ours = stored_files(pctx)
    got: dict[str, list[bytes]] = {}
    lock = threading.Lock()

    def store(event):
        with lock:
            got.setdefault(event.request.AffectedSOPInstanceUID, []).append(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="STRICT")
    ae.maximum_pdu_size = max_pdu
    for cx in StoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        jobs.add_node(Node("strict", "STRICT", "127.0.0.1", port, max_associations=3))
        job = runner.run_job(submit(jobs, "strict", {"SeriesInstanceUID": series}), pctx, jobs)
    finally:
        server.shutdown()
    assert job.state == "succeeded", job.error
    assert job.result["acknowledged"] == 30 and job.result["associations"] == 3
    assert {sop: len(v) for sop, v in got.items()} == {sop: 1 for sop in ours}  # each exactly once
    for sop, data in ours.items():
        sent = got[sop][0]  # pynetdicom's own file meta, then the data set as it came off the wire
        assert sent[sender.dataset_offset(sent):] == data[sender.dataset_offset(data):]
    rows = {s.series_uid: s for s in jobs.get(job.id).series}
    assert {uid: (r.expected, r.pushed, r.failed, r.state) for uid, r in rows.items()} == \
        {uid: (10, 10, 0, "succeeded") for uid in series}


def test_peer_killed_mid_push_every_instance_is_acknowledged_or_failed(pctx, jobs, tmp_path):
    """kill -9 of a real DCMTK storescp mid-transfer: nothing lost, nothing counted twice."""
    import signal
    import subprocess

    series = [generate_uid(), generate_uid()]
    for i in range(200):
        make_instance(tmp_path / "in" / f"{i}.dcm", rows=256, SeriesInstanceUID=series[i % 2], InstanceNumber=i)
    load(pctx, tmp_path / "in")
    out = tmp_path / "recv"
    out.mkdir()
    port = free_port()
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen(["storescp", "-aet", "STRICT", "-od", str(out), str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(["echoscu", "-q", "-to", "2", "-aec", "STRICT", "127.0.0.1", str(port)],
                              env=env, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        jobs.add_node(Node("strict", "STRICT", "127.0.0.1", port, max_associations=1))
        job_id = submit(jobs, "strict", {"SeriesInstanceUID": series})

        def killer():
            while len(list(out.iterdir())) < 40 and proc.poll() is None:
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)

        t = threading.Thread(target=killer)
        t.start()
        job = runner.run_job(job_id, pctx, jobs)
        t.join()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    res = job.result
    assert job.state in ("partial", "failed"), job.error
    assert res["acknowledged"] + res["failed"] == 200
    acked = pushmod.acknowledged(pctx.index.engine, job_id)
    assert len(acked) == res["acknowledged"] >= 30  # the kill came after ~40 files were written
    received = {f.name.split(".", 1)[1] for f in out.iterdir()}
    assert acked <= received  # acknowledged means the peer had it
    rows = jobs.get(job_id).series
    assert sum(r.pushed for r in rows) == res["acknowledged"] and sum(r.failed for r in rows) == res["failed"]
    assert all(r.pushed + r.failed == r.expected == 100 for r in rows)


# -- sender processes (PACSBRIDGE_PUSH_PROCESSES=1) ------------------------------------------
def test_sender_processes_give_exact_counts_and_a_killed_one_reports_what_it_held(pctx, jobs, tmp_path,
                                                                                  monkeypatch):
    import signal

    series = [generate_uid() for _ in range(4)]
    for i in range(80):
        make_instance(tmp_path / "in" / f"{i}.dcm", SeriesInstanceUID=series[i % 4], InstanceNumber=i)
    load(pctx, tmp_path / "in")
    monkeypatch.setattr(pushmod, "PROCESSES", "1")
    made = []
    original = pushmod._ProcSender.__init__

    def record(self, *a, **kw):
        original(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(pushmod._ProcSender, "__init__", record)
    scp = RecordingSCP(status=lambda ds: time.sleep(0.01) or 0x0000)
    try:
        jobs.add_node(scp.node(max_associations=2))
        job = runner.run_job(submit(jobs, "strict", {"SeriesInstanceUID": series}), pctx, jobs)
        assert job.state == "succeeded", job.error
        assert job.result["acknowledged"] == 80 and job.result["associations"] == 2 and len(made) == 2
        assert {s: len(v) for s, v in scp.received.items()} == {s: 1 for s in pushmod.acknowledged(
            pctx.index.engine, job.id)}
        assert all((r.pushed, r.failed, r.state) == (20, 0, "succeeded") for r in jobs.get(job.id).series)

        # kill -9 one sender process mid-push: its unreported instances are failed, the other goes on
        scp.received.clear()
        made.clear()
        sel = resolve(pctx.index, pctx.storage, {"SeriesInstanceUID": series})
        outcomes = []
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("report", pushmod.push(
            scp.node(max_associations=2), sel.instances, "PACSBRIDGE", pctx.index.engine,
            on_results=outcomes.extend)))
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(made) < 2 or len(scp.received) < 10
                                               or any(s.proc is None for s in made)):
            time.sleep(0.005)
        victim = made[0].proc
        os.kill(victim.pid, signal.SIGKILL)
        t.join(60)
        report = box["report"]
    finally:
        scp.close()
    assert sorted(s.sop_uid for s in outcomes) == sorted(i.sop_uid for i in sel.instances)  # each exactly once
    assert report.acknowledged + len(report.failed) == 80
    assert 1 <= len(report.failed) <= pushmod.PROC_WINDOW
    assert all("exit code -9" in s.error for s in report.failed), report.failed
    acked = {s.sop_uid for s in outcomes if s.ok}
    assert acked <= set(scp.received)  # acknowledged means the peer has it


def test_fast_file_meta_reads_what_pydicom_reads(tmp_path):
    from pydicom.filereader import read_file_meta_info

    from pacsbridge.shared.dicom import sender

    names = MIXED + ["MR_small_bigendian.dcm", "emri_small_big_endian.dcm", "no_meta.dcm", "rtplan.dcm"]
    for name in names:
        path = TEST_FILES / name
        if not path.exists():
            continue
        ours = sender.file_meta(str(path))
        if ours is None:  # no preamble / file meta: the caller asks pydicom
            continue
        theirs = read_file_meta_info(path)
        assert ours == {k: str(theirs[k].value) for k in ours}, name
        assert set(ours) == {"MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID"}
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f")
    assert sender.file_meta(str(tmp_path / "junk.dcm")) is None  # a length past the end: pydicom decides


# -- a node that stalls mid-PDU (issue 14, item 7) ----------------------------------------------------
@pytest.mark.parametrize("processes", ["0", "1"])
def test_cancel_stops_a_push_waiting_on_a_node_that_sent_half_an_associate_ac(pctx, jobs, tmp_path, monkeypatch,
                                                                              processes):
    """The node answers the first bytes of an A-ASSOCIATE-AC and holds the connection: `cancel` ends the
    job within seconds (it waited until the node closed, whatever cancel said), in a sender thread or a
    sender process."""
    from .servers import HalfAssociatePeer

    monkeypatch.setattr(runner, "HEARTBEAT_SECONDS", 10.0)  # the default: cancel must not wait for a beat
    monkeypatch.setattr(pushmod, "PROCESSES", processes)
    study_from(tmp_path / "in", ["CT_small.dcm", "MR_small.dcm"])
    load(pctx, tmp_path / "in")
    with HalfAssociatePeer() as peer:
        jobs.add_node(Node("half", "HALF", "127.0.0.1", peer.port))
        job_id = submit(jobs, "half", {"PatientID": "PUSH1"})
        t = threading.Thread(target=runner.run_job, args=(job_id, pctx, jobs), daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        while peer.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert peer.connections >= 1
        time.sleep(0.5)
        asked = time.monotonic()
        jobs.cancel(job_id)
        t.join(15)
        assert not t.is_alive(), "the push job is still waiting on the node"
        assert time.monotonic() - asked < 4
    job = jobs.get(job_id)
    assert job.state == "cancelled", job
    assert job.result["acknowledged"] == 0


def test_a_push_to_a_node_that_sent_half_an_associate_ac_fails_after_its_timeout(pctx, jobs, tmp_path, monkeypatch):
    from .servers import HalfAssociatePeer

    monkeypatch.setattr(pushmod, "TIMEOUT", 1.5)
    study_from(tmp_path / "in", ["CT_small.dcm", "MR_small.dcm"])
    load(pctx, tmp_path / "in")
    with HalfAssociatePeer() as peer:
        jobs.add_node(Node("half", "HALF", "127.0.0.1", peer.port))
        out: list = []
        t = threading.Thread(target=lambda: out.append(runner.run_job(submit(jobs, "half", {"PatientID": "PUSH1"}),
                                                                      pctx, jobs)), daemon=True)
        started = time.monotonic()
        t.start()
        t.join(30)
        assert not t.is_alive(), "the push job is still waiting on the node"
        assert time.monotonic() - started < 10
    job = out[0]
    assert job.state == "failed" and job.result["failed"] == 2
    assert "12 of the 190 bytes of its A-ASSOCIATE-AC" in job.error, job.error
