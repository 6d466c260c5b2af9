"""Review findings on job running: takeover, cancel of a dead worker's job, unexpected errors, enqueueing.

Each test failed against the code before its fix (real SQLite and PostgreSQL; the job
body is a stand-in registered in ``runner.RUNNERS`` where the real kinds cannot be paused).
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import update

from pacsbridge.worker import runner
from pacsbridge.shared.jobs.store import JobStore
from pacsbridge.shared.core.schema import jobs_table
from pacsbridge.worker.outcome import Outcome

#: What the stand-in body saw, per test.
CALLS: list[str] = []
RELEASE = threading.Event()


def waiting_body(job, ctx, jobs, cancel) -> Outcome:
    """Works until cancelled (or released); says what it saw."""
    CALLS.append(job.id)
    cancel.wait(20)
    return Outcome("cancelled" if cancel.is_set() else "succeeded", "", {"body": "done"})


@pytest.fixture
def jobs(ctx) -> JobStore:
    return JobStore(ctx.index.engine)


@pytest.fixture
def stand_in(monkeypatch):
    CALLS.clear()
    RELEASE.clear()
    monkeypatch.setitem(runner.RUNNERS, "import", waiting_body)
    monkeypatch.setattr(runner, "HEARTBEAT_SECONDS", 0.1)
    yield CALLS


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_worker_whose_job_was_taken_over_does_not_finish_it(ctx, jobs, stand_in):
    """Worker A's beats were late (a database blip, a paused VM): B took the job over. A's next
    beat stops A, and A must then leave the row to B, not write its own end over B's run."""
    job, _ = jobs.submit("import", {"path": "x"})
    out: dict[str, object] = {}
    a = threading.Thread(target=lambda: out.setdefault("a", runner.run_job(job.id, ctx, jobs, worker="A")))
    a.start()
    assert _wait(lambda: stand_in == [job.id])
    taken = jobs.claim(job.id, "B", stale_after=-1)  # B judged A dead
    assert taken is not None and taken.worker == "B"
    a.join(15)
    assert not a.is_alive()
    row = jobs.get(job.id)
    assert (row.state, row.worker, row.finished_at) == ("running", "B", None), row
    assert out["a"] is None  # A did not report the job as its own result


def test_a_cancelled_job_of_a_dead_worker_is_not_run_again(ctx, jobs, stand_in, monkeypatch):
    """Cancel asked while the job's worker was dead: the worker that takes the job over must
    end it as cancelled, not start pulling/pushing again."""
    job, _ = jobs.submit("import", {"path": "x"})
    assert jobs.claim(job.id, "dead-worker") is not None
    jobs.cancel(job.id)  # running: only cancel_requested
    with jobs.engine.begin() as conn:  # its worker died long ago
        conn.execute(update(jobs_table).where(jobs_table.c.id == job.id).values(heartbeat_at=time.time() - 3600))
    done = runner.run_job(job.id, ctx, jobs, worker="B")
    assert stand_in == []  # the body never ran
    assert done is not None and done.state == "cancelled" and done.finished_at is not None


def test_an_unexpected_error_fails_the_job_instead_of_leaving_it_running(ctx, jobs, tmp_path):
    """A repack whose export root is a file (an OSError, not a PacsbridgeError) left the job
    ``running`` for ever: the sweeper re-sent it every stale period and it failed again."""
    blocker = tmp_path / "export-is-a-file"
    blocker.write_text("x")
    ctx = ctx._replace(settings=ctx.settings.with_(export_root=blocker))
    job, _ = jobs.submit("repack", {"selection": {"PatientID": ["P"]}, "dest": "d", "template": "px-repack",
                                    "link": False})
    done = runner.run_job(job.id, ctx, jobs, worker="A")
    assert done is not None and done.state == "failed"
    assert "FileExistsError" in done.error or "File exists" in done.error
    assert blocker.read_text() == "x"
    assert jobs.due_for_enqueue(0, 0) == []  # nothing left for the sweeper to re-run


def test_a_database_error_in_a_job_still_propagates_for_the_task_retry(ctx, jobs, stand_in, monkeypatch):
    """Database outages keep their meaning: the Celery task retries, the job stays running."""
    from sqlalchemy.exc import OperationalError

    def broken(job, ctx, jobs, cancel):
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    monkeypatch.setitem(runner.RUNNERS, "import", broken)
    job, _ = jobs.submit("import", {"path": "x"})
    with pytest.raises(OperationalError):
        runner.run_job(job.id, ctx, jobs, worker="A")
    assert jobs.get(job.id).state == "running"


def test_a_job_sent_by_the_api_is_not_sent_again_by_the_sweeper(ctx, tmp_path):
    """The API sent run_job but never recorded it: every API job got a second message at the
    next sweep (and the sweeper's own resend period was meaningless for them)."""
    from pacsbridge.api import create_app

    from .test_api import TOKEN_SPEC, auth

    (tmp_path / "import").mkdir()
    settings = ctx.settings.with_(api_tokens=TOKEN_SPEC, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
                                  import_root=tmp_path / "import")
    app = create_app({"SETTINGS": settings, "TESTING": True})
    try:
        resp = app.test_client().post("/api/v1/jobs", json={"kind": "import", "path": "b"},
                                      headers=auth("user"))
        assert resp.status_code == 202 and resp.get_json()["enqueued"] is True
        job_id = resp.get_json()["id"]
        store = app.extensions["pacsbridge"].jobs
        assert job_id not in store.due_for_enqueue(resend_after=300, stale_after=40)
        store.finish(job_id, "failed", "test")
        retried = app.test_client().post(f"/api/v1/jobs/{job_id}/retry", headers=auth("user"))
        assert retried.status_code == 202 and retried.get_json()["enqueued"] is True
        assert job_id not in store.due_for_enqueue(resend_after=300, stale_after=40)
    finally:
        app.extensions["pacsbridge"].close()


def test_the_same_request_submitted_at_the_same_moment_makes_one_job(jobs):
    """A double click, or a client re-sending a POST that timed out: both submits read "no
    equal job yet" and both inserted one, so the same studies were pulled twice at once
    (every round on PostgreSQL, about half on SQLite)."""
    for round_ in range(12):
        params = {"path": f"race-{round_}"}
        barrier = threading.Barrier(4)
        created: list[object] = []

        def submit() -> None:
            barrier.wait()  # noqa: B023 (called and joined within the iteration)
            created.append(jobs.submit("import", params)[1])  # noqa: B023 (called and joined within the iteration)

        threads = [threading.Thread(target=submit) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(created, key=str) == [False, False, False, True], (round_, created)
    assert jobs.list(kind="import")[1] == 12
