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


def send_batch(stack: Stack, folder: Path, patient: str, n: int) -> list:
    """Make ``n`` instances in ``folder`` and send them with storescu; success is required."""
    datasets = [make_instance(folder / f"{i}.dcm", PatientID=patient) for i in range(n)]
    proc = storescu(stack.port, *sorted(folder.iterdir()))
    assert proc.returncode == 0, proc.stderr
    return datasets


def outage_while_storing(tmp_path: Path, stack: Stack, server, n: int, pause: float, timeout: float) -> None:
    """Store n, stop ``server``, store n more (still answered success), start it again: all 2n indexed."""
    try:
        stack.start("listener")
        stack.start("worker", "--concurrency", "1")
        first = send_batch(stack, tmp_path / "a", "A", n)
        assert len(indexed_sops(stack.settings, n)) == n
        server.stop()
        second = send_batch(stack, tmp_path / "b", "B", n)  # still storing, still answering success
        stored = [p for p in stack.settings.storage.rglob("*.dcm") if ".incoming" not in p.parts]
        assert len(stored) == 2 * n
        time.sleep(pause)
        server.start()
        assert indexed_sops(stack.settings, 2 * n, timeout=timeout) == {d.SOPInstanceUID for d in first + second}
    finally:
        stack.close()


def test_redis_down_during_transfer_loses_nothing(tmp_path, redis):
    # the restarted Redis is empty: what was queued is gone, and the reconciler queues it again
    outage_while_storing(tmp_path, Stack(tmp_path, broker_url=redis.url), redis, 10, 2, 90)


def test_postgres_outage_delays_indexing_only(tmp_path, postgres):
    # meanwhile the worker's tasks fail and are retried with backoff
    outage_while_storing(tmp_path, Stack(tmp_path, database_url=postgres.url), postgres, 5, 3, 120)


def test_a_receiver_made_while_the_broker_is_down_sends_once_it_is_up(settings):
    """The receiver prepares its Celery producer at start without connecting: no broker, no wait
    and no error then; the first batch after the broker starts is delivered."""
    import redis as redis_client

    from pacsbridge.listener.server import make_sender

    server = ThrowawayRedis()  # not started yet
    send = make_sender(settings.with_(broker_url=server.url))
    server.start()
    try:
        send(["a/b.dcm", "a/c.dcm"])
        client = redis_client.Redis(port=server.port)
        assert client.llen("pacsbridge") == 1  # one task for the batch
        assert b"a/c.dcm" in client.lindex("pacsbridge", 0)
        client.close()
    finally:
        server.stop()
