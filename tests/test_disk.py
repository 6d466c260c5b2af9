"""The storage's free-space watermark (PACSBRIDGE_DISK_MIN_FREE): storage, a retrieve job, /healthz and
/metrics, on the real file system (a watermark above what is free is the disk below it); the listener's
0xA700 on a real small file system is in test_listener.py."""

from __future__ import annotations

import os

import pytest

from pacsbridge.shared.core.config import Settings
from pacsbridge.shared.core.errors import ConfigError
from pacsbridge.shared.index.context import open_context
from pacsbridge.shared.index.disk import DiskGuard, DiskLow, parse_min_free
from pacsbridge.shared.index.storage import OWN_FOLDERS, Storage
from pacsbridge.shared.jobs.store import JobStore
from pacsbridge.worker import runner

from .helpers import make_instance
from .test_api import TOKEN_SPEC, auth
from .test_listener import free_port


def test_watermark_forms():
    assert parse_min_free("5%") == (5.0, True)
    assert parse_min_free("2G") == (2 << 30, False)
    assert parse_min_free("500MiB") == (500 << 20, False)
    assert parse_min_free("1048576") == (1048576, False)
    assert parse_min_free("0") == (0, False)
    for bad in ("", "-1", "5 %%", "101%", "2X", "1e9"):
        with pytest.raises(ConfigError):
            parse_min_free(bad)
        if bad:
            with pytest.raises(ValueError):
                Settings(disk_min_free=bad)
    assert Settings().disk_min_free == "5%"


def _stored(root) -> list:
    return [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in OWN_FOLDERS]


def test_store_below_the_watermark_writes_nothing(tmp_path):
    ds = make_instance(tmp_path / "a.dcm", PatientID="LOW")
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    low = Storage(tmp_path / "data", fsync=False, min_free=str(free + (1 << 30)))  # above what is free
    low.ensure()
    with pytest.raises(DiskLow, match="below its watermark"):
        low.store(tmp_path / "a.dcm", ds)
    with pytest.raises(DiskLow):
        fd, tmp = low.temp_file()
        os.close(fd)
        low.link_into_place(tmp, low.path_for(ds))
    assert _stored(tmp_path / "data") == [] and os.listdir(low.incoming) == []
    ok = Storage(tmp_path / "data", fsync=False, min_free="1M")  # well under what is free
    assert ok.store(tmp_path / "a.dcm", ds).action == "stored"
    assert len(_stored(tmp_path / "data")) == 1
    # a second copy needs no space: answered as a duplicate even below the watermark
    assert low.store(tmp_path / "a.dcm", ds).action == "duplicate"


def test_the_check_is_remembered_for_a_second(tmp_path):
    guard = DiskGuard(tmp_path, "100%")  # always below: free < size
    first = guard.state()
    assert first.low and first.min_free == first.total
    assert guard.state() is first  # no second statvfs within the interval
    assert guard.state(fresh=True) is not first
    assert not DiskGuard(tmp_path, "0").enabled
    DiskGuard(tmp_path, "0").require()  # off: never raises


def test_retrieve_job_stops_with_a_clear_error_below_the_watermark(settings):
    ctx = open_context(settings.with_(disk_min_free="100%"))
    ctx.index.create()
    jobs = JobStore(ctx.index.engine)
    try:
        from pacsbridge.shared.dicom.node import Node

        jobs.add_node(Node(name="pacs", ae_title="NOWHERE", host="127.0.0.1", port=free_port()))
        job, _ = jobs.submit("retrieve", {"query": {"PatientID": "X"}}, "pacs")
        done = runner.run_job(job.id, ctx, jobs)
        assert done is not None and done.state == "failed"
        assert "below its watermark" in done.error and "PACSBRIDGE_DISK_MIN_FREE" in done.error
    finally:
        ctx.index.engine.dispose()


@pytest.mark.parametrize("min_free", ["100%", "1M"])
def test_health_and_metrics_report_the_watermark(settings, tmp_path, min_free):
    from pacsbridge.api import create_app

    s = settings.with_(api_tokens=TOKEN_SPEC, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
                       listener_port=free_port(), disk_min_free=min_free)
    app = create_app({"SETTINGS": s, "TESTING": True})
    try:
        client = app.test_client()
        resp = client.get("/healthz")
        disk = resp.get_json()["checks"]["disk"]
        low = min_free == "100%"
        assert disk["low"] is low and disk["ok"] is not low and disk["required"] is False
        assert disk["free_bytes"] > 0 and disk["total_bytes"] >= disk["free_bytes"]
        assert (disk["min_free_bytes"] == disk["total_bytes"]) if low else disk["min_free_bytes"] == 1 << 20
        assert ("below its watermark" in disk.get("error", "")) is low
        assert resp.status_code == 200  # reported, not required: reading goes on
        text = client.get("/metrics", headers=auth("read")).get_data(as_text=True)
        assert f"pacsbridge_storage_low {1.0 if low else 0.0}" in text
        assert "pacsbridge_storage_free_bytes " in text and "pacsbridge_storage_min_free_bytes " in text
    finally:
        app.extensions["pacsbridge"].close()


def test_near_the_watermark_what_this_process_wrote_brings_the_next_look_forward(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    guard = DiskGuard(tmp_path, str(free - (4 << 20)))  # 4 MB of room above the watermark
    first = guard.state()
    guard.spent(1 << 20)
    assert guard.state() is first  # 1 MB of 4: the answer stands
    guard.spent(1 << 20)
    assert guard.state() is not first  # half the room written: looked again
