"""Retrieve jobs against a real Orthanc (the hospital PACS) into a real listener + worker.

Orthanc holds generated CT (3 series of one patient) and some of pydicom's
files; our listener is its modality ``pb``. Jobs run through the real
``pacsbridge worker`` process (Celery ``run_job``) in the main tests and
through :func:`runner.run_job` in this process for the finer ones.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from pacsbridge.shared.nodes import sources
from pacsbridge.worker.kinds import retrieve
from pacsbridge.worker import runner
from pacsbridge.worker import stable
from pacsbridge.shared.core.celeryapp import RUN_JOB_TASK, make_celery
from pacsbridge.shared.index.context import Context, open_context
from pacsbridge.shared.jobs.store import JobStore
from pacsbridge.shared.dicom.node import Node

from .helpers import TEST_FILES, make_instance
from .orthanc import Orthanc
from .test_listener import Stack

PATIENT = "RETR1"
SERIES_SIZES = (12, 10, 8)
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtstruct.dcm")


@pytest.fixture(scope="module")
def pacs_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Generated CT of patient RETR1 (two studies, three series) and pydicom's files."""
    root = tmp_path_factory.mktemp("pacs-files")
    from pydicom.uid import generate_uid

    studies = [generate_uid(), generate_uid()]
    ct = []
    for k, n in enumerate(SERIES_SIZES):
        series = generate_uid()
        for i in range(n):
            path = root / f"s{k}" / f"{i}.dcm"
            make_instance(path, rows=16, PatientID=PATIENT, StudyInstanceUID=studies[min(k, 1)],
                          SeriesInstanceUID=series, SeriesNumber=k + 1, InstanceNumber=i + 1,
                          StudyDate=f"2024020{k + 1}")
            ct.append(path)
    return {"ct": ct, "pydicom": [TEST_FILES / name for name in PYDICOM_FILES]}


def start_pacs(tmp_path: Path, stack: Stack, files: list[Path], **extra: object) -> Orthanc:
    pacs = Orthanc(tmp_path / "orthanc", modalities={"pb": ("PACSBRIDGE", "127.0.0.1", stack.port)},
                   extra_config=extra or None).start()
    pacs.upload(files)
    return pacs


def add_node(ctx: Context, pacs: Orthanc, **limits: object) -> JobStore:
    jobs = JobStore(ctx.index.engine)
    jobs.add_node(Node(name="pacs", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port,
                       **limits))  # type: ignore[arg-type]
    return jobs


