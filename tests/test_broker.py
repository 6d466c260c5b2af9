"""The embedded broker (kombu's SQLAlchemy transport on SQLite) shared by processes starting together."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time

from pacsbridge.shared.core.celeryapp import INDEX_QUEUE, JOBS_QUEUE, WEBHOOK_QUEUE

# kombu makes a queue's row on first use under a lock of its own process: two processes that use a
# new queue at once both insert it ("UNIQUE constraint failed: kombu_queue.name", seen in
# test_webhooks_from_a_real_worker), or one finds the table made under it. Workers declare the
# queues when they start, and retry. (With attempts=1, one process of 6 failed in 2 races of 3.)
SCRIPT = textwrap.dedent('''
    import logging, sys, time
    from pacsbridge.shared.core.celeryapp import declare_queues, make_celery
    from pacsbridge.shared.core.config import Settings

    url, start, attempts = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    logging.basicConfig()  # the warning of a failed declaration, for the assertion's message
    app = make_celery(Settings(broker_url=url))
    time.sleep(max(0.0, start - time.time()))  # all processes at the same instant
    sys.exit(0 if declare_queues(app, attempts=attempts) else 1)
''')


def _race(tmp_path, attempts: int, processes: int = 6) -> list[subprocess.CompletedProcess]:
    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    start = time.time() + 3  # after every interpreter has imported celery
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, url, str(start), str(attempts)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


def test_workers_starting_together_all_declare_the_queues_once(tmp_path):
    done = _race(tmp_path, attempts=5)
    assert [d.returncode for d in done] == [0] * len(done), [d.stderr[-1500:] for d in done if d.returncode]
    with sqlite3.connect(tmp_path / "broker.db") as conn:
        names = sorted(r[0] for r in conn.execute("SELECT name FROM kombu_queue"))
    assert names == sorted([INDEX_QUEUE, JOBS_QUEUE, WEBHOOK_QUEUE])
