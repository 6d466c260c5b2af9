"""The test harness leaves the machine's shared services alone: other test runs use them at the same time."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from .test_e2e import Compose
from .test_listener import Stack

MACHINE_REDIS = ("127.0.0.1", 6379)


def _redis(db: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-h", MACHINE_REDIS[0], "-p", str(MACHINE_REDIS[1]), "-n", str(db), *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def sentinels():
    """One key of our own in each of the machine Redis' 16 databases (expiring, and removed afterwards)."""
    try:
        _redis(0, "ping")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no Redis on 127.0.0.1:6379 (make services)")
    key = f"pacsbridge-test-sentinel-{uuid.uuid4().hex}"
    for db in range(16):
        _redis(db, "set", key, "mine", "ex", "300")
    yield key
    for db in range(16):
        _redis(db, "del", key)


def _lost(key: str, dbs: set[int]) -> list[int]:
    """Which of ``dbs`` lost our key. Only the databases the old harness picked for our ports are looked at:
    other test runs on this machine (still on the old harness) may empty any of the 16 at any time."""
    return [db for db in sorted(dbs) if _redis(db, "get", key) != "mine"]


def _old_pick(port: int) -> int:
    return port % 14 + 1  # the database the harness used to flush for a stack listening on ``port``


def test_the_listener_stack_brings_its_own_redis(tmp_path, sentinels):
    stacks = [Stack(tmp_path / str(i)) for i in range(3)]  # three ports: three of the old port % 14 + 1 picks
    try:
        assert _lost(sentinels, {_old_pick(s.port) for s in stacks}) == []
        for stack in stacks:
            assert f":{MACHINE_REDIS[1]}/" not in stack.env["PACSBRIDGE_BROKER_URL"]
            # its broker answers (so the services can start), and it is not the machine's
            assert subprocess.run(["redis-cli", "-u", stack.env["PACSBRIDGE_BROKER_URL"], "ping"],
                                  capture_output=True, text=True).stdout.strip() == "PONG"
    finally:
        for stack in stacks:
            stack.close()
    for stack in stacks:  # and its Redis is gone with it
        assert subprocess.run(["redis-cli", "-u", stack.env["PACSBRIDGE_BROKER_URL"], "ping"],
                              capture_output=True, text=True).stdout.strip() != "PONG"


@pytest.mark.slow
def test_the_compose_like_stack_brings_its_own_redis(tmp_path, pg_url, sentinels):
    stack = Compose(tmp_path, pg_url)  # starts listener, worker and API, and waits for /healthz
    try:
        assert _lost(sentinels, {_old_pick(stack.dicom_port)}) == []
        assert f":{MACHINE_REDIS[1]}/" not in stack.env["PACSBRIDGE_BROKER_URL"]
        status, body = stack.call("GET", "/healthz", auth=False)
        assert status == 200, body
    finally:
        stack.close()
    assert subprocess.run(["redis-cli", "-u", stack.env["PACSBRIDGE_BROKER_URL"], "ping"],
                          capture_output=True, text=True).stdout.strip() != "PONG"
