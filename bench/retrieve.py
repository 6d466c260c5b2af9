#!/usr/bin/env python
"""Retrieve benchmark: N synthetic CT from Orthanc, DCMTK movescu+storescp vs pacsbridge jobs.

Usage::

    python bench/retrieve.py [--instances 2000] [--runs 3] [--workdir /tmp/pacsbridge-bench-retrieve]
        [--pg-url postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench_retrieve]
        [--targets movescu,move,get]

One Orthanc (TCP_NODELAY=1) holds the N instances (``bench/gen_ct.py``,
one patient per run set: ``BENCHRET``). Per target and run, fresh receivers:

- ``movescu``: ``storescp --fork -od DIR`` as AE DEST plus ``movescu -S -k
  QueryRetrieveLevel=PATIENT -k PatientID=BENCHRET``; ends when movescu
  exits and N files are in DIR (no index: an upper bound for us).
- ``move``: ``pacsbridge listener`` + ``pacsbridge worker --concurrency 2``
  (PostgreSQL, Redis, fsync on); a retrieve job (C-MOVE) run through
  ``runner.run_job`` in this process; ends when the job is ``succeeded``,
  i.e. all N are in the index.
- ``get``: the same job with C-GET (stored and indexed by the job itself).

Reports inst/s per run, medians and the ratio to movescu+storescp, and the
job's own split (find / move / waiting for the index) from its result.
The machine is shared: other work may run at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ensure_database, host_facts, log, median  # noqa: E402

PATIENT = "BENCHRET"


def _group_cpu(pgids: set[int]) -> float:
    """CPU seconds used so far by every process in these process groups."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in pgids:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def settle(pgids: set[int], timeout: float = 60.0) -> None:
    """Wait until the listener's receivers and the workers have started (their groups go idle).

    They are fresh interpreters that import for seconds; timing a job that runs while they
    import would charge their start-up to the retrieve.
    """
    deadline = time.monotonic() + timeout
    before = _group_cpu(pgids)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _group_cpu(pgids)
        if now - before < 0.05:
            return
        before = now
    log("the stack did not go idle; timing anyway")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/pacsbridge-bench-retrieve")
    ap.add_argument("--pg-url", default="postgresql+psycopg2://postgres@127.0.0.1:5432/pacsbridge_bench_retrieve")
    ap.add_argument("--targets", default="movescu,move,get")
    ap.add_argument("--max-associations", type=int, default=4,
                    help="the PACS node's association limit (series and parts of series pulled in parallel)")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    from gen_ct import generate
    from sqlalchemy import create_engine, text

    from tests.orthanc import Orthanc, free_port
    from tests.test_listener import Stack

    gen = work / "gen"
    if not (gen / ".done").exists():
        log(f"generating {args.instances} CT")
        files = generate(gen, args.instances, patients=1, series_per_study=2)
        (gen / ".done").write_text(str(len(files)))
    files = sorted(p for p in gen.rglob("*") if p.is_file() and p.name != ".done")
    n = len(files)
    import pydicom

    patient = str(pydicom.dcmread(files[0], stop_before_pixels=True).PatientID)
    ensure_database(args.pg_url)
    dest_port = free_port()
    results: dict[str, list[float]] = {t: [] for t in args.targets.split(",")}
    splits: dict[str, list[dict]] = {t: [] for t in results}
    env = {**os.environ, "TCP_NODELAY": "1"}
    for run in range(args.runs):
        stack = Stack(work / f"stack{run}", database_url=args.pg_url,
                      PACSBRIDGE_ALLOWED_PEERS="ORTHANC@127.0.0.1", PACSBRIDGE_FSYNC="1",
                      PACSBRIDGE_RETRIEVE_WAIT_SECONDS="60",
                      # production defaults: the test stack's 2 s reconciler re-queues, and the
                      # workers re-index, every instance stored but not indexed yet
                      PACSBRIDGE_RECONCILE_SECONDS="300", PACSBRIDGE_RECONCILE_MIN_AGE="30",
                      # PACSBRIDGE_REACTOR in this script's environment selects the jobs' (this process's)
                      # reactors; the listener keeps its own setting (PACSBRIDGE_LISTENER_REACTOR, default wait)
                      PACSBRIDGE_REACTOR=os.environ.get("PACSBRIDGE_LISTENER_REACTOR", "wait"))
        pacs = Orthanc(work / "orthanc", modalities={"pb": ("PACSBRIDGE", "127.0.0.1", stack.port),
                                                     "dest": ("DEST", "127.0.0.1", dest_port)})
        pacs.start()
        try:
            if pacs.instance_count() < n:
                log("uploading to Orthanc")
                subprocess.run(["storescu", "-aet", "BENCH", "-aec", "ORTHANC", "+sd", "+r", "127.0.0.1",
                                str(pacs.dicom_port), str(gen)], env=env, check=False, capture_output=True)
            if pacs.instance_count() < n:  # storescu gave up on some: send the rest over REST
                pacs.upload(files)
            assert pacs.instance_count() >= n, pacs.instance_count()
            for target in results:
                if target == "movescu":
                    out = work / f"scp{run}"
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                    out.mkdir()
                    scp = subprocess.Popen(["storescp", "-aet", "DEST", "--fork", "-od", str(out), str(dest_port)],
                                           env=env, start_new_session=True)
                    time.sleep(0.5)
                    t0 = time.perf_counter()
                    mv = subprocess.run(["movescu", "-aet", "DEST", "-aec", "ORTHANC", "-aem", "DEST", "-S",
                                         "-k", "QueryRetrieveLevel=PATIENT", "-k", f"PatientID={patient}",
                                         "127.0.0.1", str(pacs.dicom_port)], env=env, capture_output=True,
                                        text=True)
                    while len(list(out.iterdir())) < n and time.perf_counter() - t0 < 600:
                        time.sleep(0.05)
                    dt = time.perf_counter() - t0
                    scp.kill()
                    scp.wait()
                    got = len(list(out.iterdir()))
                    assert got == n, (got, mv.stdout[-500:], mv.stderr[-500:])
                    results[target].append(n / dt)
                    log(f"run {run} movescu+storescp: {n / dt:.1f} inst/s")
                    continue
                engine = create_engine(args.pg_url)
                with engine.begin() as conn:  # a fresh index each time (the bench's own database): every
                    # table with the migrations' version table, so that create() makes them all again
                    conn.execute(text("drop schema public cascade"))
                    conn.execute(text("create schema public"))
                engine.dispose()
                subprocess.run(["rm", "-rf", str(stack.settings.storage)], check=True)
                from pacsbridge.worker import runner
                from pacsbridge.shared.index.context import open_context
                from pacsbridge.shared.jobs.store import JobStore
                from pacsbridge.shared.dicom.node import Node

                ctx = open_context(stack.settings.with_(fsync=True))
                ctx.index.create()
                ctx.storage.ensure()
                jobs = JobStore(ctx.index.engine)
                jobs.add_node(Node(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port,
                                   max_associations=args.max_associations))
                if target == "move":
                    stack.start("listener")
                    stack.start("worker", "--concurrency", "2")
                    settle({p.pid for p in stack.procs.values()})
                job, _ = jobs.submit("retrieve", {"query": {"PatientID": patient}, "mode": target}, node="pacs")
                t0 = time.perf_counter()
                done = runner.run_job(job.id, ctx, jobs)
                dt = time.perf_counter() - t0
                assert done is not None and done.state == "succeeded", done and done.error
                assert done.result["indexed"] == n, done.result
                results[target].append(n / dt)
                splits[target].append(done.result)
                log(f"run {run} pacsbridge {target}: {n / dt:.1f} inst/s")
                stack.close()
                ctx.index.engine.dispose()
        finally:
            stack.close()
            pacs.stop()
    base = median(results.get("movescu", []))
    report = {"instances": n, "runs": args.runs, "max_associations": args.max_associations,
              "host": host_facts(("pynetdicom", "pydicom", "celery")),
              "inst_per_s": {t: [round(v, 1) for v in r] for t, r in results.items()},
              "median": {t: median(r) for t, r in results.items()},
              "ratio_to_movescu": {t: round(median(r) / base, 2) for t, r in results.items() if base and r},
              "job_results": splits}
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
