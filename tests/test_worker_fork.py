"""The jobs worker's background threads and the forks of Celery's pool (services/worker/main.py).

The sweeper and the stable checker run in the process that billiard forks its pool children from.
A child forked in the middle of their pass inherited the pass's locks with no thread to release
them: an import under way (Python's module lock: the child's ``import alembic`` waited forever)
or a SQLite transaction (SQLite's per-process lock bookkeeping: the child's ``BEGIN IMMEDIATE``
never got the lock). Seen as test_a_job_whose_message_was_lost_is_swept_into_the_queue_and_run
hanging in about one run of two of tests/test_jobs.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Run in a process of its own: a fork of pytest's process, and a fork hook registered in it for good,
# would be the test's business only. The child reports through its exit status.
SCRIPT = textwrap.dedent('''
    import os, signal, sys, threading, time
    from sqlalchemy import text
    from pacsbridge.shared.core.db import make_engine
    from pacsbridge.worker import main

    url, modules = sys.argv[1], sys.argv[2]
    sys.path.insert(0, modules)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS forked (n INTEGER)"))
    engine.dispose()
    main.guard_forks()
    inside = threading.Event()

    def a_pass():  # what a sweep does: a lazy import, then a write transaction
        with main.one_pass(engine):
            inside.set()
            import slow_to_import  # noqa: F401  (sleeps while its module lock is held)
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO forked VALUES (1)"))
                time.sleep(0.5)

    thread = threading.Thread(target=a_pass)
    thread.start()
    inside.wait()
    pid = os.fork()  # what billiard does while the thread is in its pass
    if pid == 0:
        code = 9
        try:
            signal.alarm(20)  # a lock that is never released: SIGALRM ends the child
            if engine.pool.checkedin() or engine.pool.checkedout():
                code = 3  # a connection of the parent came along
            else:
                import slow_to_import  # noqa: F401,F811
                own = make_engine(url)
                with own.begin() as conn:
                    if own.dialect.name == "sqlite":
                        conn.exec_driver_sql("BEGIN IMMEDIATE")  # SQLite's write lock, as migrations take it
                    conn.execute(text("INSERT INTO forked VALUES (2)"))
                own.dispose()
                code = 0
        finally:
            os._exit(code)
    thread.join()
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
''')


def test_a_fork_waits_for_the_pass_of_a_background_thread_and_takes_none_of_its_locks(db_url, tmp_path):
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "slow_to_import.py").write_text("import time\ntime.sleep(0.5)\n")
    done = subprocess.run([sys.executable, "-c", SCRIPT, db_url, str(modules)], capture_output=True, text=True,
                          timeout=120)
    # 0: the child imported, connected and wrote; -14 (SIGALRM): it waited for a lock of the parent's
    # thread forever; 3: it inherited a pooled connection of the parent
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