def wait_finished(jobs: JobStore, job_id: str, timeout: float = 120.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = jobs.get(job_id)
        if job.state in ("succeeded", "partial", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {jobs.get(job_id).state} after {timeout} s")


def index_sops(ctx: Context) -> list[str]:
    return [r[0] for r in ctx.index.run_sql("select SOPInstanc from DICOMImages")[1]]


def stored_files(ctx: Context) -> list[Path]:
    return [p for p in ctx.settings.storage.rglob("*.dcm") if ".incoming" not in p.parts]


def make_stack(tmp_path: Path, database_url: str | None = None, broker_url: str | None = None,
               **env: str) -> Stack:
    stack = Stack(tmp_path, database_url=database_url, broker_url=broker_url,
                  PACSBRIDGE_ALLOWED_PEERS="ORTHANC@127.0.0.1", PACSBRIDGE_RETRIEVE_WAIT_SECONDS="10",
                  **env)
    ctx = open_context(stack.settings)
    ctx.index.create()
    ctx.index.engine.dispose()
    return stack


def celery_of(stack: Stack):  # type: ignore[no-untyped-def]
    return make_celery(stack.settings.with_(broker_url=stack.env["PACSBRIDGE_BROKER_URL"]))


@pytest.fixture
def ctx_of() -> Iterator:
    opened: list[Context] = []

    def make(stack: Stack) -> Context:
        c = open_context(stack.settings)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.index.engine.dispose()


def test_move_by_patient_through_the_worker_postgres_redis(tmp_path, pg_url, pacs_files, ctx_of):
    stack = make_stack(tmp_path, pg_url)
    pacs = start_pacs(tmp_path, stack, pacs_files["ct"] + pacs_files["pydicom"])
    try:
        stack.start("listener")
        stack.start("worker", "--concurrency", "2")
        ctx = ctx_of(stack)
        jobs = add_node(ctx, pacs)
        job, created = jobs.submit("retrieve", {"query": {"PatientID": PATIENT}, "mode": "move"}, node="pacs")
        assert created
        celery_of(stack).send_task(RUN_JOB_TASK, [job.id])
        done = wait_finished(jobs, job.id)
        assert done.state == "succeeded", (done.error, [s.to_dict() for s in done.series])
        assert sorted(s.expected for s in done.series) == sorted(SERIES_SIZES)
        assert all(s.indexed == s.expected == s.received and s.state == "done" for s in done.series)
        assert done.result["suboperations"] == {"completed": sum(SERIES_SIZES), "failed": 0, "warning": 0}
        import pydicom

        want = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in pacs_files["ct"]}
        assert set(index_sops(ctx)) == want  # every instance of the patient, nothing else

        # the same request again: a new job (the first is finished) that pulls nothing twice
        again = runner.run_job(jobs.submit("retrieve", {"query": {"PatientID": PATIENT}, "mode": "move"},
                                           node="pacs")[0].id, ctx, jobs)
        assert again.state == "succeeded"
        assert again.result["skipped_complete"] == 3 and again.result["suboperations"]["completed"] == 0

        # pydicom's files by StudyInstanceUID (a list), C-MOVE through the worker: RT included
        uids = sorted({str(pydicom.dcmread(p, stop_before_pixels=True, force=True).StudyInstanceUID)
                       for p in pacs_files["pydicom"]})
        job2, _ = jobs.submit("retrieve", {"query": {"StudyInstanceUID": uids}}, node="pacs")
        celery_of(stack).send_task(RUN_JOB_TASK, [job2.id])
        done2 = wait_finished(jobs, job2.id)
        assert done2.state == "succeeded", done2.error
        assert len(index_sops(ctx)) == len(want) + len(PYDICOM_FILES)
        assert len(stored_files(ctx)) == len(want) + len(PYDICOM_FILES)
    finally:
        stack.close()
        pacs.stop()


def test_get_through_the_worker_sqlite_embedded_broker(tmp_path, pacs_files, ctx_of):
    stack = make_stack(tmp_path, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    pacs = start_pacs(tmp_path, stack, pacs_files["ct"] + pacs_files["pydicom"])
    try:
        stack.start("worker", "--concurrency", "1")
        ctx = ctx_of(stack)
        jobs = add_node(ctx, pacs, retrieve="get")
        job, _ = jobs.submit("retrieve", {"query": {"PatientID": PATIENT}}, node="pacs")
        celery_of(stack).send_task(RUN_JOB_TASK, [job.id])
        done = wait_finished(jobs, job.id)
        assert done.state == "succeeded", done.error
        assert done.result["mode"] == "get"
        assert all(s.indexed == s.expected == s.received for s in done.series)
        assert len(set(index_sops(ctx))) == sum(SERIES_SIZES) == len(stored_files(ctx))
        # the stored files are the PACS's instances byte for byte in their pixel data
        import pydicom

        for p in pacs_files["ct"][:3]:
            sent = pydicom.dcmread(p)
            (obj,), = ctx.index.run_sql(
                f"select ObjectFile from DICOMImages where SOPInstanc='{sent.SOPInstanceUID}'")[1]
            assert pydicom.dcmread(ctx.settings.storage / obj).PixelData == sent.PixelData
    finally:
        stack.close()
        pacs.stop()


def test_orthanc_stopped_mid_move_then_retry_completes(tmp_path, pacs_files, ctx_of, monkeypatch):
    monkeypatch.setattr(retrieve, "WAIT_SECONDS", 5.0)
    monkeypatch.setattr(retrieve, "REPULLS", 1)
    stack = make_stack(tmp_path)
    pacs = start_pacs(tmp_path, stack, pacs_files["ct"])
    try:
        stack.start("listener")
        stack.start("worker", "--concurrency", "1")
        ctx = ctx_of(stack)
        jobs = add_node(ctx, pacs, max_rate=3.0)  # slow enough to stop Orthanc after the first series
        job, _ = jobs.submit("retrieve", {"query": {"PatientID": PATIENT}}, node="pacs")
        t = threading.Thread(target=runner.run_job, args=(job.id, ctx, jobs))
        t.start()
        deadline = time.monotonic() + 60
        while not any(s.state == "done" for s in jobs.series(job.id)) and time.monotonic() < deadline:
            time.sleep(0.1)
        pacs.stop(hard=True)  # the PACS dies (kill -9) while the job is between series
        t.join(120)
        done = jobs.get(job.id)
        assert done.state in ("partial", "failed")
        assert done.state == "partial"  # the first series made it
        broken = [s for s in done.series if s.state != "done"]
        assert broken and all("unreachable" in s.error or "lost" in s.error or "aborted" in s.error
                              for s in broken), [s.error for s in broken]
        assert "series incomplete" in done.error
        pacs.start()  # same ports, same storage
        jobs.retry(job.id)
        again = runner.run_job(job.id, ctx, jobs)
        assert again.state == "succeeded", again.error
        assert again.attempts == 2
        assert again.result["skipped_complete"] >= 1
        assert len(index_sops(ctx)) == sum(SERIES_SIZES) == len(set(index_sops(ctx)))
    finally:
        stack.close()
        pacs.stop()


def test_worker_killed_mid_job_another_finishes(tmp_path, pacs_files, ctx_of):
    stack = make_stack(tmp_path, PACSBRIDGE_HEARTBEAT_SECONDS="0.5", PACSBRIDGE_SWEEP_SECONDS="1")
    pacs = start_pacs(tmp_path, stack, pacs_files["ct"])
    try:
        stack.start("listener")
        first = stack.start("worker-a", "--concurrency", "2")
        ctx = ctx_of(stack)
        jobs = add_node(ctx, pacs, max_rate=10.0)
        job, _ = jobs.submit("retrieve", {"query": {"PatientID": PATIENT}}, node="pacs")
        celery_of(stack).send_task(RUN_JOB_TASK, [job.id])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = jobs.series(job.id)
            if any(s.indexed for s in rows):
                break
            time.sleep(0.1)
        assert jobs.get(job.id).state == "running"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        stack.procs.pop("worker-a")
        stack.start("worker-b", "--concurrency", "2")
        done = wait_finished(jobs, job.id, timeout=150)
        assert done.state == "succeeded", done.error
        assert done.attempts == 2
        sops = index_sops(ctx)
        assert len(sops) == len(set(sops)) == sum(SERIES_SIZES)  # nothing indexed twice
        assert len(stored_files(ctx)) == sum(SERIES_SIZES)        # nor stored twice
    finally:
        stack.close()
        pacs.stop()


def test_dedupe_cancel_and_one_association_at_a_time(tmp_path, pacs_files, ctx_of, monkeypatch):
    monkeypatch.setattr(runner, "HEARTBEAT_SECONDS", 0.3)
    stack = make_stack(tmp_path)
    other = [make_instance(tmp_path / "other" / f"{i}.dcm", rows=16, PatientID="RETR2") for i in range(6)]
    pacs = start_pacs(tmp_path, stack, pacs_files["ct"] + sorted((tmp_path / "other").glob("*.dcm")))
    try:
        stack.start("listener")
        stack.start("worker", "--concurrency", "2")
        ctx = ctx_of(stack)
        jobs = add_node(ctx, pacs, max_associations=1, max_rate=40.0)
        body = {"query": {"PatientID": PATIENT}}
        j1, created = jobs.submit("retrieve", body, node="pacs")
        j2, _ = jobs.submit("retrieve", {"query": {"PatientID": "RETR2"}}, node="pacs")
        threads = [threading.Thread(target=runner.run_job, args=(j.id, ctx, jobs)) for j in (j1, j2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        same, created_again = jobs.submit("retrieve", body, node="pacs")
        assert same.id == j1.id and not created_again
        for t in threads:
            t.join(120)
        assert jobs.get(j1.id).state == jobs.get(j2.id).state == "succeeded"
        assert len(index_sops(ctx)) == sum(SERIES_SIZES) + len(other)
        # Orthanc opened one association to our listener per C-MOVE: never two at once
        _, rows = ctx.index.run_sql("select association, min(arrived_at), max(arrived_at) "
                                    "from pacsbridge_arrivals group by association order by 2")
        assert len(rows) >= 4, rows  # at least one per series moved
        for (_, _, end), (_, start, _) in zip(rows, rows[1:]):
            assert end <= start, rows

        # cancel: a slow job stops between series and ends cancelled
        JobStore(ctx.index.engine).update_node("pacs", {"max_rate": 2.0})
        from pydicom.uid import generate_uid

        study, series = generate_uid(), [generate_uid() for _ in range(3)]
        pacs.upload([tmp_path / "slow" / f"{i}.dcm" for i in range(18)
                     if make_instance(tmp_path / "slow" / f"{i}.dcm", rows=16, PatientID="RETR3",
                                      StudyInstanceUID=study, SeriesInstanceUID=series[i % 3]) is not None])
        j3, _ = jobs.submit("retrieve", {"query": {"PatientID": "RETR3"}, "mode": "get"}, node="pacs")
        t = threading.Thread(target=runner.run_job, args=(j3.id, ctx, jobs))
        t.start()
        time.sleep(1.5)
        assert jobs.get(j3.id).state == "running", jobs.get(j3.id)
        jobs.cancel(j3.id)
        t.join(60)
        assert not t.is_alive()
        final = jobs.get(j3.id)
        assert final.state == "cancelled"
        assert any(s.state in ("cancelled", "queued") for s in final.series)
    finally:
        stack.close()
        pacs.stop()


def test_stable_detection(ctx):
    now = 1_000_000.0

    def arrive(i: int, series: str, at: float) -> None:
        ctx.index.record_arrivals([{"sop_uid": f"1.2.{i}", "series_uid": series, "study_uid": "8.1",
                                    "patient_id": "P", "calling_ae": "PACS", "association": "a",
                                    "arrived_at": at, "object_file": f"f{i}"}])

    for i in range(4):
        arrive(i, f"9.{i % 2}", now - 30 + i)
    assert stable.check(ctx.index, 60, now=now) == []             # 27 s quiet: not yet
    assert sorted(stable.check(ctx.index, 60, now=now + 40)) == [
        ("series", "9.0"), ("series", "9.1"), ("study", "8.1")]
    assert stable.check(ctx.index, 60, now=now + 41) == []        # marked once
    arrive(9, "9.0", now + 50)                                    # a late instance
    assert stable.check(ctx.index, 60, now=now + 55) == []
    rows = {r["uid"]: r for r in stable.stable_since(ctx.index.engine, 0, "series")}
    assert set(rows) == {"9.1"}                                   # 9.0 is not stable any more
    assert sorted(stable.check(ctx.index, 60, now=now + 111)) == [("series", "9.0"), ("study", "8.1")]
    study = stable.stable_since(ctx.index.engine, now + 111)[0]
    assert study["instances"] == 5 and study["last_arrival"] == now + 50


def test_series_in_parallel_exact_counts_and_one_failing_series_reported(tmp_path, pacs_files, ctx_of,
                                                                         monkeypatch):
    """Series are pulled at once (one association each, within the node's limit); each series
    row still gets its own exact counts, and a series that fails while the others run is
    reported on its own row, without losing or double-counting the others."""
    monkeypatch.setattr(retrieve, "REPULLS", 0)
    stack = make_stack(tmp_path)
    pacs = start_pacs(tmp_path, stack, pacs_files["ct"])
    try:
        ctx = ctx_of(stack)
        # slow enough (shared by every association of the node) that the series overlap
        jobs = add_node(ctx, pacs, retrieve="get", max_associations=3, max_rate=15.0)
        import pydicom

        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs_files["ct"]]
        by_series: dict[str, set[str]] = {}
        for h in headers:
            by_series.setdefault(str(h.SeriesInstanceUID), set()).add(str(h.SOPInstanceUID))
        # one series cannot be stored: where its folder should be, there is a file (even root fails)
        broken_uid = str(headers[-1].SeriesInstanceUID)
        folder = ctx.settings.storage / PATIENT / str(headers[-1].StudyInstanceUID)
        folder.mkdir(parents=True)
        (folder / broken_uid).write_text("not a folder")

        from pacsbridge.shared.nodes.throttle import NodeSlots

        slots = NodeSlots(ctx.index.engine, jobs.get_node("pacs"), "probe")
        held: list[int] = []
        stop = threading.Event()

        def watch() -> None:  # how many associations the node has at once, while the job runs
            while not stop.wait(0.05):
                held.append(slots.held())

        watcher = threading.Thread(target=watch)
        watcher.start()
        job, _ = jobs.submit("retrieve", {"query": {"PatientID": PATIENT}}, node="pacs")
        try:
            done = runner.run_job(job.id, ctx, jobs)
        finally:
            stop.set()
            watcher.join()
        assert done.state == "partial", done.error
        # the series really ran side by side, and never beyond the node's limit
        assert 2 <= max(held) <= 3, held
        rows = {s.series_uid: s for s in done.series}
        assert set(rows) == set(by_series)
        for uid, sops in by_series.items():
            row = rows[uid]
            assert row.expected == len(sops)
            if uid == broken_uid:
                assert row.state == "partial" and row.indexed == 0, row.to_dict()
                assert row.failed == len(sops) and "C-GET failed" in row.error, row.to_dict()
            else:
                assert row.state == "done" and row.indexed == row.received == len(sops), row.to_dict()
        good = set().union(*(s for u, s in by_series.items() if u != broken_uid))
        assert sorted(index_sops(ctx)) == sorted(good)  # each once, nothing of the broken series
        assert done.result["suboperations"]["completed"] == len(good)
        assert done.result["suboperations"]["failed"] == len(by_series[broken_uid])
        assert broken_uid in done.error
    finally:
        stack.close()
        pacs.stop()


# -- cancel between instances (issue 14, item 23) ------------------------------------------------------
class SlowStore:
    """A real C-STORE SCP (pynetdicom) that takes ``delay`` seconds per instance: a slow C-MOVE destination."""

    def __init__(self, ae_title: str = "SLOWDEST", delay: float = 0.25) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        from .orthanc import free_port

        self.ae_title, self.delay, self.received = ae_title, delay, []
        ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_SYNTAXES)
        self.port = free_port()

        def on_store(event):  # type: ignore[no-untyped-def]
            time.sleep(self.delay)
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def close(self) -> None:
        self.server.shutdown()


from pydicom.uid import AllTransferSyntaxes as _ALL  # noqa: E402

ALL_SYNTAXES = [str(s) for s in _ALL]


@pytest.mark.parametrize("case", ["get-rate-limited", "move-rate-limited", "move-slow-destination"])
def test_cancel_takes_effect_between_instances(ctx, tmp_path, monkeypatch, case):
    """A running retrieve of one 24-instance series is cancelled: it ends `cancelled` within seconds and
    nothing more arrives (C-GET from a node limited to 2 instances/s went on receiving every instance;
    C-MOVE waited out its booking, then moved everything)."""
    from pydicom.uid import generate_uid

    monkeypatch.setattr(runner, "HEARTBEAT_SECONDS", 10.0)  # the default: cancel must not wait for a beat
    study, series = generate_uid(), generate_uid()
    files = [tmp_path / "src" / f"{i}.dcm" for i in range(24)]
    for i, f in enumerate(files):
        make_instance(f, rows=16, PatientID="CANC1", StudyInstanceUID=study, SeriesInstanceUID=series,
                      InstanceNumber=i + 1)
    dest = SlowStore(delay=0.25)
    mode = case.split("-")[0]
    pacs = Orthanc(tmp_path / "orthanc", modalities={"pb": (ctx.settings.ae_title, "127.0.0.1", 1),
                                                     "slow": (dest.ae_title, "127.0.0.1", dest.port)}).start()
    try:
        pacs.upload(files)
        jobs = add_node(ctx, pacs, retrieve=mode, move_destination=dest.ae_title,
                        max_rate=2.0 if "rate" in case else 0.0)
        job, _ = jobs.submit("retrieve", {"query": {"PatientID": "CANC1"}}, node="pacs")
        t = threading.Thread(target=runner.run_job, args=(job.id, ctx, jobs), daemon=True)
        t.start()
        time.sleep(3.0)
        assert jobs.get(job.id).state == "running"
        arrived = len(stored_files(ctx)) if mode == "get" else len(dest.received)
        asked = time.monotonic()
        jobs.cancel(job.id)
        t.join(20)
        assert not t.is_alive(), "the retrieve did not stop"
        took = time.monotonic() - asked
        at_end = len(stored_files(ctx)) if mode == "get" else len(dest.received)
        final = jobs.get(job.id)
        assert final.state == "cancelled", final
        assert took < 4.0, took
        time.sleep(1.5)  # what the node might still send after the job ended
        now = len(stored_files(ctx)) if mode == "get" else len(dest.received)
        # While the cancel took effect, a few in flight plus what flowed at the pace that limits this case
        # (the node's 2 instances/s, or the slow destination's 4/s; on a loaded machine the cancel can take a
        # second or two); once the job has ended, at most the one instance the destination was holding.
        pace = 2.0 if "rate" in case else 1.0 / dest.delay
        assert at_end <= arrived + 3 + int(pace * took) + 1, (arrived, at_end, took)
        assert now <= at_end + 1 and now < 24, (arrived, at_end, now, took)
    finally:
        pacs.stop()
        dest.close()


def test_a_c_get_peer_that_ignores_c_cancel_is_aborted(ctx, tmp_path):
    """A C-GET SCP (pynetdicom) whose handler ignores C-CANCEL and sends an instance every 0.3 s: the
    download stops within the C-CANCEL grace (the association is aborted), with what arrived kept."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid
    from pynetdicom import AE, StoragePresentationContexts, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    from .orthanc import free_port

    series = generate_uid()
    files = [make_instance(tmp_path / "src" / f"{i}.dcm", rows=16, PatientID="STUB1", SeriesInstanceUID=series,
                           InstanceNumber=i + 1) for i in range(30)]
    cancelled_seen: list[bool] = []

    def on_get(event):  # type: ignore[no-untyped-def]
        yield len(files)
        for i in range(len(files)):
            cancelled_seen.append(event.is_cancelled)
            time.sleep(0.3)
            yield 0xFF00, dcmread(tmp_path / "src" / f"{i}.dcm")

    ae = AE(ae_title="STUBBORN")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    for cx in StoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, scu_role=True, scp_role=True)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_GET, on_get)])
    try:
        node = Node(name="stub", ae_title="STUBBORN", host="127.0.0.1", port=port)
        cancel = threading.Event()
        asked: list[float] = []

        def cancel_after_two() -> None:  # once instances flow, whatever the association took
            while len(stored_files(ctx)) < 2:
                time.sleep(0.02)
            asked.append(time.monotonic())
            cancel.set()

        threading.Thread(target=cancel_after_two, daemon=True).start()
        ref = sources.SeriesRef(study_uid=str(files[0].StudyInstanceUID), series_uid=series, expected=30)
        transfer = sources.GetDownloader(node, ctx.settings.ae_title, ctx).fetch(ref, None, cancel)
        took = time.monotonic() - asked[0]
    finally:
        server.shutdown()
    assert took < sources.CANCEL_GRACE + 1.5, took
    assert transfer.error == "cancelled", transfer
    assert any(cancelled_seen), "the peer never saw our C-CANCEL"
    assert 2 <= len(transfer.stored) <= 14, len(transfer.stored)
    assert len(stored_files(ctx)) == len(transfer.stored)


# -- C-GET of what the node stores compressed (issue 14, item 19) -------------------------------------------
J2K_FILES = ("MR_small_jp2klossless.dcm", "JPEG2000.dcm", "examples_jpeg2k.dcm")


def _j2k_patient(folder: Path) -> list[Path]:
    """pydicom's JPEG 2000 files as one patient (PatientID J2K1), pixel data and transfer syntax untouched."""
    import pydicom

    out = []
    folder.mkdir(parents=True, exist_ok=True)
    for name in J2K_FILES:
        ds = pydicom.dcmread(TEST_FILES / name)
        ds.PatientID = "J2K1"
        out.append(folder / name)
        ds.save_as(out[-1], enforce_file_format=True)
    return out


@pytest.mark.parametrize("by", ["patient", "series"])
def test_c_get_of_jpeg2000_from_orthanc_arrives_as_stored(ctx, tmp_path, by):
    """Orthanc stores JPEG 2000 and cannot transcode it: our C-GET proposes contexts it can send in
    (it failed with only 0xC000 when each SOP class had one context listing every syntax)."""
    import pydicom

    files = _j2k_patient(tmp_path / "src")
    syntaxes = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID:
                str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    pacs = Orthanc(tmp_path / "orthanc", modalities={"pb": (ctx.settings.ae_title, "127.0.0.1", 1)}).start()
    try:
        pacs.upload(files)
        jobs = add_node(ctx, pacs, retrieve="get")
        query = ({"PatientID": "J2K1"} if by == "patient" else  # series only: their studies are asked apart
                 {"SeriesInstanceUID": [str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)
                                        for f in files]})
        job, _ = jobs.submit("retrieve", {"query": query}, node="pacs")
        done = runner.run_job(job.id, ctx, jobs)
    finally:
        pacs.stop()
    assert done.state == "succeeded", done.error
    assert sorted(index_sops(ctx)) == sorted(syntaxes)
    got = {}
    for p in stored_files(ctx):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        got[ds.SOPInstanceUID] = str(ds.file_meta.TransferSyntaxUID)
    assert got == syntaxes  # as the node stores them: nothing transcoded on the way


def test_c_get_sub_operations_the_node_cannot_send_say_why_and_suggest_c_move(ctx, tmp_path, monkeypatch):
    """Offered only uncompressed syntaxes (what our C-GET did for every SOP class), Orthanc fails the
    JPEG 2000 sub-operations: the job says which instances, why, and to try C-MOVE."""
    files = _j2k_patient(tmp_path / "src")
    monkeypatch.setattr(sources, "GET_COMPRESSED", ())
    pacs = Orthanc(tmp_path / "orthanc", modalities={"pb": (ctx.settings.ae_title, "127.0.0.1", 1)}).start()
    try:
        pacs.upload(files)
        jobs = add_node(ctx, pacs, retrieve="get")
        job, _ = jobs.submit("retrieve", {"query": {"PatientID": "J2K1"}}, node="pacs")
        done = runner.run_job(job.id, ctx, jobs)
    finally:
        pacs.stop()
    assert done.state == "failed", done
    for row in done.series:
        assert "could not send" in row.error and "mode 'move'" in row.error, row.error
        assert "JPEG 2000" in row.error or "accepted" in row.error, row.error
    assert "mode 'move'" in done.error
