"""Break it for real: the broker or the database goes away while instances arrive."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from .helpers import make_instance
from .servers import ThrowawayPostgres, ThrowawayRedis
from .test_listener import Stack, indexed_sops, storescu


@pytest.fixture
def redis():
    server = ThrowawayRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres():
    # not under pytest's tmp folder: that one is private to root, and PostgreSQL runs as postgres
    server = ThrowawayPostgres(Path(tempfile.mkdtemp(prefix="pacsbridge-pg-")))
    server.start()
    yield server
    server.remove()


def test_redis_down_during_transfer_loses_nothing(tmp_path, redis):
    stack = Stack(tmp_path, broker_url=redis.url)
    try:
        stack.start("listener")
        stack.start("worker", "--concurrency", "1")
        first = [make_instance(tmp_path / "a" / f"{i}.dcm", PatientID="A") for i in range(10)]
        assert storescu(stack.port, *sorted((tmp_path / "a").iterdir())).returncode == 0
        assert len(indexed_sops(stack.settings, 10)) == 10
        redis.stop()
        second = [make_instance(tmp_path / "b" / f"{i}.dcm", PatientID="B") for i in range(10)]
        proc = storescu(stack.port, *sorted((tmp_path / "b").iterdir()))
        assert proc.returncode == 0, proc.stderr  # still storing, still answering success
        stored = [p for p in stack.settings.storage.rglob("*.dcm") if ".incoming" not in p.parts]
        assert len(stored) == 20
        time.sleep(2)
        redis.start()  # an empty Redis: whatever was queued before is gone, the reconciler requeues
        sops = indexed_sops(stack.settings, 20, timeout=90)
        assert sops == {d.SOPInstanceUID for d in first + second}
    finally:
        stack.close()


def test_postgres_outage_delays_indexing_only(tmp_path, postgres):
    stack = Stack(tmp_path, database_url=postgres.url)
    try:
        stack.start("listener")
        stack.start("worker", "--concurrency", "1")
        first = [make_instance(tmp_path / "a" / f"{i}.dcm", PatientID="A") for i in range(5)]
        assert storescu(stack.port, *sorted((tmp_path / "a").iterdir())).returncode == 0
        assert len(indexed_sops(stack.settings, 5)) == 5
        postgres.stop()
        second = [make_instance(tmp_path / "b" / f"{i}.dcm", PatientID="B") for i in range(5)]
        proc = storescu(stack.port, *sorted((tmp_path / "b").iterdir()))
        assert proc.returncode == 0, proc.stderr
        time.sleep(3)  # the worker's task fails and is retried with backoff
        postgres.start()
        sops = indexed_sops(stack.settings, 10, timeout=120)
        assert sops == {d.SOPInstanceUID for d in first + second}
    finally:
        stack.close()
