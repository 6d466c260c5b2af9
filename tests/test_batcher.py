"""The listener's Batcher: when batches go out, and that none is lost while the broker fails.

A ``send`` function stands in for Celery here; the real broker path (Redis
stopped during a transfer) is covered by test_listener / test_faults.
"""

import threading
import time

from pacsbridge.listener.queue import Batcher


class Recorder:
    def __init__(self, fail_first: int = 0) -> None:
        self.batches: list[list[str]] = []
        self.fail_left = fail_first
        self.event = threading.Event()

    def __call__(self, batch: list[str]) -> None:
        if self.fail_left:
            self.fail_left -= 1
            raise ConnectionError("broker down")
        self.batches.append(list(batch))
        self.event.set()

    def sent(self) -> list[str]:
        return [p for b in self.batches for p in b]


def wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def test_a_full_batch_goes_out_at_once():
    rec = Recorder()
    b = Batcher(rec, max_batch=5, interval=60)
    for i in range(5):
        b.add(f"p{i}")
    assert wait_for(lambda: rec.sent() == [f"p{i}" for i in range(5)], 2.0)
    b.close()


def test_a_partial_batch_waits_for_the_interval():
    rec = Recorder()
    b = Batcher(rec, max_batch=100, interval=0.5)
    t0 = time.monotonic()
    b.add("a")
    time.sleep(0.2)
    b.add("b")
    assert not rec.batches  # neither full nor old enough
    assert wait_for(lambda: rec.sent() == ["a", "b"], 3.0)
    assert time.monotonic() - t0 >= 0.45  # measured from the oldest path, not the newest
    assert len(rec.batches) == 1
    b.close()


def test_flush_sends_what_is_pending_now():
    rec = Recorder()
    b = Batcher(rec, max_batch=100, interval=60)
    b.add("a")
    b.add("b")
    time.sleep(0.1)
    assert not rec.batches
    b.flush()
    assert wait_for(lambda: rec.sent() == ["a", "b"], 2.0)
    b.flush()  # nothing pending: nothing sent, and the next path waits for its interval again
    b.add("c")
    time.sleep(0.2)
    assert rec.sent() == ["a", "b"]
    b.close()
    assert rec.sent() == ["a", "b", "c"]  # close sends the rest


def test_paths_survive_a_failing_broker_in_order():
    rec = Recorder(fail_first=3)
    b = Batcher(rec, max_batch=2, interval=0.05)
    paths = [f"p{i}" for i in range(7)]
    for p in paths:
        b.add(p)
    assert wait_for(lambda: rec.sent() == paths, 10.0)
    assert b.pending() == 0 and b.sent == 7
    b.close()


def test_close_with_the_broker_down_returns_and_keeps_nothing_in_flight_forever():
    rec = Recorder(fail_first=10**6)
    b = Batcher(rec, max_batch=10, interval=0.05)
    b.add("a")
    time.sleep(0.1)
    t0 = time.monotonic()
    b.close(timeout=3.0)
    assert time.monotonic() - t0 < 3.0  # the reconciler finds "a" later (test_listener)
    assert rec.sent() == []
